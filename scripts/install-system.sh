#!/usr/bin/env bash
# Debian packages Stitchwork's sandboxes need (bubblewrap for bwrap://). Safe to re-run.
set -euo pipefail
if command -v bwrap >/dev/null 2>&1; then exit 0; fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq bubblewrap >/dev/null
