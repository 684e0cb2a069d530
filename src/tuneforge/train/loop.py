"""The training loop: short, readable, and ours (no transformers.Trainer).

One optimizer step = `batch_size` examples packed into padding-free rows (data.pack). The loss is
taken on assistant tokens only (data.render) and computed without the full logits tensor
(train.loss). Everything else a run needs - events for whoever is watching, checkpoints at each epoch
end, resume, early stopping - is here in plain sight. The loop knows nothing about HTTP or databases:
it reports through `on_event` and asks `should_stop` whether to pause. Under torchrun the same loop
runs in every process, each on its share of every step's examples (train.distributed); rank 0 alone
writes the run folder and reports.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.pack import pack, shared_prefix
from ..data.render import render_sequences
from ..data.validate import load_examples
from ..evaluate.metrics import evaluate_loss, summarise
from ..models.adapters import load_weights_into, prepare_for_training
from ..models.catalogue import resolve
from ..models.gguf import kept_blocks
from ..models.load import weights_dir
from . import distributed, dpo, speed
from . import metrics as metrics_log
from .checkpoint import LoopState, checkpoint_dirs, read_meta, restore_checkpoint, save_checkpoint, writing
from .config import CONFIG_FILE, TrainConfig
from .device import (
    autocast,
    autocast_dtype,
    configure_cpu,
    describe,
    physical_cores,
    pick_device,
    prepare_for_autocast,
    release_free_memory,
    row_multiple,
)
from .lora import group_layers
from .loss import batch_loss, draws_masks
from .model import load_for_training
from .optim import AdamW, warmup_then_decay

Event = dict
RESULT_FILE = "result.json"
BASELINE_FILE = "baseline.json"  # validation metrics of the base model, before step 1


class TrainingStopped(Exception):
    """Raised after a checkpoint was saved because `should_stop` asked (or Ctrl-C/SIGTERM came)."""

    def __init__(self, reason: str, checkpoint: Path):
        super().__init__(f"training stopped ({reason}); checkpoint at {checkpoint}")
        self.reason = reason
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    run_dir: str
    config: dict
    steps: int
    trained_tokens: int
    final: dict  # last train/valid metrics
    baseline: dict | None  # validation metrics before training
    weights: str  # folder with the adapter or the full model
    stopped_early: bool


# What a run writes besides its config and tokenizer. A fresh run in a folder that held another one
# removes all of it first: a LoRA run's old adapter/ beside a new full run's model/ would be what
# eval, chat and export load (they look for adapter/ first).
OUTPUTS = ("checkpoints", "adapter", "model", RESULT_FILE, BASELINE_FILE, metrics_log.METRICS_FILE,
           dpo.REFERENCE_FILE, metrics_log.PLOT_FILE)


def clear_outputs(run_dir: Path) -> None:
    for name in OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _check_before_loading(cfg: TrainConfig) -> None:
    """What can be refused without the model is refused before it loads (seconds to minutes for a
    real base): an unknown base, and the data files' own mistakes - bad lines, missing fields, too
    few examples. What needs the tokenizer (lengths, token counts) is checked again once it is loaded."""
    resolve(cfg.base)
    examples = load_examples(cfg.data, None, cfg.max_length)
    valid = load_examples(cfg.validation_data, None, cfg.max_length, min_examples=1) if cfg.validation_data else []
    if cfg.objective == "dpo":  # a chat file given to DPO: its kind is known without the model too
        dpo.check_pairs(examples, cfg.data)
        dpo.check_pairs(valid, cfg.validation_data)


AUTO_SPLIT, AUTO_SPLIT_MIN = 0.1, 20  # validation_split "auto": a tenth held out from 20 examples on


def _split(examples, cfg: TrainConfig, tokenizer):
    """Hold out a seeded random slice for validation when the user gave no validation file: the
    fraction asked for, or with "auto" a tenth of a file of 20 examples or more (fewer: the one or
    two held out would say little, and training would lose them)."""
    if cfg.validation_data:
        return examples, load_examples(cfg.validation_data, tokenizer, cfg.max_length, min_examples=1)
    split = cfg.validation_split
    if split == "auto":
        split = AUTO_SPLIT if len(examples) >= AUTO_SPLIT_MIN else 0
    if split <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    n_valid = min(len(examples) - 1, max(1, round(len(examples) * split)))  # at least one of each
    held = set(order[:n_valid])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def _render(examples, tokenizer, max_length):
    # (a long raw text is several sequences: consecutive windows of max_length tokens, each trained on)
    rendered = [r for e in examples for r in render_sequences(e, tokenizer, max_length)]
    return [r for r in rendered if r.n_loss_tokens > 0]


def train(
    cfg: TrainConfig,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], str | None] | None = None,
    resume: bool = False,
) -> TrainResult:
    group = distributed.join()
    try:
        return _train(cfg, group, on_event, should_stop, resume)
    finally:
        distributed.leave(group)


def _train(cfg: TrainConfig, group: distributed.Group, on_event, should_stop, resume: bool) -> TrainResult:
    main = group.main
    emit = on_event if on_event is not None and main else (lambda event: None)
    run_dir = Path(cfg.out)  # made once the base model and the data are known to be usable
    configure_cpu(cfg.threads or distributed.threads(group, physical_cores()), quantized=cfg.quantize is not None)
    torch.manual_seed(cfg.seed)
    device = pick_device()
    dtype = autocast_dtype(cfg.precision, device)

    emit({"type": "message", "message": describe(device, dtype, cfg.precision)})
    # continued fine-tuning starts from the earlier run's weights; a resumed run from its own checkpoint,
    # built as its checkpoints were made: its saved config has the earlier run's base and shape (that
    # run may be gone by now), which a caller's fresh settings (a job's defaults) would not
    resuming = resume and bool(checkpoint_dirs(run_dir))
    init_from = cfg.init_from if not resuming else None
    if resuming:
        cfg = cfg.shaped_as(TrainConfig.load(run_dir))
    elif init_from:
        cfg = cfg.continued_from()
    _check_before_loading(cfg)
    emit({"type": "message", "message": f"Loading base model {cfg.base}" + (f" ({cfg.quantize})" if cfg.quantize else "")})
    with distributed.main_first(group):
        model, tokenizer = load_for_training(cfg.base, quantize=cfg.quantize, compute_dtype=dtype,
                                             max_length=cfg.max_length, gguf_blocks=cfg.method == "lora" and dtype is None)
    if kept := kept_blocks(model):
        emit({"type": "message", "message": kept})
    train_ex, valid_ex = _split(load_examples(cfg.data, tokenizer, cfg.max_length), cfg, tokenizer)
    preference = cfg.objective == "dpo"
    if preference:  # items are dpo.Pair: both answers of each preference pair
        train_r = dpo.render_pairs(train_ex, tokenizer, cfg.max_length, cfg.data)
        valid_r = dpo.render_pairs(valid_ex, tokenizer, cfg.max_length, cfg.validation_data or cfg.data)
    else:
        train_r = _render(train_ex, tokenizer, cfg.max_length)
        valid_r = _render(valid_ex, tokenizer, cfg.max_length)
    if not train_r:
        raise ValueError(f"{cfg.data}: no example has assistant tokens to learn from")
    cfg = cfg.resolve(len(train_r))
    model = prepare_for_training(
        model, cfg.method, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout, targets=cfg.lora_targets,
    )
    if init_from:  # continued fine-tuning: the base, then the earlier run's adapter (or full weights) on it
        load_weights_into(model, weights_dir(cfg.init_from))
        emit({"type": "message", "message": f"Continuing from the trained weights of {cfg.init_from}"})
    model = model.to(device)
    if main:  # (each write names its file: one that fails at close, on a full disk, names none of its own)
        with writing(run_dir, "the run folder"):
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir)
            tokenizer.save_pretrained(run_dir / "tokenizer")
    # Everything is tokenized now. The tokenizer holds ~60 MB (its Rust vocabulary, merges and
    # pre-tokenizer regex) that the steps' activations can reuse once it is gone.
    pad_id = tokenizer.pad_token_id
    del tokenizer, train_ex, valid_ex
    emit({"type": "message", "message": (
        f"{len(train_r)} training and {len(valid_r)} validation {'preference pairs' if preference else 'examples'}; "
        f"n_epochs={cfg.n_epochs} batch_size={cfg.batch_size} learning_rate={cfg.learning_rate:g}")})
    model.train()
    shares = not preference and cfg.batch_size > 1 and not draws_masks(model)  # as _step packs
    if shares and (common := shared_prefix(train_r, cfg.max_row_tokens)):
        emit({"type": "message", "message": f"All training examples start with the same {common} tokens (system "
              "prompt, chat template): each step computes them once for all its examples"})
    prepare_for_autocast(model, dtype)  # frozen weights stored in bf16: same numbers, fewer copies
    group_layers(model)  # q/k/v and gate/up LoRA layers as one autograd node each (train.lora)
    model.model.recompute = cfg.activation_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    if group.world > 1:
        distributed.broadcast_parameters(params, group)
        torch.manual_seed(cfg.seed + group.rank)  # dropout masks of their own in each process
    steps_per_epoch = math.ceil(len(train_r) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.n_epochs
    warmup = max(1, round(total_steps * cfg.warmup_ratio))
    schedule = warmup_then_decay(warmup, total_steps)
    optimizer = AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, schedule=schedule)

    state = LoopState()
    if resume and checkpoint_dirs(run_dir):
        last = checkpoint_dirs(run_dir)[-1]
        state = restore_checkpoint(last, model, optimizer)
        if main:
            metrics_log.truncate_after(run_dir, state.global_step)
        emit({"type": "message", "message": f"Resumed from checkpoint at step {state.global_step}"})
    else:
        if resume:  # stopped before its first checkpoint (a kill in the first steps): nothing to go on from
            emit({"type": "message", "message": "No checkpoint to resume from yet: training from the start"})
        if main:
            clear_outputs(run_dir)
    if preference:
        ref_train, ref_valid = _dpo_reference(model, train_r, valid_r, cfg, state, run_dir, main, device, dtype, pad_id)
    distributed.barrier(group)  # no process reads the run folder before rank 0 has set it up

    def validate() -> dict:
        # each process evaluates every world-th example; the sums make the whole set's metrics
        if preference:
            sums = dpo.evaluate(
                model, valid_r[group.rank :: group.world], ref_valid[group.rank :: group.world],
                beta=cfg.dpo_beta, batch_size=cfg.batch_size, max_row_tokens=cfg.max_row_tokens,
                pad_id=pad_id, device=device, dtype=dtype,
            )
            return dpo.summarise(distributed.sum_values(sums, group, device))
        part = evaluate_loss(
            model, valid_r[group.rank :: group.world], pad_id=pad_id, batch_size=cfg.batch_size,
            max_row_tokens=cfg.max_row_tokens, device=device, dtype=dtype,
        )
        n = part["n_tokens"]
        total, n, correct = distributed.sum_values(
            [part["loss"] * n, n, part["token_accuracy"] * n], group, device
        )
        return summarise(total, round(n), round(correct))

    last_row: dict = {}
    stopped_early = False

    def checkpoint(kind: str) -> Path:
        if not main:
            return run_dir / "checkpoints"
        return save_checkpoint(run_dir, model, optimizer, state, kind, last_row)

    if valid_r and state.global_step == 0:
        # The untrained model's validation loss: the baseline every later pass is compared with.
        base = validate()
        if main:
            with writing(run_dir / BASELINE_FILE, "the base model's validation metrics"):
                (run_dir / BASELINE_FILE).write_text(json.dumps(base) + "\n")
        start = "Starting" if cfg.init_from else "Base model"  # (continued: the earlier run's model)
        emit({"type": "message", "message": f"{start} validation loss {base['loss']:.4f}"})
    emit({"type": "message", "message": f"Training started: {total_steps} steps"})
    try:
        for epoch in range(state.epoch, cfg.n_epochs):
            order = torch.randperm(len(train_r), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            for s in range(state.step_in_epoch, steps_per_epoch):
                if should_stop is not None and (reason := should_stop()):
                    raise TrainingStopped(reason, checkpoint("interrupt"))
                started = time.perf_counter()
                chosen = order[s * cfg.batch_size : (s + 1) * cfg.batch_size].tolist()
                if group.world > 1:
                    mine = distributed.share([_size(train_r[i]) for i in chosen], group)
                    chosen = [chosen[i] for i in mine]
                step_ex = [train_r[i] for i in chosen]
                if preference:
                    out = _dpo_step(model, step_ex, ref_train[chosen], cfg, pad_id, device, dtype, group)
                else:
                    out = _step(model, step_ex, cfg, pad_id, device, dtype, group)
                distributed.sum_gradients(params, group)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                lr = optimizer.lr
                optimizer.step()
                optimizer.zero_grad()
                state.global_step += 1
                state.step_in_epoch = s + 1
                state.trained_tokens += out.n_tokens
                row = {
                    "step": state.global_step,
                    "epoch": epoch + 1,
                    "total_steps": total_steps,
                    "train_loss": out.loss,
                    "train_mean_token_accuracy": out.accuracy,
                    "learning_rate": lr,
                    "tokens_per_second": out.n_tokens / (time.perf_counter() - started),
                    "trained_tokens": state.trained_tokens,
                } | out.extra
                end_of_epoch = state.step_in_epoch == steps_per_epoch
                periodic = cfg.eval_every and state.global_step % cfg.eval_every == 0
                if valid_r and (end_of_epoch or periodic):
                    v = validate()
                    row |= {"valid_loss": v["loss"], "valid_mean_token_accuracy": v["token_accuracy"]}
                    if preference:
                        row |= {"valid_reward_accuracy": v["reward_accuracy"], "valid_reward_margin": v["reward_margin"]}
                    stopped_early = _early_stop(state, v["loss"], cfg.early_stopping_patience)
                last_row = row
                if main:
                    with writing(run_dir / metrics_log.METRICS_FILE, "the step metrics"):
                        metrics_log.append(run_dir, row)
                emit({"type": "metrics", "data": row})
                if stopped_early:
                    break
            state.epoch, state.step_in_epoch = epoch + 1, 0
            release_free_memory()
            ckpt = checkpoint("epoch")
            distributed.barrier(group)  # a resume or the final copy reads it
            emit({"type": "checkpoint", "path": str(ckpt), "step": state.global_step, "metrics": last_row})
            if stopped_early:
                emit({"type": "message", "message": "Early stopping: validation loss stopped improving"})
                break
    except KeyboardInterrupt as interrupt:
        raise TrainingStopped("interrupted", checkpoint("interrupt")) from interrupt

    if main:
        result = _finish(run_dir, cfg, state, last_row, stopped_early, emit)
    distributed.barrier(group)  # the others return what rank 0 wrote
    return result if main else TrainResult(**json.loads((run_dir / RESULT_FILE).read_text()))


@dataclass
class StepOut:
    loss: float  # mean over the step's loss tokens, all processes
    accuracy: float
    n_tokens: int  # real tokens trained, all processes
    extra: dict = field(default_factory=dict)  # objective-specific metrics for the step's row


def _size(item) -> int:
    """Tokens of a training item: a rendered example, or a preference pair's two sequences."""
    return item.n_tokens if isinstance(item, dpo.Pair) else len(item.input_ids)


