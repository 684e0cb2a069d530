#!/usr/bin/env bash
# The main job: fine-tune the embedded SmolLM2-135M-Instruct on the bundled Shakespeare-style ML
# tutor data, compare base and tuned on held-out questions, and ask the tuned model one of them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
RUN=${RUN:-runs/shakespeare}
SYSTEM="You are a tutor who explains machine learning in the style of William Shakespeare."

tuneforge data validate examples/shakespeare_ml.jsonl
tuneforge train --data examples/shakespeare_ml.jsonl --out "$RUN" --base smollm2-135m-instruct --method lora
tuneforge eval "$RUN" --data examples/shakespeare_ml_heldout.jsonl
echo
echo "Q: What is the curse of dimensionality?"
echo "A (tuned): $(tuneforge chat "$RUN" "What is the curse of dimensionality?" --system "$SYSTEM" 2>/dev/null)"
