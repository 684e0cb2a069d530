"""Remember how fast training ran on this machine, to estimate the time of the next job.

After each run the loop records its median tokens/s per (base model, method); `data validate` and
the server's upload report use it. Before the first run we fall back to what the embedded model
reached with LoRA on a 2-core CPU during development.
"""

from __future__ import annotations

import json
import statistics

from ..settings import get_settings

FALLBACK_TOKENS_PER_SECOND = 330.0  # SmolLM2-135M, LoRA, 2 CPU cores (benchmarks/README.md)


def _path():
    return get_settings().home / "speed.json"


def record(base: str, method: str, tokens_per_second: list[float]) -> None:
    if not tokens_per_second:
        return
    path = _path()
    known = json.loads(path.read_text()) if path.exists() else {}
    known[f"{base}/{method}"] = statistics.median(tokens_per_second)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=2) + "\n")


def estimated_tokens_per_second(base: str = "smollm2-135m-instruct", method: str = "lora") -> float:
    path = _path()
    if path.exists():
        known = json.loads(path.read_text())
        if f"{base}/{method}" in known:
            return known[f"{base}/{method}"]
    return FALLBACK_TOKENS_PER_SECOND
