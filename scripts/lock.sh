#!/usr/bin/env bash
# Regenerates requirements.lock: the exact version of every dependency (every extra, the test tools and the build
# backend) that scripts/demo.sh, scripts/test.sh, the Dockerfile and CI install, for Python 3.11 and newer on any
# platform (a "universal" resolution). Run it after changing dependencies in pyproject.toml:
#   bash scripts/lock.sh             keeps every pin that still fits (the current lock is the starting point)
#   bash scripts/lock.sh --upgrade   moves every pin to the newest release that fits
# Needs uv (https://docs.astral.sh/uv/): the one on PATH, else UV_VERSION installed into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
UV_VERSION=0.13.9
uv=uv
if ! command -v uv >/dev/null 2>&1; then
  [ -x "$VENV/bin/python" ] || sw_venv  # any working .venv will do
  uv="$VENV/bin/uv"
  if [ ! -x "$uv" ] || [ "$("$uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    run "$VENV/bin/python" -m pip install -qq "uv==$UV_VERSION"
  fi
fi
# The build backend (pyproject's [build-system] requires) is pinned too: the scripts install with
# --no-build-isolation, so nothing unpinned is fetched at install time.
build_requires="$(sed -n '/^\[build-system\]/,/^\[/{s/^requires *= *\[\(.*\)\]/\1/p}' pyproject.toml | tr -d '" ' | tr ',' '\n')"
say "uv pip compile pyproject.toml (every extra) + build backend -> requirements.lock"
printf '%s\n' "$build_requires" | "$uv" pip compile pyproject.toml - --all-extras --universal --python-version 3.11 \
  --annotation-style line --custom-compile-command "bash scripts/lock.sh" -o requirements.lock -q "$@"
say "requirements.lock: $(grep -c '==' requirements.lock) pinned packages"
