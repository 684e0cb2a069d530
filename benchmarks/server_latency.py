"""Answer time through the real server: `tuneforge serve` on loopback, asked by the openai SDK.

    python benchmarks/server_latency.py                       # the embedded model, 32 tokens, 5 of each
    python benchmarks/server_latency.py --max-tokens 128 --reps 3

Starts a server in a throwaway TUNEFORGE_HOME (no training workers), asks the same greedy question
as a plain and as a streamed chat completion, alternating, after one warm-up of each (the model's
load), and prints the medians. What it measures is what a client waits for: the HTTP layer, the
request's threads and the engine together - where `serve_throughput.py` times the engine alone.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from openai import OpenAI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()

    home = tempfile.mkdtemp(prefix="tf-latency-")
    env = os.environ | {"TUNEFORGE_HOME": home}
    cli = [sys.executable, "-m", "tuneforge.cli"]
    key = subprocess.run([*cli, "keys", "create", "--project", "bench"], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    port = free_port()
    server = subprocess.Popen([*cli, "serve", "--port", str(port), "--workers", "0"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=600)
        for _ in range(240):
            try:
                client.models.list()
                break
            except Exception:
                time.sleep(0.5)
        ask = dict(model=args.model, max_tokens=args.max_tokens, temperature=0,
                   messages=[{"role": "user", "content": "Explain gradient descent in a few sentences."}])

        def plain() -> tuple[float, int]:
            started = time.perf_counter()
            reply = client.chat.completions.create(**ask)
            return time.perf_counter() - started, reply.usage.completion_tokens

        def streamed() -> tuple[float, int]:
            started = time.perf_counter()
            chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
            return time.perf_counter() - started, chunks[-1].usage.completion_tokens

        plain(), streamed()
        times: dict[str, list[float]] = {"plain": [], "streamed": []}
        tokens = 0
        for i in range(args.reps):
            for name, ask_once in (("plain", plain), ("streamed", streamed))[:: 1 if i % 2 == 0 else -1]:
                seconds, tokens = ask_once()
                times[name].append(seconds)
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:8s} median {median:.2f} s for {tokens} tokens ({tokens / median:.1f} tokens/s), "
                  f"runs {', '.join(f'{v:.2f}' for v in values)}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
