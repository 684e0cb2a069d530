"""Base vs tuned on the same held-out data: loss, perplexity, token accuracy, sample answers.

"Base" is the model before the run's training: for a continued run (--init-from, a job on an ft:
model) the earlier run's or checkpoint's model it started from - whether the new training improved on
what its user had is the question - or the bare base model when those weights are gone. The report's
"base" keeps its name (readers of eval.json know it); "before" says which model it is.

For classification-style data (answers from the label set its system prompt lists, as `data convert
--label-col` writes, or short answers from a small set) it also scores exact-match
accuracy of greedy generations, which is what a user of a classifier cares about. For preference
pairs (what DPO trains on) the preferred answer is the reference, and it also scores how often each
model gives the preferred answer a higher log-probability than the other (`preference_accuracy`) and
by how much on average (`preference_margin`, nats).

The held-out file is checked as a training file is (data.validate), with the run's tokenizer and
max_length: an example whose every answer token truncation cuts away is refused - scored, it would add
a loss over no tokens (0, a perfect score) - and one whose answers all have weight 0 is left out, as
training leaves it out. Non-finite numbers (a diverged model's NaN loss) are null in eval.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.example import Example
from ..data.render import Rendered, encode, message_text, render_sequences
from ..data.validate import load_examples
from ..models.adapters import holds_weights
from ..models.generate import Sampling, complete
from ..models.load import load_base, load_tuned, tokenizer_from, weights_dir
from ..train import dpo
from ..train import metrics as metrics_log
from ..train.config import TrainConfig
from ..train.device import pick_device
from ..train.loop import BASELINE_FILE
from .fit import diagnose
from .metrics import EVAL_BATCH_SIZE, EVAL_ROW_TOKENS, evaluate_loss
from .report import json_safe

log = logging.getLogger(__name__)

REPORT_FILE = "eval.json"


def _answer(example: Example) -> str:
    if example.kind == "text":
        return _halves(example.text)[1]
    return message_text(example.assistant_messages()[-1])


def is_classification(examples) -> bool:
    """Classification-style data: every answer one of the labels its system prompt lists (a file made
    by `data convert --label-col`, whatever its size), or short answers from a small set."""
    chats = [e for e in examples if e.kind == "chat" and e.assistant_messages()]
    if chats and len(chats) == len(examples) and all(_answer(e).strip() in (_labels(e) or ()) for e in chats):
        return True
    answers = [_answer(e).strip() for e in examples if e.assistant_messages()]
    if len(answers) < 4:
        return False
    labels = set(answers)
    return all(len(a.split()) <= 3 for a in answers) and len(labels) <= max(2, len(answers) // 2)


def _labels(example: Example) -> list[str] | None:
    from ..data.convert import listed_labels  # (pandas comes with it: only once there is a system prompt)

    system = next((m for m in example.messages if m["role"] == "system"), None)
    return listed_labels(message_text(system)) if system else None


def _prompt(example) -> list[dict] | str:
    """The conversation up to (not including) its last assistant turn; of a text (continued
    pre-training), its first half, which the model continues."""
    if example.kind == "text":
        return _halves(example.text)[0]
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return example.messages[:last]


def _sample_prompt(example, tokenizer) -> list[dict] | list[int] | str:
    """What a sample answers (_prompt) as generation is given it: a text's first half as its token ids,
    tokenised as the text trained (render_text: special-token text in it is plain text) - as a string
    it would be a raw prompt, where a quoted <|im_end|> is the control token."""
    prompt = _prompt(example)
    if isinstance(prompt, str):
        return encode(tokenizer, prompt, split_special_tokens=True) or prompt  # ("": as before)
    return prompt


def _halves(text: str) -> tuple[str, str]:
    """A text cut between words near its middle: (what the model is given, what it should write)."""
    words = text.split(" ")
    middle = max(1, len(words) // 2)
    return " ".join(words[:middle]), " " + " ".join(words[middle:])


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
            answer = complete(model, tokenizer, _sample_prompt(e, tokenizer), Sampling(max_tokens=16)).text
            hits += answer.strip() == _answer(e).strip()
            tick()
        report["exact_match"] = hits / len(examples)
    report["samples"] = []
    for e in examples[:n_samples]:
        prompt = _sample_prompt(e, tokenizer)
        report["samples"].append(complete(model, tokenizer, prompt, Sampling(max_tokens=max_tokens)).text)
        tick()
    return report


def _run_tokenizer(run_dir: Path):
    """The run's tokenizer alone: the held-out data is checked with it before any weights load."""
    folder = run_dir / "tokenizer"
    if not folder.is_dir():
        raise FileNotFoundError(f"{run_dir}: no tokenizer folder: the run never started training")
    return tokenizer_from(folder)


def _held_out(data, tokenizer, max_length: int) -> tuple[list[Example], list[Example], list[Rendered]]:
    """(every example of the file, those scored for loss, their rendering). DataError for a file that
    would not pass as validation data: an example whose answer truncation cuts away entirely is an
    error (example_too_long), as in training, not a loss of 0 over no tokens."""
    loaded = load_examples(data, tokenizer, max_length, min_examples=1)  # a held-out set may be small
    # raw text (continued pre-training) is scored on every token, as it was trained: a long one in windows
    chats = [e if e.kind == "text" else _as_chat(e) for e in loaded]
    chats = [e for e in chats if e.kind == "text" or e.assistant_messages()]
    examples, rendered, silent = [], [], []
    for e in chats:
        sequences = render_sequences(e, tokenizer, max_length)
        if not any(r.n_loss_tokens for r in sequences):
            silent.append(str(e.line))
            continue
        examples.append(_first_window(e, sequences, tokenizer))
        rendered += sequences
    if silent:
        log.warning("%s: %d example(s) left out, every answer with weight 0: nothing to score (line %s)",
                    data, len(silent), ", ".join(silent))
    if not examples:
        raise ValueError(f"{data}: no examples with an answer or text to evaluate on")
    return loaded, examples, rendered


