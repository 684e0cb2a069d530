#!/usr/bin/env bash
# Wheels a lent GPU machine lacks, for benchmarks/gpu_run.sh: that machine has Python 3.12 with CUDA
# PyTorch, transformers, peft and accelerate, reaches no package index, and takes what travels with the
# working tree (64 MiB). Run this here (it reaches PyPI); .whl/ is git-ignored and carried by the run.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
# tuneforge's own needs the image lacks (pydantic-settings for Settings; transformers >= 5.20, which
# wants a newer huggingface_hub than the image's), then TRL and datasets for the side-by-side run.
# The versions are the ones this project's CPU runs use (benchmarks/constraints.txt, pip freeze).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl \
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
  typing-inspection==0.4.5 python-dotenv==1.2.4 \
  transformers==5.24.0 huggingface_hub==2.4.0 \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0
du -sh .whl