def _step(model, examples, cfg: TrainConfig, pad_id: int, device, dtype, group: distributed.Group) -> StepOut:
    """Forward and backward pass of one step's examples (this process's share of them).

    The loss is divided by the loss tokens of the whole step, all processes together, so gradients
    summed over the processes are those of the step's mean loss; alone, it is the plain mean.
    """
    if examples:
        batch = pack(examples, cfg.max_row_tokens, pad_id, row_multiple(device, dtype), share=not draws_masks(model))
        batch = batch.to(device)
        with autocast(device, dtype):
            out = batch_loss(model, batch)
        local = [out.loss.item() * out.n_tokens, out.n_tokens, out.n_correct, batch.n_tokens]
    else:  # more processes than this step has examples: this one contributes zero gradients
        local = [0.0, 0, 0, 0]
    total, n_loss, correct, n_tokens = distributed.sum_values(local, group, device)
    if examples:
        (out.loss * (out.n_tokens / max(n_loss, 1))).backward()
    return StepOut(total / max(n_loss, 1), correct / max(n_loss, 1), round(n_tokens))


def _dpo_reference(model, train_r, valid_r, cfg, state, run_dir, main, device, dtype, pad_id):
    """Reference log-probabilities of every pair's answers ([pairs, 2], train and validation): made
    with the model before its first step and kept in the run folder, from which a resumed run (whose
    model has moved on) reads them back."""
    if state.global_step > 0:
        return dpo.load_reference(run_dir)
    kw = dict(batch_size=cfg.batch_size, max_row_tokens=cfg.max_row_tokens, pad_id=pad_id, device=device, dtype=dtype)
    ref_train, ref_valid = dpo.pair_logps(model, train_r, **kw), dpo.pair_logps(model, valid_r, **kw)
    if main:
        with writing(run_dir / dpo.REFERENCE_FILE, "the reference model's log-probabilities"):
            dpo.save_reference(run_dir, ref_train, ref_valid)
    return ref_train, ref_valid