def _first_window(example: Example, sequences: list[Rendered], tokenizer) -> Example:
    """A text split into windows is sampled within its first: the model learned to continue text of up
    to max_length tokens, and the first half of a whole long document may not fit its context. The
    window is ended at a word, as the halves are cut between words."""
    if len(sequences) == 1:
        return example
    text = tokenizer.decode(sequences[0].input_ids, skip_special_tokens=True)
    end = text.rfind(" ")
    return Example("text", text=text[:end] if end > 0 else text, line=example.line)


def _load_tuned(run_dir: Path, base: str, weights: Path | None = None):
    """The tuned model (or the one of `weights` on the run's base) in full precision (the metrics'
    precision). Weights of another shape than the base's (a run folder whose config names another
    base) are a user's error, not a crash."""
    try:
        return load_tuned(run_dir, weights, dtype=torch.float32)[0]
    except RuntimeError as err:  # torch's load_state_dict: "Error(s) in loading ...\n\tsize mismatch for ..."
        mismatches = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        if not mismatches:
            raise
        more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        raise ValueError(f"{weights or run_dir}: the run's weights do not fit its base model {base}: "
                         f"{mismatches[0].rstrip('.')}{more}") from None


def _started_from(cfg: TrainConfig) -> Path | None:
    """The weights folder a continued run started from (its init_from's); None for a run from the base,
    or when they are gone (the earlier run deleted or moved: said, and the base compared instead)."""
    if not cfg.init_from:
        return None
    weights = weights_dir(cfg.init_from)
    if holds_weights(weights):
        return weights
    log.warning("%s: the weights this run continued training from are gone: comparing with the base model %s "
                "instead", cfg.init_from, cfg.base)
    return None


def _base_valid_loss(run_dir: Path) -> float | None:
    """The untrained model's validation loss that training measured before step 1; None when the run
    had no validation data."""
    path = run_dir / BASELINE_FILE
    if not path.exists():
        return None
    try:
        return float(json.loads(path.read_text())["loss"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: damaged ({e!r}); delete it to evaluate without the base model's "
                         "validation loss") from None


def compare(run_dir: str | Path, data: str | Path, n_samples: int = 3, max_tokens: int = 96,
            on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Score base and tuned. `on_progress(done, total)` hears (0, total) once the models are loaded and
    the work is counted, then of each finished unit of work."""
    if n_samples < 0:  # (a negative count would slice samples off the end)
        raise ValueError(f"samples must be at least 0, got {n_samples}")
    run_dir = Path(run_dir)
    cfg = TrainConfig.load(run_dir)
    if Path(cfg.data).resolve() == Path(data).resolve():
        log.warning("%s is the run's training file: these numbers measure how well it was learned, not how "
                    "the model does on data it has not seen", data)
    # (a damaged metrics file is said now, not after the scoring)
    fit = diagnose(metrics_log.read(run_dir), _base_valid_loss(run_dir),
                   start="the earlier run's" if cfg.init_from else "the base model's")
    tokenizer = _run_tokenizer(run_dir)
    loaded, examples, rendered = _held_out(data, tokenizer, cfg.max_length)
    pairs = dpo.render_pairs([e for e in loaded if e.kind == "preference"], tokenizer, cfg.max_length, str(data))
    classify = is_classification(examples)
    device = pick_device()  # the GPU when there is one
    started = _started_from(cfg)
    tuned = _load_tuned(run_dir, cfg.base).to(device)
    if started:  # continued: what its user had before this run, on the same base - not the bare base
        base_ctx, base = contextlib.nullcontext(), _load_tuned(run_dir, cfg.base, started).to(device)
    elif hasattr(tuned, "disable_adapter"):
        base_ctx, base = tuned.disable_adapter(), tuned  # LoRA: the base is the same model, adapter off
    else:
        base_ctx, base = contextlib.nullcontext(), load_base(cfg.base)[0].to(device).eval()
    total = 2 * (1 + bool(pairs) + min(n_samples, len(examples)) + (len(examples) if classify else 0))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress:
            on_progress(done, total)
    if on_progress:
        on_progress(0, total)
    with base_ctx:
        base_report = _score(base, tokenizer, rendered, examples, pairs, n_samples, classify, max_tokens, tick)
    del base  # (when a model of its own: its memory goes back before the tuned model's scoring)
    tuned_report = _score(tuned, tokenizer, rendered, examples, pairs, n_samples, classify, max_tokens, tick)
    report = {
        "data": str(data),
        "n_examples": len(examples),
        "classification": classify,
        "preference_pairs": len(pairs),
        "base": base_report,
        "tuned": tuned_report,
        "before": cfg.init_from if started else cfg.base,  # which model "base" is
        "continued_from": cfg.init_from,  # (null: a run from the base; not "before": its weights were gone)
        "fit": fit,
        "prompts": [p if isinstance(p := _prompt(e), str) else message_text(p[-1]) for e in examples[:n_samples]],
        "references": [_answer(e) for e in examples[:n_samples]],
    }
    (run_dir / REPORT_FILE).write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    return report
