"""tuneforge's trainer against TRL SFTTrainer (+ PEFT LoRA), side by side on this machine.

    pip install -e '.[bench]' -c benchmarks/constraints.txt     # TRL is benchmark-only
    python benchmarks/train_throughput.py                       # LoRA and full, 3 repetitions
    python benchmarks/train_throughput.py --quick               # smoke run: LoRA, 1 epoch, 1 repetition
    python benchmarks/train_throughput.py --checkpointing       # + tuneforge with activation checkpointing
    python benchmarks/train_throughput.py --methods qlora,lora  # QLoRA (base in NF4; needs bitsandbytes)

On a GPU (both trainers run on it when torch sees one), with a bigger model of random weights:
    python benchmarks/random_model.py --shape llama-1b --out /tmp/llama-1b
    python benchmarks/train_throughput.py --base /tmp/llama-1b --batch-size 16 --repeat 8 --reps 1

Both trainers get the same examples (examples/shakespeare_ml.jsonl, tuneforge's seeded 90/10 split),
the same token ids and loss positions (TRL receives tuneforge's rendering as a pre-tokenised dataset
with labels), the same base weights, LoRA rank/alpha/targets, batch size, max length, epochs,
learning rate and schedule, and bf16 autocast when the CPU has native bf16 (TRL's default). TRL
otherwise keeps its defaults (padding to the longest example of a batch, gradient checkpointing) and
runs without tuneforge's process settings (train.device.configure_cpu), with the same thread count.
Each run is its own subprocess, so its peak RSS (VmHWM) is its own; runs alternate between the
two trainers so a noisy neighbour hurts both alike.

Measured per run:
- tokens/s: non-padding tokens trained (every example's tokens, once per epoch) / time inside
  optimizer steps (tuneforge: the loop's per-step timer; TRL: step begin..end callbacks). Validation,
  checkpoints and model loading are excluded for both; `wall` is the whole process, imports included.
- model FLOP/s: (4·N for LoRA, 6·N for full) · tokens + causal attention 6·layers·width·len² per
  example, N = all parameters of the base model; the same count for both trainers whatever they
  actually execute (tuneforge skips the vocabulary projection where there is no loss).
- % of the matmul peak measured here (best of square fp32 and bf16 matmuls, same thread count; on a
  GPU bf16 only, 8192-square), and on a GPU also of its datasheet dense bf16 peak (MFU).
- peak memory: the process's VmHWM; on a GPU also torch's peak of allocated GPU memory.
- method qlora: LoRA on a base whose linear layers are NF4 with double quantisation (bitsandbytes) -
  tuneforge's `quantize="nf4"`; for TRL, the model loaded with transformers' BitsAndBytesConfig, as
  TRL's QLoRA recipe does. FLOPs counted as for LoRA.
- validation loss: tuneforge's evaluate_loss on the same held-out examples after the last epoch
  (with --repeat the held-out examples have copies in the training set: a speed run, not a loss one).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tuneforge  # noqa: F401  (first: both trainers' processes run offline - tuneforge/__init__)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "shakespeare_ml.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------- workers


def _peak_worker(args) -> dict:
    import torch

    from tuneforge.train.device import configure_cpu, cpu_has_bf16

    configure_cpu(args.threads)
    if torch.cuda.is_available():
        return _cuda_peak()
    best = {}
    # bf16 only where the CPU multiplies in it: elsewhere PyTorch's fallback takes minutes a product,
    # and neither trainer runs in it (both train in fp32 there)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))[: 2 if cpu_has_bf16() else 1]:
        rates = []
        for n in (1024, 2048, 3072):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            for _ in range(8):  # best single product: a busy neighbour only ever lowers a sample
                start = time.perf_counter()
                a @ b
                rates.append(2 * n**3 / (time.perf_counter() - start))
        best[name] = max(rates)
    return best


def _cuda_peak() -> dict:
    import torch

    rates = []
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    for _ in range(3):
        a @ b
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        rates.append(2 * 8192**3 / (start.elapsed_time(end) / 1e3))
    name = torch.cuda.get_device_name()
    # no fp32 peak on a GPU: tensor cores run bf16, and the table's other column is the datasheet's
    return {"bf16": max(rates), "gpu": name, "datasheet_bf16": _datasheet_peak(name)}


# Datasheet dense bf16 peaks (no sparsity), FLOP/s, for MFU: by a word of torch's device name.
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def _datasheet_peak(device_name: str) -> float | None:
    if "H100" in device_name and "PCIe" in device_name:
        return 756e12
    return next((v for k, v in DATASHEET_BF16.items() if k in device_name.split()), None)


def _data(tokenizer, max_length, data):
    from tuneforge.data.validate import load_examples
    from tuneforge.train.config import TrainConfig
    from tuneforge.train.loop import _render, _split

    cfg = TrainConfig(data=data, out="-", max_length=max_length)
    train_ex, valid_ex = _split(load_examples(cfg.data, tokenizer, max_length), cfg, tokenizer)
    return _render(train_ex, tokenizer, max_length), _render(valid_ex, tokenizer, max_length)


def _tuneforge_worker(args) -> dict:
    from tuneforge.train import metrics as metrics_log
    from tuneforge.train.config import TrainConfig
    from tuneforge.train.loop import train

    out = tempfile.mkdtemp(prefix="tf-bench-")
    cfg = TrainConfig(
        data=args.data, out=out, base=args.base, method="lora" if args.method == "qlora" else args.method,
        quantize="nf4" if args.method == "qlora" else None, n_epochs=args.epochs,
        batch_size=args.batch_size, max_length=args.max_length, threads=args.threads,
        activation_checkpointing=args.worker == "tuneforge-ckpt",
    )
    result = train(cfg)
    rows = metrics_log.read(Path(out))
    step_seconds, before = 0.0, 0
    for row in rows:
        step_seconds += (row["trained_tokens"] - before) / row["tokens_per_second"]
        before = row["trained_tokens"]
    return {
        "tokens": result.trained_tokens,
        "train_seconds": step_seconds,
        "valid_loss": result.final.get("valid_loss"),
        "batch_size": result.config["batch_size"],
    }


def _train_lengths(args) -> list[int]:
    from tuneforge.models.load import load_tokenizer

    train_r, _ = _data(load_tokenizer(args.base), args.max_length, args.data)
    return [len(r.input_ids) for r in train_r]


def _trl_worker(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tuneforge.data.render import IGNORE
    from tuneforge.evaluate.metrics import evaluate_loss
    from tuneforge.models.load import load_base
    from tuneforge.train.config import BASE_LEARNING_RATE, TrainConfig
    from tuneforge.train.device import autocast_dtype, physical_cores

    # TRL as its users run it: the same thread count, none of tuneforge's process settings (oneDNN
    # kernel cache, glibc allocator thresholds: train.device.configure_cpu), which speed TRL up too.
    torch.set_num_threads(args.threads or physical_cores())
    if args.method == "qlora":  # TRL's QLoRA recipe: transformers quantises the base as it loads it
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from tuneforge.models.catalogue import resolve
        from tuneforge.models.load import load_tokenizer, model_folder

        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_folder(resolve(args.base)), dtype=torch.float32,
                                                     quantization_config=nf4)
        tokenizer = load_tokenizer(args.base)
    else:
        model, tokenizer = load_base(args.base)
    train_r, valid_r = _data(tokenizer, args.max_length, args.data)
    rows = [
        {"input_ids": r.input_ids, "labels": [t if lab != IGNORE else IGNORE for t, lab in zip(r.input_ids, r.labels)]}
        for r in train_r
    ]
    batch_size = args.batch_size if args.batch_size != "auto" else TrainConfig("-", "-").resolve(len(train_r)).batch_size
    steps = -(-len(train_r) // int(batch_size)) * args.epochs
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = autocast_dtype("auto", device) is not None
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=int(batch_size),
        num_train_epochs=args.epochs,
        max_length=args.max_length,
        learning_rate=BASE_LEARNING_RATE["lora" if args.method == "qlora" else args.method],
        lr_scheduler_type="linear",
        warmup_steps=max(1, round(steps * 0.05)),
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=args.trl_seed,
        bf16=bf16,
        use_cpu=device.type == "cpu",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        logging_steps=10_000,
        dataloader_num_workers=0,
    )
    peft_config = None
    if args.method in ("lora", "qlora"):
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                 bias="none", task_type="CAUSAL_LM")

    class StepTimer(TrainerCallback):
        seconds, started = 0.0, 0.0

        def on_step_begin(self, *a, **k):
            StepTimer.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            StepTimer.seconds += time.perf_counter() - StepTimer.started

    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[StepTimer()])
    started = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - started
    dtype = torch.bfloat16 if bf16 else None
    valid = evaluate_loss(trainer.model, valid_r, pad_id=tokenizer.pad_token_id, batch_size=int(batch_size),
                          device=device, dtype=dtype)
    return {
        "tokens": sum(len(r.input_ids) for r in train_r) * args.epochs,
        "train_seconds": StepTimer.seconds,
        "train_runtime": runtime,
        "valid_loss": valid["loss"],
        "batch_size": int(batch_size),
    }


# ----------------------------------------------------------------------------------------- driver


def _run(worker: str, args, extra: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--method", args.method if extra is None else extra["method"],
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--threads", str(args.threads), "--base", args.base, "--data", args.data, "--trl-seed", str(args.trl_seed)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{worker} run failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall"] = wall
    return result


def _model_shape(base: str) -> dict:
    from transformers import AutoConfig

    from tuneforge.models.catalogue import resolve
    from tuneforge.models.load import model_folder

    config = AutoConfig.from_pretrained(model_folder(resolve(base)))  # converts the GGUF on a new machine
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # a tied head is the embedding matrix: count it once
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return {"n_params": n_params, "layers": config.num_hidden_layers, "width": width}


def _flops(run: dict, method: str, shape: dict, epochs: int) -> float:
    per_token = (6 if method == "full" else 4) * shape["n_params"]
    attention = 6 * shape["layers"] * shape["width"] * sum(n * n for n in shape["lengths"]) * epochs
    return per_token * run["tokens"] + attention


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="LoRA only, 1 epoch, 1 repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", default="auto", help="examples per step for both trainers")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--base", default="smollm2-135m-instruct", help="catalogue name or model folder (random_model.py)")
    p.add_argument("--data", default=str(DATA), help="chat JSONL both trainers train on")
    p.add_argument("--repeat", type=int, default=1, help="train on --data's lines this many times over (GPU runs)")
    p.add_argument("--long", action="store_true",
                   help="train on multi-turn conversations of 6-10 of --data's exchanges each (440-755 tokens)")
    p.add_argument("--skip-trl", action="store_true", help="tuneforge only (no TRL installed)")
    p.add_argument("--checkpointing", action="store_true",
                   help="also tuneforge with activation checkpointing (TRL's default is gradient checkpointing)")
    p.add_argument("--json", help="also write all runs to this file")
    p.add_argument("--trl-seed", type=int, default=42,
                   help="TRL's seed (its adapter initialisation, data order). tuneforge's seed stays: it also draws "
                        "the validation split both trainers share")
    p.add_argument("--worker", choices=["peak", "tuneforge", "tuneforge-ckpt", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        fn = {"peak": _peak_worker, "tuneforge": _tuneforge_worker, "tuneforge-ckpt": _tuneforge_worker,
              "trl": _trl_worker}[args.worker]
        result = fn(args)
        result["peak_rss_mb"] = _peak_rss_mb()
        result |= _gpu_memory()
        print("RESULT " + json.dumps(result), flush=True)
        return

    if args.quick:
        args.reps, args.methods, args.epochs = 1, "lora", 1
    if not Path(args.data).is_file():
        raise SystemExit(f"train_throughput: --data {args.data}: no such file")
    if args.long:
        args.data = str(_long_conversations(Path(args.data)))
    if args.repeat > 1:
        lines = Path(args.data).read_text().splitlines()
        repeated = Path(tempfile.mkdtemp(prefix="tf-bench-data-")) / "repeated.jsonl"
        repeated.write_text("\n".join(lines * args.repeat) + "\n")
        args.data = str(repeated)
    methods = args.methods.split(",")
    trainers = ["tuneforge"] + (["tuneforge-ckpt"] if args.checkpointing else []) + ([] if args.skip_trl else ["trl"])
    shape = _model_shape(args.base) | {"lengths": _train_lengths(args)}
    print(f"machine: {_machine()}")
    peaks = [_run("peak", args, {"method": "lora"})]
    print(f"matmul peak: {_describe(peaks[0])}", flush=True)
    runs: dict[tuple[str, str], list[dict]] = {(m, t): [] for m in methods for t in trainers}
    for rep in range(args.reps):
        for method in methods:
            for trainer in trainers if rep % 2 == 0 else trainers[::-1]:
                r = _run(trainer, args, {"method": method})
                r["flops"] = _flops(r, method, shape, args.epochs)
                runs[(method, trainer)].append(r)
                print(f"  rep {rep + 1} {method:4s} {trainer:14s} {r['tokens'] / r['train_seconds']:7.1f} tok/s  "
                      f"wall {r['wall']:5.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MB  "
                      + (f"GPU {r['peak_gpu_mb']:6.0f} MB  " if "peak_gpu_mb" in r else "") +
                      f"valid loss {r['valid_loss']:.4f}", flush=True)
    peaks.append(_run("peak", args, {"method": "lora"}))
    peak = peaks[0] | {k: max(p[k] for p in peaks) for k in ("fp32", "bf16") if k in peaks[0]}
    _table(runs, methods, trainers, peak, args)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": _machine(), "peak": peak, "args": vars(args),
            "runs": {f"{m}/{t}": v for (m, t), v in runs.items()},
        }, indent=2) + "\n")


def _long_conversations(path: Path, seed: int = 0) -> Path:
    """As many conversations as `path` has, each 6-10 of its exchanges (drawn with a fixed seed) one
    after another under the first one's system message: slots wider than the short-attention kernel's."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"train_throughput: {path} line {number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or "messages" not in row:
            raise SystemExit(f"train_throughput: --long needs chat JSONL; {path} line {number} has no 'messages'")
        rows.append(row)
    if len(rows) < 10:
        raise SystemExit(f"train_throughput: --long needs at least 10 conversations; {path} has {len(rows)}")
    rng = random.Random(seed)
    out = []
    for _ in rows:
        picks = rng.sample(rows, rng.randint(6, 10))
        system = [m for m in picks[0]["messages"] if m["role"] == "system"][:1]
        out.append({"messages": system + [m for p in picks for m in p["messages"] if m["role"] != "system"]})
    target = Path(tempfile.mkdtemp(prefix="tf-bench-data-")) / "long.jsonl"
    target.write_text("".join(json.dumps(o) + "\n" for o in out))
    return target


def _describe(peak: dict) -> str:
    rates = ", ".join(f"{k} {peak[k] / 1e9:.0f} GFLOP/s" for k in ("fp32", "bf16") if k in peak)
    return rates + (f" ({peak['gpu']})" if "gpu" in peak else "")


def _table(runs, methods, trainers, peak, args) -> None:
    med = statistics.median
    gpu = "gpu" in peak
    print(f"\nmatmul peak (best of start/end): {_describe(peak)}; {args.reps} repetition(s), {args.epochs} epoch(s), "
          "medians\n")
    # on a GPU: % of the datasheet peak (MFU) and GPU memory instead of the fp32 column
    third, memory = ("MFU (datasheet bf16)", "peak GPU MB") if gpu else ("% fp32 peak", "peak RSS MB")
    print(f"| method | trainer | batch | tokens/s | model GFLOP/s | % bf16 peak | {third} | {memory} "
          "| wall s | valid loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in methods:
        for trainer in trainers:
            rs = runs[(method, trainer)]
            tps = med(r["tokens"] / r["train_seconds"] for r in rs)
            fps = med(r["flops"] / r["train_seconds"] for r in rs)
            other = peak.get("datasheet_bf16") if gpu else peak["fp32"]
            of_bf16 = f"{100 * fps / peak['bf16']:.0f}%" if "bf16" in peak else "-"  # no native bf16: no such peak
            print(f"| {method} | {trainer} | {rs[0]['batch_size']} | {tps:.0f} | {fps / 1e9:.0f} "
                  f"| {of_bf16} "
                  f"| {f'{100 * fps / other:.0f}%' if other else '-'} "
                  f"| {med(r['peak_gpu_mb' if gpu else 'peak_rss_mb'] for r in rs):.0f} "
                  f"| {med(r['wall'] for r in rs):.1f} | {med(r['valid_loss'] for r in rs):.4f} |")
    if "trl" not in trainers:
        return
    memory = "peak GPU memory" if "gpu" in peak else "peak RSS"
    print(f"\n| method | trainer | tokens/s vs TRL | {memory} vs TRL | wall vs TRL | valid loss (tuneforge - TRL) |")
    print("|---|---|---|---|---|---|")
    for method in methods:
        for ours in (t for t in trainers if t != "trl"):
            tf, trl = runs[(method, ours)], runs[(method, "trl")]
            speed = med(r["tokens"] / r["train_seconds"] for r in tf) / med(r["tokens"] / r["train_seconds"] for r in trl)
            key = "peak_gpu_mb" if "gpu" in peak else "peak_rss_mb"
            rss = med(r[key] for r in tf) / med(r[key] for r in trl)
            wall = med(r["wall"] for r in tf) / med(r["wall"] for r in trl)
            dloss = med(r["valid_loss"] for r in tf) - med(r["valid_loss"] for r in trl)
            print(f"| {method} | {ours} | {speed:.2f}x | {rss:.2f}x | {wall:.2f}x | {dloss:+.4f} |")


def _peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM). ru_maxrss is not used: Linux carries it over an
    exec from the process that spawned us."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpu_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


if __name__ == "__main__":
    main()
