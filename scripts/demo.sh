#!/usr/bin/env bash
# One command: install Stitchwork into .venv and run its main job (the demo) on embedded defaults.
# Interpreter: ${PYTHON:-python3} (3.11 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
run bash scripts/install-system.sh
sw_venv
sw_install "server,nats,bwrap"
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
unset PYTHONPATH PYTHONHOME
run stitchwork sandbox prepare  # compiles the wasm:// module once (seconds); later starts map the cache
run stitchwork demo
say "the CLI is $VENV/bin/stitchwork (or: source $VENV/bin/activate); next: stitchwork up"