def _dpo_step(model, pairs, reference, cfg: TrainConfig, pad_id: int, device, dtype, group) -> StepOut:
    """`_step` for preference pairs: the mean DPO loss of the step's pairs, all processes together."""
    if pairs:
        with autocast(device, dtype):
            out = dpo.pair_losses(model, pairs, reference, cfg.dpo_beta, cfg.max_row_tokens, pad_id)
        local = out.sums() + [sum(p.n_tokens for p in pairs)]
    else:  # more processes than this step has pairs: this one contributes zero gradients
        local = dpo.NO_PAIRS + [0]
    *sums, n_tokens = distributed.sum_values(local, group, device)
    if pairs:
        (out.losses.sum() / max(sums[1], 1)).backward()
    m = dpo.summarise(sums)
    extra = {"train_reward_accuracy": m["reward_accuracy"], "train_reward_margin": m["reward_margin"]}
    return StepOut(m["loss"], m["token_accuracy"], round(n_tokens), extra)


def _early_stop(state: LoopState, valid_loss: float, patience: int) -> bool:
    if state.best_valid_loss is None or valid_loss < state.best_valid_loss:
        state.best_valid_loss, state.bad_evals = valid_loss, 0
        return False
    state.bad_evals += 1
    return patience > 0 and state.bad_evals >= patience


