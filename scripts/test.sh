#!/usr/bin/env bash
# One command: install the test dependencies and run lint, types and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system.sh
python3 -m pip install -q -e '.[test]'
ruff check src tests bench
mypy
lint-imports  # the layer contracts in pyproject.toml (docs/architecture.md)
stitchwork sandbox prepare  # compile the wasm:// module before the tests (cached across runs)
python3 -m pytest "$@"
