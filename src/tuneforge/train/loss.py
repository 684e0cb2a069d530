"""Cross-entropy on the positions that carry a target, without materialising the full logits.

The vocabulary projection (hidden -> 49,152 logits) is the most expensive layer of a small model and
most positions (system prompt, user turn) carry no loss. We run the decoder body (with attention
confined to each packed example, train.attention), gather the hidden states of loss positions only,
and project them in chunks. For a plain bias-free output layer, one pass per chunk computes the loss
*and* its gradient (softmax minus one-hot, projected back), so at most one chunk of logits is alive
at a time and nothing is recomputed in the backward pass. Other heads (bias, soft-capping, a LoRA
wrapped lm_head) take the generic route: autograd with each chunk checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.pack import Batch
from ..data.render import IGNORE
from ..models.gguf import GgufLinear, GgufWeights
from .attention import packed
from .device import compute_dtype
from .lora import times

CHUNK = 256  # most loss positions per vocabulary-projection chunk (256 x 49,152 logits in bf16 = 25 MB
# of work buffer). The [chunk, 576] x [576, 49,152] products run faster per row the more rows they have
# (measured 517 / 366 / 321 us a row, forward and backward, at 32 / 128 / 256 rows), so a step's loss
# positions are split into as few chunks as this allows, of equal size (_chunk_rows).
ROUND = 32  # chunk rows are a multiple of this: a handful of product shapes for oneDNN's kernel cache


@dataclass
class LossOut:
    loss: torch.Tensor  # mean over loss tokens (differentiable)
    n_tokens: int
    n_correct: int


def causal_lm(model):
    """The *ForCausalLM module under any PEFT wrapper (train.model's CausalLM has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _low_precision(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight.to(dtype); for a frozen weight (a LoRA run's head) cast once and kept while unchanged.
    Packed weights (a tied head kept in GGUF blocks, models.gguf) stay packed: each product de-quantises
    them a block of rows at a time, in its own dtype."""
    if isinstance(weight, GgufWeights):
        return weight
    if weight.dtype == dtype or weight.requires_grad:
        return weight.to(dtype)
    cached = getattr(weight, "_tuneforge_cast", None)
    if cached is None or cached[0] != weight._version or cached[1].dtype != dtype:
        cached = (weight._version, weight.detach().to(dtype))
        weight._tuneforge_cast = cached
    return cached[1]


class _ProjectedCrossEntropy(torch.autograd.Function):
    """cross_entropy(hidden @ weight.T, targets) of each position (and whether its argmax is the
    target), with its gradient made chunk by chunk in forward.

    The backward pass scales each position's precomputed input gradient by that position's output
    gradient, so any weighting of the positions works for `hidden` (a sum for supervised training,
    per-sequence sums for DPO). The weight's gradient is precomputed as one sum over positions, so
    it is right only for a uniform weighting - a trained head under a plain mean or sum (checked).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, chunk, grad_enabled):
        # Each pass over a [chunk, vocab] tensor costs about as much as the projection itself on a
        # CPU, so there are as few as possible: max (which also gives the prediction), exp of the
        # shifted logits (fp32), their sum, and one scaled cast to the compute dtype for the gradient.
        # The one-hot part of softmax - one-hot is applied after the projection back, on [chunk, width].
        with torch.autocast(hidden.device.type, enabled=False):
            w = _low_precision(weight, dtype)
            want_h, want_w = grad_enabled and hidden.requires_grad, grad_enabled and _trained(weight)
            grad_h = torch.empty_like(hidden, dtype=torch.float32) if want_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
            nll = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
            hits = torch.empty(len(targets), dtype=torch.bool, device=hidden.device)
            # Work buffers reused by every chunk: a fresh [chunk, vocab] tensor costs more in page
            # faults than the arithmetic done on it. Every product of a step has the same [chunk, ...]
            # shape, a multiple of ROUND rows (a short last chunk is padded with zero rows): oneDNN
            # keeps a primitive, with its own buffers, for each shape it has seen, so a last chunk of
            # new length every step would add tens of MB per step for the 49,152-wide products.
            chunk = _chunk_rows(len(targets), chunk)
            h = torch.zeros((chunk, hidden.shape[1]), dtype=dtype, device=hidden.device)
            low = torch.empty((chunk, w.shape[0]), dtype=dtype, device=hidden.device)
            # The fp32 exponentials are made a block of rows at a time: a [ROUND, vocab] buffer (6 MB)
            # instead of a [chunk, vocab] one (50 MB at the step's peak), reread while still in cache.
            high = torch.empty((min(ROUND, chunk), w.shape[0]), dtype=torch.float32, device=hidden.device)
            for i in range(0, len(targets), chunk):
                t = targets[i : i + chunk]
                n = len(t)
                h[:n] = hidden[i : i + n]
                if n < chunk:
                    h[n:].zero_()
                logits = _project(h, w, low)[:n]
                top, predicted = logits.max(-1)
                torch.eq(predicted, t, out=hits[i : i + n])
                top = top.float()[:, None]
                part = nll[i : i + n]
                torch.neg(logits.gather(1, t[:, None]).squeeze(1).float(), out=part)
                for j in range(0, n, len(high)):
                    block = logits[j : j + len(high)]
                    exp = high[: len(block)].copy_(block).sub_(top[j : j + len(block)]).exp_()  # <= 1: no overflow
                    norm = exp.sum(-1, keepdim=True)
                    part[j : j + len(block)] += (top[j : j + len(block)] + norm.log()).squeeze(1)
                    if want_h or want_w:
                        block.copy_(exp.div_(norm))  # softmax, in the compute dtype
                if not (want_h or want_w):
                    continue
                low[n:].zero_()  # padding rows: no gradient
                if grad_h is not None:  # (softmax - onehot) @ w
                    grad_h[i : i + n] = times(low, w)[:n].float() - _rows(w, t).float()
                if grad_w is not None:  # (softmax - onehot).T @ h, accumulated in fp32 without an fp32 temporary
                    grad_w.add_(low.T @ h)
                    grad_w.index_add_(0, t, h[:n].float(), alpha=-1)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has, ctx.dtypes = (want_h, want_w), (hidden.dtype, weight.dtype if want_w else None)
        ctx.mark_non_differentiable(hits)
        return nll, hits

    @staticmethod
    def backward(ctx, grad_nll, _grad_hits):
        # The saved gradients are this node's own buffers, read once: scaled in place (for the tied
        # embedding that is a 113 MB tensor that need not be allocated and paged in again).
        saved = iter(ctx.saved_tensors)
        grad_h = next(saved).mul_(grad_nll[:, None]).to(ctx.dtypes[0]) if ctx.has[0] else None
        grad_w = None
        if ctx.has[1]:
            if len(grad_nll) and not bool((grad_nll == grad_nll[0]).all()):
                raise RuntimeError("a trained output layer's gradient needs the same weight on every position")
            scale = grad_nll[0] if len(grad_nll) else 0.0
            grad_w = next(saved).mul_(scale).to(ctx.dtypes[1])
        return grad_h, grad_w, None, None, None, None


