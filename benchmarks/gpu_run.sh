#!/usr/bin/env bash
# The GPU benchmark as one command, for a lent machine (device tool `run`, carry [".whl"]):
#     bash benchmarks/gpu_run.sh [shape]          # shape: llama-1b (default), smollm2-360m, tiny
# Installs the carried wheels (benchmarks/gpu_wheels.sh) beside the machine's own PyTorch, runs the
# engine's and evaluation's tests (the server and `tuneforge eval` run on the GPU),
# builds a random model of the shape, runs tuneforge and TRL side by side on it (LoRA and full, 1
# repetition) and leaves the logs and the JSON in $OUT (or ./gpu-bench when run elsewhere).
# GPU_BENCH_EXTRA adds options to the benchmark (e.g. "--methods lora" to halve the time).
set -euo pipefail
cd "$(dirname "$0")/.."
shape="${1:-llama-1b}"
out="${OUT:-gpu-bench}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TUNEFORGE_HOME=/tmp/tuneforge-home
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt" || true
python3 -m pytest -q -rs tests/serve/test_engine.py tests/evaluate/test_compare.py 2>&1 | tee "$out/serve-gpu.log" || true
python3 benchmarks/random_model.py --shape "$shape" --out "/tmp/model-$shape"
python3 benchmarks/train_throughput.py --base "/tmp/model-$shape" --batch-size 16 --repeat 8 --epochs 1 ${GPU_BENCH_EXTRA:-} \
  --reps 1 --json "$out/gpu-$shape.json" 2>&1 | tee "$out/gpu-$shape.log"
