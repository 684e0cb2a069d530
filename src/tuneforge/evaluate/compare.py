"""Base vs tuned on the same held-out data: loss, perplexity, token accuracy, sample answers.

For classification-style data (short answers from a small label set) it also scores exact-match
accuracy of greedy generations, which is what a user of a classifier cares about. For preference
pairs (what DPO trains on) the preferred answer is the reference, and it also scores how often each
model gives the preferred answer a higher log-probability than the other (`preference_accuracy`) and
by how much on average (`preference_margin`, nats).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.example import Example
from ..data.render import render_example
from ..data.validate import load_examples
from ..models.generate import Sampling, complete
from ..models.load import load_base, load_tuned
from ..train import dpo
from ..train import metrics as metrics_log
from ..train.config import TrainConfig
from ..train.device import pick_device
from .fit import diagnose
from .metrics import EVAL_BATCH_SIZE, EVAL_ROW_TOKENS, evaluate_loss

REPORT_FILE = "eval.json"


def is_classification(examples) -> bool:
    answers = [e.assistant_messages()[-1]["content"].strip() for e in examples if e.assistant_messages()]
    if len(answers) < 4:
        return False
    labels = set(answers)
    return all(len(a.split()) <= 3 for a in answers) and len(labels) <= max(2, len(answers) // 2)


def _prompt(example) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return example.messages[:last]


def _as_chat(example: Example) -> Example:
    """A preference pair as the conversation with its preferred answer; other examples as they are."""
    if example.kind != "preference":
        return example
    return Example("chat", example.messages + (example.chosen or []), example.tools, line=example.line)


def _score(model, tokenizer, rendered, examples, pairs, n_samples, classify, max_tokens, tick) -> dict:
    report = evaluate_loss(model, rendered, pad_id=tokenizer.pad_token_id)
    tick()
    if pairs:
        logps = dpo.pair_logps(model, pairs, batch_size=EVAL_BATCH_SIZE, max_row_tokens=EVAL_ROW_TOKENS,
                               pad_id=tokenizer.pad_token_id,
                               device=next(model.parameters()).device, dtype=None)
        margin = logps[:, 0] - logps[:, 1]
        report["preference_accuracy"] = float((margin > 0).float().mean())
        report["preference_margin"] = float(margin.mean())
        tick()
    if classify:
        hits = 0
        for e in examples:
            answer = complete(model, tokenizer, _prompt(e), Sampling(max_tokens=16)).text
            hits += answer.strip() == e.assistant_messages()[-1]["content"].strip()
            tick()
        report["exact_match"] = hits / len(examples)
    report["samples"] = []
    for e in examples[:n_samples]:
        report["samples"].append(complete(model, tokenizer, _prompt(e), Sampling(max_tokens=max_tokens)).text)
        tick()
    return report


def compare(run_dir: str | Path, data: str | Path, n_samples: int = 3, max_tokens: int = 96,
            on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Score base and tuned; `on_progress(done, total)` hears of each finished unit of work."""
    run_dir = Path(run_dir)
    cfg = TrainConfig.load(run_dir)
    loaded = load_examples(data, min_examples=1)  # a held-out set may be small
    examples = [_as_chat(e) for e in loaded if e.kind != "text"]
    examples = [e for e in examples if e.assistant_messages()]
    if not examples:
        raise ValueError(f"{data}: no examples with an assistant answer to evaluate on")
    device = pick_device()  # the GPU when there is one
    tuned, tokenizer = load_tuned(run_dir, dtype=torch.float32)  # metrics in full precision
    tuned.to(device)
    rendered = [render_example(e, tokenizer, cfg.max_length) for e in examples]
    pairs = dpo.render_pairs([e for e in loaded if e.kind == "preference"], tokenizer, cfg.max_length, str(data))
    classify = is_classification(examples)
    total = 2 * (1 + bool(pairs) + min(n_samples, len(examples)) + (len(examples) if classify else 0))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress:
            on_progress(done, total)
    if hasattr(tuned, "disable_adapter"):
        base_ctx, base = tuned.disable_adapter(), tuned  # LoRA: the base is the same model, adapter off
    else:
        base_ctx, base = contextlib.nullcontext(), load_base(cfg.base)[0].to(device).eval()
    with base_ctx:
        base_report = _score(base, tokenizer, rendered, examples, pairs, n_samples, classify, max_tokens, tick)
    tuned_report = _score(tuned, tokenizer, rendered, examples, pairs, n_samples, classify, max_tokens, tick)
    report = {
        "data": str(data),
        "n_examples": len(examples),
        "classification": classify,
        "preference_pairs": len(pairs),
        "base": base_report,
        "tuned": tuned_report,
        "fit": diagnose(metrics_log.read(run_dir)),
        "prompts": [_prompt(e)[-1]["content"] for e in examples[:n_samples]],
        "references": [e.assistant_messages()[-1]["content"] for e in examples[:n_samples]],
    }
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
