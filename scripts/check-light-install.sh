#!/usr/bin/env bash
# Checks the light client install for real: `pip install stitchwork` (no extras, versions from requirements.lock)
# into a fresh virtual environment gives a CLI without DuckDB, cedarpy or wasmtime; a server-side command names
# the extra to install; remote commands work against a real `stitchwork up` (run from the project's .venv).
#   bash scripts/check-light-install.sh [SOURCE_DIR]    (default: this tree; CI passes a clean copy)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
src="$(cd "${1:-.}" && pwd)"
[ -x "$VENV/bin/stitchwork" ] || die "run scripts/test.sh or scripts/demo.sh first: the server runs from $VENV"
sw_python
tmp="$(mktemp -d)"
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill -INT "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
light="$tmp/light/bin/python"
run "$PY" -m venv "$tmp/light"
run "$light" -m pip install -qq --disable-pip-version-check -c "$PWD/requirements.lock" "$src"

for module in duckdb cedarpy wasmtime fastapi uvicorn jsonschema; do
  if "$light" -c "import $module" 2>/dev/null; then die "the light install has $module"; fi
done
say "the light install has none of: duckdb cedarpy wasmtime fastapi uvicorn jsonschema"

export STITCHWORK_STATE_DIR="$tmp/client"
code=0; out="$("$tmp/light/bin/stitchwork" runs ls 2>&1)" || code=$?
[ "$code" = 2 ] && grep -qF "pip install 'stitchwork[server]'" <<<"$out" \
  || die "without a server, \`runs ls\` should exit 2 naming stitchwork[server]; got $code: $out"
say "without a server: exit 2, $out"

port="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
STITCHWORK_STATE_DIR="$tmp/server" STITCHWORK_MESSAGING__BUS=memory:// \
  "$VENV/bin/stitchwork" up --port "$port" >"$tmp/up.log" 2>&1 </dev/null &
server_pid=$!
export STITCHWORK_URL="http://127.0.0.1:$port"
for _ in $(seq 1 120); do
  if [ -s "$tmp/server/operator.token" ] && "$light" -c "import httpx, sys; sys.exit(httpx.get('$STITCHWORK_URL/healthz').status_code != 200)" 2>/dev/null; then
    break
  fi
  sleep 0.5
done
STITCHWORK_TOKEN="$(cat "$tmp/server/operator.token")" || die "stitchwork up did not start: $(cat "$tmp/up.log")"
export STITCHWORK_TOKEN
run "$tmp/light/bin/stitchwork" secrets set light_check --value from-the-light-client
listed="$("$tmp/light/bin/stitchwork" secrets list --json)"
grep -q light_check <<<"$listed" || die "secrets list over HTTP: $listed"
run "$tmp/light/bin/stitchwork" runs ls --json
run "$tmp/light/bin/stitchwork" audit verify
say "the light client works against stitchwork up at $STITCHWORK_URL"
