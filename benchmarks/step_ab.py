"""One training step, old code against new, interleaved in one process: for changes of a few percent.

    python benchmarks/step_ab.py --base HEAD~1            # working tree vs the commit before
    python benchmarks/step_ab.py --base 631215c --method full --rounds 3

On a shared machine, whole-run throughput moves by +-5% from one minute to the next (neighbours on
the same memory bus), so two separate runs cannot tell a 2% change from noise. Here both versions of
tuneforge are loaded side by side (the base revision from git, imported as `tuneforge_base`), each
prepares its own copy of the embedded model as the training loop does, and the same batches run
through one then the other, alternating which goes first. Noise then hits both within a second of
each other: the median of the per-step time ratios is what to read, with its quartiles.

Steps are the loop's own (pack, bf16 autocast, batch_loss, backward, clip, fused AdamW); no model
loading, validation or checkpoints. The base revision must import its own modules relatively, as
tuneforge does.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "shakespeare_ml.jsonl"


def import_revision(rev: str):
    """tuneforge as of git revision `rev`, importable beside the working tree's as tuneforge_base."""
    proc = subprocess.run(["git", "archive", rev, "src/tuneforge"], cwd=ROOT, capture_output=True)
    if proc.returncode:
        raise SystemExit(f"step_ab: --base {rev}: not a git revision with src/tuneforge ({proc.stderr.decode().strip()})")
    archive = proc.stdout
    folder = Path(tempfile.mkdtemp(prefix="tf-ab-"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "src" / "tuneforge").rename(folder / "tuneforge_base")
    # Names that are global to the process (transformers' attention registry, a context variable)
    # must not collide with the working tree's.
    attention = folder / "tuneforge_base" / "train" / "attention.py"
    text = attention.read_text().replace('"tuneforge_packed"', '"tuneforge_packed_base"')
    attention.write_text(text.replace('"tuneforge_segments"', '"tuneforge_segments_base"'))
    sys.path.insert(0, str(folder))
    return importlib.import_module("tuneforge_base")


def prepare(pkg, method: str):
    """(batches, step) for one version: the training loop's set-up, then a timed step function."""
    mod = lambda name: importlib.import_module(f"{pkg.__name__}.{name}")  # noqa: E731
    config, loop, validate, device = mod("train.config"), mod("train.loop"), mod("data.validate"), mod("train.device")
    device.configure_cpu(0)
    native = importlib.util.find_spec(f"{pkg.__name__}.train.model") is not None  # its own decoder (2026-12-06 on)
    if native:
        load = mod("train.model").load_for_training
        # an fp32 LoRA run's frozen base in the GGUF file's own blocks (models.gguf, 2026-12-06 on), as the loop has it
        fp32_lora = method == "lora" and device.autocast_dtype("auto", torch.device("cpu")) is None
        kept = {"gguf_blocks": fp32_lora} if "gguf_blocks" in inspect.signature(load).parameters else {}
        model, tokenizer = load("smollm2-135m-instruct", **kept)
    else:
        model, tokenizer = mod("models.load").load_base("smollm2-135m-instruct")
    cfg = config.TrainConfig(data=str(DATA), out="-", method=method)
    train_ex, _ = loop._split(validate.load_examples(cfg.data, tokenizer, cfg.max_length), cfg, tokenizer)
    rendered = loop._render(train_ex, tokenizer, cfg.max_length)
    cfg = cfg.resolve(len(rendered))
    model = mod("models.adapters").prepare_for_training(
        model, method, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=0.0, targets=cfg.lora_targets
    )
    model.train()
    dtype = device.autocast_dtype(cfg.precision, torch.device("cpu"))
    device.prepare_for_autocast(model, dtype)
    if native:
        mod("train.lora").group_layers(model)
    else:
        mod("train.fused").fuse_for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if importlib.util.find_spec(f"{pkg.__name__}.train.optim") is not None:  # its own AdamW (2026-12-06 on)
        optimizer = mod("train.optim").AdamW(params, lr=cfg.learning_rate)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, fused=True)
    pack, batch_loss = mod("data.pack").pack, mod("train.loss").batch_loss
    size = cfg.batch_size
    batches = [pack(rendered[i : i + size], cfg.max_row_tokens, tokenizer.pad_token_id) for i in range(0, len(rendered), size)]

    def step(batch) -> float:
        started = time.perf_counter()
        with device.autocast(torch.device("cpu"), dtype):
            out = batch_loss(model, batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        out.loss.item()
        return time.perf_counter() - started

    return batches, step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD", help="git revision to compare the working tree with")
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--rounds", type=int, default=2, help="passes over the training batches (after one warm-up)")
    args = p.parse_args()

    import tuneforge

    base = import_revision(args.base)
    (base_batches, base_step), (new_batches, new_step) = (prepare(pkg, args.method) for pkg in (base, tuneforge))
    pairs = list(zip(base_batches, new_batches))
    for old, new in pairs:  # warm-up: kernel caches, allocator
        base_step(old), new_step(new)
    ratios, base_time, new_time = [], 0.0, 0.0
    for r in range(args.rounds):
        for i, (old, new) in enumerate(pairs):
            if (i + r) % 2:
                t_base = base_step(old)
                t_new = new_step(new)
            else:
                t_new = new_step(new)
                t_base = base_step(old)
            ratios.append(t_base / t_new)
            base_time, new_time = base_time + t_base, new_time + t_new
    tokens = sum(b.n_tokens for b in base_batches) * args.rounds
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(f"{args.method}: {args.base} {tokens / base_time:.1f} tokens/s, working tree {tokens / new_time:.1f} tokens/s; "
          f"speed-up per step: median {statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f}, {len(ratios)} steps)")


if __name__ == "__main__":
    main()
