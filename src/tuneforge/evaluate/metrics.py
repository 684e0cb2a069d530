"""Loss, perplexity and token accuracy of a model on rendered examples (no gradients).

Used by the training loop for validation passes and by `tuneforge eval` for base-vs-tuned reports,
so both report the same numbers the same way: means over loss-carrying (assistant) tokens.
"""

from __future__ import annotations

import math

import torch

from ..data.pack import pack
from ..data.render import Rendered
from ..train.device import autocast, row_multiple
from ..train.loss import batch_loss

# How evaluation packs examples (no gradients are kept, so wider than training's batches)
EVAL_BATCH_SIZE = 8
EVAL_ROW_TOKENS = 4096


@torch.no_grad()
def evaluate_loss(
    model,
    rendered: list[Rendered],
    *,
    pad_id: int,
    batch_size: int = EVAL_BATCH_SIZE,
    max_row_tokens: int = EVAL_ROW_TOKENS,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n, correct = 0.0, 0, 0
    for i in range(0, len(rendered), batch_size):
        batch = pack(rendered[i : i + batch_size], max_row_tokens, pad_id, row_multiple(device, dtype))
        batch = batch.to(device)
        with autocast(device, dtype):
            out = batch_loss(model, batch)
        total += float(out.loss) * out.n_tokens
        n += out.n_tokens
        correct += out.n_correct
    model.train(was_training)
    return summarise(total, n, correct)


def summarise(total_loss: float, n_tokens: int, n_correct: int) -> dict:
    """The reported metrics from summed loss, loss tokens and correct predictions (sums, so that
    parts evaluated separately - by the processes of a distributed run - add up)."""
    loss = total_loss / max(n_tokens, 1)
    return {
        "loss": loss,
        "perplexity": perplexity(loss),
        "token_accuracy": n_correct / max(n_tokens, 1),
        "n_tokens": n_tokens,
    }


def perplexity(loss: float) -> float:
    """exp(loss), the true value however large: inf past the float range (a loss above ~709), not a
    cap that would pass off a far worse model as one merely bad; NaN for a NaN loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
