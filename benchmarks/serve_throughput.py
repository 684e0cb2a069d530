"""Decoding speed of a served fine-tuned model: tuneforge's engine against PEFT's adapter layers.

    python benchmarks/serve_throughput.py                 # embedded SmolLM2-135M, LoRA r=16 on all 7 projections
    python benchmarks/serve_throughput.py --tokens 128 --reps 5
    python benchmarks/serve_throughput.py --run runs/shakespeare --data examples/shakespeare_ml_heldout.jsonl

The peer is what a transformers user serves a LoRA fine-tune with: the base wrapped by
`PeftModel.from_pretrained` (the adapter as separate low-rank layers), answering through the same
`generate` call. tuneforge's engine (`serve.engine`) answers with a copy of the base into which the
adapter is merged. Both run in the dtype the server uses here (`train.device.inference_dtype`), on the
same prompt, greedy, with the same number of new tokens; the runs alternate, and the best of
`--reps` is kept for each (decoding speed on a shared machine only ever loses to noise). The adapter
has random B matrices (a trained one's arithmetic is the same). Also reported: the base model alone
through the engine, PEFT's wrapped base with its adapter disabled (how PEFT answers the base model
while it holds adapters), and the engine's one-off cost of making the merged copy.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tuneforge.data.render import render_example
from tuneforge.data.validate import load_examples
from tuneforge.evaluate.metrics import evaluate_loss
from tuneforge.models.generate import Sampling, complete
from tuneforge.models.load import load_base, weights_dir
from tuneforge.serve.engine import Engine, Target
from tuneforge.train.config import TrainConfig
from tuneforge.train.device import configure_cpu, inference_dtype

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = [{"role": "user", "content": "What is the curse of dimensionality?"}]


def make_adapter(base: str, folder: Path, rank: int) -> None:
    model, _ = load_base(base)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.001, generator=generator)
    peft.save_pretrained(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--run", help="a run folder: serve its trained adapter instead of a random one")
    p.add_argument("--data", help="chat JSONL: also compare both fine-tuned models' loss on it")
    args = p.parse_args()
    configure_cpu(0)
    if args.run:
        cfg = TrainConfig.load(Path(args.run))
        args.base, folder = cfg.base, weights_dir(args.run)
    else:
        folder = Path(tempfile.mkdtemp(prefix="tf-serve-bench-")) / "adapter"
        make_adapter(args.base, folder, args.rank)

    engine = Engine()
    started = time.perf_counter()
    engine.complete(Target(args.base), [(PROMPT, Sampling(max_tokens=1))])
    base_load = time.perf_counter() - started
    started = time.perf_counter()
    engine.complete(Target(args.base, folder), [(PROMPT, Sampling(max_tokens=1))])
    merge = time.perf_counter() - started

    base_model, tokenizer = engine._bases[args.base]
    peft = PeftModel.from_pretrained(copy.deepcopy(base_model), str(folder)).eval()
    greedy = Sampling(max_tokens=args.tokens, temperature=0)

    def engine_run(target):
        return lambda: engine.complete(target, [(PROMPT, greedy)])[0]

    def peft_run(disabled: bool):
        def run():
            if disabled:
                with peft.disable_adapter():
                    return complete(peft, tokenizer, PROMPT, greedy)
            return complete(peft, tokenizer, PROMPT, greedy)
        return run

    runs = {
        "tuneforge engine, fine-tuned (merged)": engine_run(Target(args.base, folder)),
        "PEFT adapter layers, fine-tuned": peft_run(False),
        "tuneforge engine, base": engine_run(Target(args.base)),
        "PEFT-wrapped base, adapter disabled": peft_run(True),
    }
    best = dict.fromkeys(runs, 0.0)
    texts = {}
    for _ in range(args.reps):
        for name, run in runs.items():
            t = time.perf_counter()
            done = run()
            best[name] = max(best[name], done.completion_tokens / (time.perf_counter() - t))
            texts[name] = done.text

    adapter = f"the adapter of {args.run}" if args.run else f"LoRA r={args.rank} on {len(TARGETS)} projections"
    print(f"\n{args.base}, {adapter}, {inference_dtype()}, "
          f"{torch.get_num_threads()} threads, {args.tokens} new tokens, best of {args.reps}\n")
    print("| served as | tokens/s | vs PEFT adapter layers |")
    print("|---|---|---|")
    peer = best["PEFT adapter layers, fine-tuned"]
    for name, rate in best.items():
        print(f"| {name} | {rate:.1f} | {rate / peer:.2f}x |")
    if args.data:
        rendered = [render_example(e, tokenizer) for e in load_examples(args.data, tokenizer, 4096)]
        merged_model = engine._tuned[str(folder.resolve())]
        losses = [evaluate_loss(m, rendered, pad_id=tokenizer.pad_token_id)["loss"] for m in (merged_model, peft)]
        print(f"\nloss on {args.data}: merged {losses[0]:.4f}, PEFT adapter layers {losses[1]:.4f}")
    same = texts["tuneforge engine, fine-tuned (merged)"] == texts["PEFT adapter layers, fine-tuned"]
    print(f"\nfirst answer of the base: {base_load:.2f} s (model load); first answer of the fine-tuned model: "
          f"{merge:.2f} s (copy + merge); merged and PEFT answers {'identical' if same else 'differ'}")


if __name__ == "__main__":
    main()
