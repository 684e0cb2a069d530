#!/usr/bin/env bash
# The main job: fine-tune the embedded SmolLM2-135M-Instruct on the bundled Shakespeare-style ML
# tutor data, compare base and tuned on held-out questions, then serve the tuned model with the
# OpenAI-compatible server and ask it a held-out question through the official openai SDK.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
RUN=${RUN:-runs/shakespeare}

tuneforge data validate examples/shakespeare_ml.jsonl
tuneforge train --data examples/shakespeare_ml.jsonl --out "$RUN" --base smollm2-135m-instruct --method lora --overwrite
tuneforge eval "$RUN" --data examples/shakespeare_ml_heldout.jsonl

# Serve it: register the run as an ft: model, start the server, ask through the openai SDK.
MODEL=$(tuneforge import "$RUN" --suffix bard)
KEY=$(tuneforge keys create --project default --name demo)
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tuneforge serve --port "$PORT" --workers 0 >/dev/null 2>&1 &
trap 'kill $! 2>/dev/null' EXIT
echo
echo "Served as $MODEL at http://127.0.0.1:$PORT/v1"
echo "Q: What is the curse of dimensionality?"
echo -n "A: "
python examples/ask_server.py "http://127.0.0.1:$PORT/v1" "$KEY" "$MODEL" "What is the curse of dimensionality?"