def _best_checkpoint(run_dir: Path, early_stopping: bool) -> Path:
    """The last epoch checkpoint, or the one with the lowest validation loss under early stopping."""
    epochs = [c for c in checkpoint_dirs(run_dir) if read_meta(c)["kind"] == "epoch"]
    if not early_stopping:
        return epochs[-1]
    key = lambda c: read_meta(c)["metrics"].get("valid_loss", math.inf)  # noqa: E731
    return min(epochs, key=key)


def _finish(run_dir: Path, cfg: TrainConfig, state, last_row, stopped_early, emit) -> TrainResult:
    src = _best_checkpoint(run_dir, cfg.early_stopping_patience > 0) / "weights"
    dest = run_dir / ("adapter" if cfg.method == "lora" else "model")
    shutil.rmtree(dest, ignore_errors=True)
    with writing(dest, "the trained weights"):
        shutil.copytree(src, dest)
    with writing(run_dir / metrics_log.PLOT_FILE, "the loss curve"):
        metrics_log.plot(run_dir)
    speed.record(cfg.base, cfg.method, [r["tokens_per_second"] for r in metrics_log.read(run_dir)])
    result = TrainResult(
        run_dir=str(run_dir), config=json.loads((run_dir / CONFIG_FILE).read_text()),
        steps=state.global_step, trained_tokens=state.trained_tokens, final=last_row,
        baseline=json.loads(baseline.read_text()) if (baseline := run_dir / BASELINE_FILE).exists() else None,
        weights=str(dest), stopped_early=stopped_early,
    )
    with writing(run_dir / RESULT_FILE, "the run's result"):
        (run_dir / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
    emit({"type": "message", "message": "Training finished"})
    return result

