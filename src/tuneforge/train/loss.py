"""Cross-entropy on the positions that carry a target, without materialising the full logits.

The vocabulary projection (hidden -> 49,152 logits) is the most expensive layer of a small model and
most positions (system prompt, user turn) carry no loss. We run the decoder body, gather the hidden
states of loss positions only, and project them in chunks; under autograd each chunk is recomputed in
the backward pass (checkpointing), so at most one chunk of logits is alive at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.pack import Batch
from ..data.render import IGNORE

CHUNK = 1024  # loss positions per vocabulary-projection chunk


@dataclass
class LossOut:
    loss: torch.Tensor  # mean over loss tokens (differentiable)
    n_tokens: int
    n_correct: int


def causal_lm(model):
    """The *ForCausalLM module under any PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_loss(head, hidden, targets):
    logits = head(hidden).float()
    loss = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    return loss, correct


def batch_loss(model, batch: Batch, chunk: int = CHUNK) -> LossOut:
    lm = causal_lm(model)
    out = lm.get_decoder()(
        input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
    )
    mask = batch.targets != IGNORE
    hidden = out.last_hidden_state[mask]
    targets = batch.targets[mask]
    head = lm.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = 0
    for i in range(0, len(targets), chunk):
        h, t = hidden[i : i + chunk], targets[i : i + chunk]
        if torch.is_grad_enabled():
            loss, c = checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            loss, c = _chunk_loss(head, h, t)
        total = total + loss
        correct += int(c)
    n = len(targets)
    return LossOut(total / max(n, 1), n, correct)
