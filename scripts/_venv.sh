# Sourced by scripts/demo.sh, test.sh and lock.sh: the project's virtual environment and what goes into it.
#
# Interpreter: ${PYTHON:-python3}, Python 3.11 or newer. Stock Debian 12 / Ubuntu 24.04 Pythons refuse `pip install`
# outside a virtual environment (PEP 668), so everything goes into .venv:
# made with uv when `uv` is on PATH, else with `python -m venv` (python3-venv is installed with apt-get, as root or
# with sudo, when the venv module is missing). Versions come from requirements.lock (see scripts/lock.sh).

VENV="$PWD/.venv"
LOCK="$PWD/requirements.lock"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }
run() { say "$*"; "$@"; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else return 1
  fi
}

# Sets PY to the interpreter, checked: it exists and is Python >= 3.11.
sw_python() {
  PY="${PYTHON:-python3}"
  command -v "$PY" >/dev/null 2>&1 || die "no Python interpreter '$PY': set PYTHON to a Python 3.11 or newer"
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); Stitchwork needs 3.11 or newer (set PYTHON=...)"
  PY_REAL="$("$PY" -c 'import os, sys; print(os.path.realpath(sys.executable))')"
}

# Debian and Ubuntu ship `venv` (and the pip it seeds) in a separate package: install it when it is missing.
sw_venv_module() {
  "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1 && return 0
  local ver
  ver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  command -v apt-get >/dev/null 2>&1 \
    || die "$PY has no working venv module; install it (the python$ver-venv package or your system's equivalent)"
  say "$PY has no venv module: installing python$ver-venv with apt-get"
  { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$ver-venv" \
      || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; } >/dev/null \
    || die "could not install python$ver-venv (run as root or with sudo: apt-get install python3-venv)"
}

# Creates $VENV with $PY unless it exists and was made with the same interpreter.
sw_venv() {
  sw_python
  if [ -x "$VENV/bin/python" ] && [ -f "$VENV/pyvenv.cfg" ]; then
    local made_with
    made_with="$(cat "$VENV/.stitchwork-python" 2>/dev/null || true)"
    if [ "$made_with" = "$PY_REAL" ] && "$VENV/bin/python" -c '' >/dev/null 2>&1; then
      say "using the virtual environment $VENV (Python $PY_REAL)"
      return 0
    fi
    say "$VENV was made with ${made_with:-another interpreter}: making it again with $PY_REAL"
    rm -rf "$VENV"
  elif [ -e "$VENV" ]; then
    die "$VENV exists but is not a virtual environment; move it away"
  fi
  if command -v uv >/dev/null 2>&1; then
    run uv venv -q --python "$PY_REAL" "$VENV"
  else
    sw_venv_module
    run "$PY" -m venv "$VENV"
  fi
  printf '%s\n' "$PY_REAL" > "$VENV/.stitchwork-python"
}

# Installs the project (editable) with the given extras, every version pinned by requirements.lock.
# Skipped when the same extras were installed from the same lock and pyproject.toml before.
sw_install() {
  local extras="$1" stamp="$VENV/.stitchwork-installed" key
  [ -f "$LOCK" ] || die "no $LOCK (run: bash scripts/lock.sh)"
  key="$extras $(cat "$LOCK" pyproject.toml | "$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')"
  if grep -qxF "$key" "$stamp" 2>/dev/null; then
    say "stitchwork[$extras] already installed from requirements.lock"
    return 0
  fi
  say "installing stitchwork[$extras] into $VENV, every version pinned by requirements.lock"
  if command -v uv >/dev/null 2>&1; then
    run uv pip install -q --python "$VENV/bin/python" -c "$LOCK" setuptools wheel
    run uv pip install -q --python "$VENV/bin/python" -c "$LOCK" --no-build-isolation -e ".[$extras]"
  else
    if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then  # a venv made by uv has no pip of its own
      run "$VENV/bin/python" -m ensurepip -q || die "$VENV has no pip; install uv, or remove $VENV and run again"
    fi
    run "$VENV/bin/python" -m pip install -qq --disable-pip-version-check -c "$LOCK" setuptools wheel
    run "$VENV/bin/python" -m pip install -qq --disable-pip-version-check -c "$LOCK" --no-build-isolation -e ".[$extras]"
  fi
  printf '%s\n' "$key" >> "$stamp"
}
