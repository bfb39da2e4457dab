#!/usr/bin/env bash
# One command: install the test dependencies into .venv and run lint, types, layer contracts and the test suite.
# Interpreter: ${PYTHON:-python3} (3.11 or newer); extra arguments go to pytest (e.g. -x, -k NAME, tests/interfaces).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
run bash scripts/install-system.sh
sw_venv
sw_install "all,test"
export PATH="$VENV/bin:$PATH"  # from here on python3, stitchwork, pytest, ruff and mypy are the venv's
export VIRTUAL_ENV="$VENV"
unset PYTHONPATH PYTHONHOME
run ruff check src tests bench
run mypy
run lint-imports  # the layer contracts in pyproject.toml (docs/architecture.md)
run stitchwork sandbox prepare  # compile the wasm:// module before the tests (cached across runs)
run python3 -m pytest "$@"
