#!/usr/bin/env bash
# Debian packages Stitchwork's sandboxes need (bubblewrap for bwrap://). Safe to re-run.
set -euo pipefail
# gVisor's runsc for gvisor:// (optional: the backend reports itself unavailable without it).
if ! command -v runsc >/dev/null 2>&1; then
  S=""; if [ "$(id -u)" != "0" ]; then S="sudo"; fi
  { $S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $S apt-get install -y -qq runsc; } >/dev/null 2>&1 \
    || echo "runsc not installed: gvisor:// will be unavailable" >&2
fi
# Debian's chromium for the dashboard's browser tests (Playwright drives it; they skip with the reason without it).
if ! command -v chromium >/dev/null 2>&1; then
  S=""; if [ "$(id -u)" != "0" ]; then S="sudo"; fi
  { $S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $S apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "chromium not installed: the dashboard's browser tests will be skipped" >&2
fi
if command -v bwrap >/dev/null 2>&1; then exit 0; fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq bubblewrap >/dev/null
