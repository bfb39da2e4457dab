#!/usr/bin/env bash
# One command: install the test dependencies into .venv and run lint, types, layer contracts and the test suite.
# Interpreter: ${PYTHON:-python3} (3.11 or newer); extra arguments go to pytest (e.g. -x, -k NAME, tests/interfaces);
# STITCHWORK_TEST_JOBS sets the number of test processes (default 2; 0: none, all in one process).
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
# Two test processes (pytest-xdist), each taking whole files: the suite waits on subprocesses and servers much of
# the time, so this halves its wall time on a 2-core machine. STITCHWORK_TEST_JOBS=0 runs it in this process.
run python3 -m pytest -n "${STITCHWORK_TEST_JOBS:-2}" --dist loadfile "$@"
