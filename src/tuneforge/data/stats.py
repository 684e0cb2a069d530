"""Token counts, default epochs and cost estimates for a training set.

The numbers follow OpenAI's fine-tuning data-prep cookbook, so a user comparing with OpenAI sees
the same epoch count and billing rule. Tokens are counted with the local model's tokenizer, so
cost estimates for OpenAI models are approximate.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np

from .example import Example
from .render import IGNORE, Rendered, render_example, window_spans

# OpenAI bills at most this many tokens of one example (the cookbook's MAX_TOKENS_PER_EXAMPLE).
BILLING_TOKENS_PER_EXAMPLE = 16385

# OpenAI's default-epochs heuristic: aim for 3 epochs, but at least 100 and at most 25,000
# example-passes in total.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25


def distribution(values: list[int]) -> dict[str, float]:
    """min, max, mean, median, p10, p90 (numpy's linear quantiles, as the cookbook prints them)."""
    if not values:
        return {k: 0.0 for k in ("min", "max", "mean", "median", "p10", "p90")}
    arr = np.asarray(values, dtype=float)
    return {
        "min": float(arr.min()),
        "max": float(arr.max()),
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "p10": float(np.quantile(arr, 0.1)),
        "p90": float(np.quantile(arr, 0.9)),
    }


@dataclass
class TokenStats:
    # the examples measured (parsed and rendered); a report's n_examples counts every record, bad ones too
    n_tokenized: int
    n_sequences: int  # what training reads: one per example, each window of a long text (render_sequences)
    messages_per_example: dict[str, float]  # prompt + answer turns; 0 for raw text
    tokens_per_example: dict[str, float]  # whole example, before truncation
    loss_tokens_per_example: dict[str, float]  # tokens the loss is taken on (assistant answers)
    n_truncated: int  # examples cut to max_length (a longer text is split instead, not cut)
    billing_tokens: int  # one epoch, as OpenAI bills it
    trained_tokens: int  # one epoch, as trained here (each example cut to max_length, texts whole)
    max_length: int | None = None

    @classmethod
    def compute(cls, examples: list[Example], tokenizer, max_length: int | None = None) -> TokenStats:
        return cls.from_rendered(examples, [render_example(e, tokenizer) for e in examples], max_length)

    @classmethod
    def from_rendered(
        cls, examples: list[Example], rendered: list[Rendered], max_length: int | None = None
    ) -> TokenStats:
        """Stats from untruncated renders (validate renders once and reuses them here)."""
        lengths = [len(r.input_ids) for r in rendered]
        sequences = [sequence_lengths(e, n, max_length) for e, n in zip(examples, lengths)]
        return cls(
            n_tokenized=len(examples),
            n_sequences=sum(map(len, sequences)),
            messages_per_example=distribution([len(e.messages) + len(e.chosen or []) for e in examples]),
            tokens_per_example=distribution(lengths),
            loss_tokens_per_example=distribution([sum(x != IGNORE for x in r.labels) for r in rendered]),
            n_truncated=sum(e.kind != "text" and sum(s) < n for e, s, n in zip(examples, sequences, lengths)),
            billing_tokens=sum(map(_billed, examples, lengths, sequences)),
            trained_tokens=sum(map(sum, sequences)),
            max_length=max_length,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sequence_lengths(example: Example, n_tokens: int, max_length: int | None) -> list[int]:
    """The lengths of the sequences training reads for an example of n_tokens (render_sequences): a
    text in windows of max_length, anything else once, cut to max_length."""
    if max_length is None:
        return [n_tokens]
    if example.kind != "text":
        return [min(n_tokens, max_length)]
    return [b - a for a, b in window_spans(n_tokens, max_length)]


def _billed(example: Example, n_tokens: int, sequences: list[int]) -> int:
    """OpenAI bills an example whole up to its cap, whatever a local max_length cuts; a text's
    windows are examples of their own there."""
    if example.kind == "text":
        return sum(min(n, BILLING_TOKENS_PER_EXAMPLE) for n in sequences)
    return min(n_tokens, BILLING_TOKENS_PER_EXAMPLE)


def resolve_n_epochs(n_examples: int) -> int:
    """OpenAI's default number of epochs for a training set of this size."""
    if n_examples <= 0:
        raise ValueError("no examples to train on")
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


def load_pricing() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath("pricing.json").read_text(encoding="utf-8"))


def estimate_costs(billing_tokens: int, n_epochs: int) -> list[dict[str, Any]]:
    """What training this set would cost on each hosted model in pricing.json, for comparison."""
    trained = billing_tokens * n_epochs
    return [
        {
            "model": row["model"],
            "usd_per_1k_training_tokens": row["usd_per_1k_training_tokens"],
            "trained_tokens": trained,
            "usd": trained / 1000 * row["usd_per_1k_training_tokens"],
            "as_of": row["as_of"],
        }
        for row in load_pricing()["models"]
    ]


def estimate_local_seconds(tokens: int, tokens_per_second: float | None) -> float | None:
    """Seconds to train `tokens` at a measured throughput; None when no throughput is known."""
    if not tokens_per_second or tokens_per_second <= 0:
        return None
    return tokens / tokens_per_second
