#!/usr/bin/env bash
# The Debian/Ubuntu packages Stitchwork's sandboxes use, plus any named as arguments (CI adds its own).
# Idempotent and quiet: only missing packages are installed (apt-get, as root or with sudo); safe to re-run.
#   bash scripts/install-system.sh [PACKAGE...]
set -euo pipefail

REQUIRED=(bubblewrap "$@")  # bwrap:// (the tests need it)
OPTIONAL=(runsc chromium)   # gVisor for gvisor:// (the backend reports itself unavailable without it); Debian's chromium for the
                            # dashboard's browser tests (Playwright drives it; they skip with the reason without it)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else return 1
  fi
}

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "not a Debian/Ubuntu system: install bubblewrap yourself for bwrap:// (stitchwork doctor tells what works)" >&2
  exit 0
fi
missing=()
for p in "${REQUIRED[@]}" "${OPTIONAL[@]}"; do
  [ -n "$p" ] && ! installed "$p" && missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "==> apt-get install ${missing[*]}" >&2
as_root apt-get update -qq >/dev/null 2>&1 || echo "apt-get update failed (no root, sudo or network?)" >&2
apt_install() { as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; }
status=0
for p in "${missing[@]}"; do
  if ! apt_install "$p"; then
    case " ${OPTIONAL[*]} " in
      *" $p "*) echo "optional package $p not installed: its backend will report itself unavailable" >&2 ;;
      *) echo "error: could not install $p (run as root or with sudo: apt-get install $p)" >&2; status=1 ;;
    esac
  fi
done
exit $status
