#!/usr/bin/env bash
# One command: install Stitchwork and run its main job (the demo) on embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system.sh
python3 -m pip install -q -e .
stitchwork sandbox prepare  # compiles the wasm:// module once (seconds); later starts map the cache
stitchwork demo