def _trained(weight) -> bool:
    return isinstance(weight, torch.Tensor) and weight.requires_grad


def _project(h, w, out):
    """h @ w.T into `out` (w: a tensor or packed weights, `train.lora.frozen`)."""
    return w.mm_t(h, out=out) if isinstance(w, GgufWeights) else torch.mm(h, w.T, out=out)


def _rows(w, index):
    """The rows of w at `index` (w: a tensor or packed weights)."""
    return w.take(index) if isinstance(w, GgufWeights) else w.index_select(0, index)


def _chunk_rows(n: int, most: int) -> int:
    """Rows per chunk for n loss positions: the fewest chunks of at most `most` rows, evenly filled and
    rounded up to a multiple of ROUND (the last chunk is padded with zero rows to that size)."""
    chunks = max(1, -(-n // most))
    rows = -(-n // chunks)  # ceiling divisions
    step = min(ROUND, most)
    return min(most, max(step, -(-rows // step) * step))


def token_losses(head, config, hidden, targets, chunk: int = CHUNK, uniform: bool = True):
    """(cross-entropy of each position, whether its prediction is the target), without the full logits.

    A plain output layer (`fusable`) takes _ProjectedCrossEntropy's one pass, unless it is trained and
    the positions will not be weighted alike (`uniform=False`: DPO's per-sequence weights), which that
    kernel's weight gradient cannot follow; everything else goes through autograd a chunk at a time,
    each chunk checkpointed (recomputed in the backward pass).
    """
    if fusable(head, config) and (uniform or not _trained(head.weight)):
        grad = torch.is_grad_enabled()
        return _ProjectedCrossEntropy.apply(hidden, head.weight, targets, compute_dtype(hidden), chunk, grad)
    losses, hits = [hidden.new_zeros(0, dtype=torch.float32)], [torch.zeros(0, dtype=torch.bool, device=hidden.device)]
    for i in range(0, len(targets), chunk):
        h, t = hidden[i : i + chunk], targets[i : i + chunk]
        if torch.is_grad_enabled():
            loss, hit = checkpoint(_chunk_losses, head, h, t, use_reentrant=False)
        else:
            loss, hit = _chunk_losses(head, h, t)
        losses.append(loss)
        hits.append(hit)
    return torch.cat(losses), torch.cat(hits)


def _chunk_losses(head, hidden, targets):
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1) == targets


def fusable(head, config) -> bool:
    return (
        # train.model.Linear too, and a tied head kept in GGUF blocks (a LoRA-wrapped head is neither)
        isinstance(head, (torch.nn.Linear, GgufLinear))
        and head.bias is None
        and not getattr(config, "final_logit_softcapping", None)
        and getattr(config, "logit_scale", None) in (None, 1, 1.0)
    )


def label_losses(model, batch: Batch, chunk: int = CHUNK, uniform: bool = True):
    """The decoder over a packed batch (attention kept inside each example), then token_losses at the
    label positions only: (cross-entropy of each, whether predicted, the [rows, length] label mask)."""
    lm = causal_lm(model)
    if hasattr(lm, "hidden"):  # train.model's decoder
        last = lm.hidden(batch.input_ids, batch.position_ids, batch.real)
    else:  # a transformers model (a tuned model under evaluation)
        with packed(lm, batch.position_ids, batch.real):
            last = lm.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
    mask = batch.targets != IGNORE
    hidden, targets = last[mask], batch.targets[mask]
    nll, hits = token_losses(lm.get_output_embeddings(), lm.config, hidden, targets, chunk, uniform)
    return nll, hits, mask


def draws_masks(model) -> bool:
    """Whether a forward pass of `model` draws dropout masks now (LoRA or attention dropout, in
    training). Then a batch does not share its examples' common prefix (data.pack): laid out once,
    the prefix would get one mask for all of them, where laid out in each it gets one per example -
    other numbers than the same run without sharing, for no better training."""
    if not model.training:
        return False
    if getattr(getattr(model, "config", None), "attention_dropout", 0.0):
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def batch_loss(model, batch: Batch, chunk: int = CHUNK) -> LossOut:
    nll, hits, _ = label_losses(model, batch, chunk)
    n = len(nll)
    return LossOut(nll.sum() / max(n, 1), n, int(hits.sum()))
