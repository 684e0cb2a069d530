#!/usr/bin/env bash
# The whole test suite, slow end-to-end tests included (they use the real embedded model, a real
# server, the real openai SDK and headless Chromium), then the server's storage tests once more
# against a throwaway PostgreSQL cluster (SQLite is the default; the schema must work on both).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
root() { [ "$(id -u)" = 0 ]; }
# Debian's Chromium drives the dashboard's browser tests (test tools may not download a browser here).
if ! command -v chromium >/dev/null 2>&1 && root; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
python -m pytest "$@"

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -n 1)
if [ -z "$pgbin" ] && root; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -n 1)
fi
if [ -z "$pgbin" ]; then
    echo "PostgreSQL is not installed: the PostgreSQL pass is skipped"
    exit 0
fi
pgdir=$(mktemp -d)
as_pg=()
if root; then chown postgres "$pgdir"; as_pg=(runuser -u postgres --); fi  # postgres refuses root
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${as_pg[@]}" "$pgbin/initdb" -D "$pgdir/data" -A trust -U tuneforge >/dev/null
"${as_pg[@]}" "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/log" -w \
    -o "-k $pgdir -p $port -c listen_addresses=127.0.0.1" start >/dev/null
trap '"${as_pg[@]}" "$pgbin/pg_ctl" -D "$pgdir/data" -m immediate stop >/dev/null; rm -rf "$pgdir"' EXIT
TUNEFORGE_TEST_POSTGRES="postgresql+psycopg://tuneforge@127.0.0.1:$port" \
    python -m pytest tests/store tests/jobs tests/serve tests/monitor "$@"
