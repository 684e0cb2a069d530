#!/usr/bin/env bash
# The whole test suite, slow end-to-end tests included (they use the real embedded model, a real
# server, the real openai SDK and headless Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
# Debian's Chromium drives the dashboard's browser tests (test tools may not download a browser here).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
python -m pytest "$@"
