"""Attention for packed rows that costs what the examples need, not what the rows are long.

Left to itself, transformers reads packed rows (position ids restarting per example) as a dense
block-diagonal [rows, 1, L, L] mask and SDPA then does L² work per row, nearly all of it masked out.
`attend` (train.model's attention; for a transformers model, `packed_attention` within
`packed(model, position_ids)`) regroups each example's queries, keys and values into its own
slot of a [examples, heads, longest, head_dim] tensor, runs causal attention on that (a slot's
padding sits after all its real tokens, so no real query sees it) and puts the outputs back in packed
order. No mask is built, nothing crosses an example boundary, and attention costs Σ len² instead of
rows · L². The kernel depends on the slot width (`_kernel`): a slot's scores in one product for short
slots; a block of queries at a time for wide ones on the CPU (both make the probabilities again in
the backward pass rather than keep them); SDPA on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .device import compute_dtype

NAME = "tuneforge_packed"


@dataclass
class Segments:
    gather: torch.Tensor  # [n * width]: flat token index for each slot (unused places repeat token 0)
    scatter: torch.Tensor  # [rows * length]: slot of each token
    n: int
    width: int
    shared: bool = False  # gather names the shared prefix's tokens in several slots (data.pack)


def segments(position_ids: torch.Tensor, real: torch.Tensor | None = None) -> Segments:
    """Examples of a packed batch: a new one starts wherever the position does not go up by one.

    Each example gets a slot, each token the place of its position in it. An example whose first
    position is s > 0 was laid out without the prefix it shares with the batch's others
    (data.pack.shared_prefix): its slot's first s places hold the tokens of the start of row 0,
    where the prefix is laid out once, so its attention reads the prefix's keys and values.

    `real` ([rows, length], False for a row's end padding) keeps padding out of the example count:
    its tokens take the free places at the end of the examples' slots (each slot is as wide as the
    longest example), after every real token of the slot, so no real token sees them; only when
    those run out do they get slots of their own. A batch of 4 examples and padding is attended as 4
    slots, not 5. Padding outputs are never used: they carry no loss and nothing attends to them.
    """
    rows, length = position_ids.shape
    total = rows * length
    device = position_ids.device
    prev = torch.cat([position_ids[:, :1] - 1, position_ids[:, :-1]], dim=1)
    start = (position_ids - prev) != 1
    start[:, 0] = True
    tokens = torch.arange(total, device=device)
    is_real = real.reshape(-1) if real is not None else torch.ones(total, dtype=torch.bool, device=device)
    real_tokens, pad_tokens = tokens[is_real], tokens[~is_real]
    first = start.reshape(-1)[real_tokens]  # real tokens that start an example
    seg = first.cumsum(0) - 1
    starts = real_tokens[first]
    n = len(starts)
    offset = position_ids.reshape(-1)[starts]  # 0, or the length of the prefix laid out elsewhere
    width = int((torch.bincount(seg, minlength=n) + offset).max()) if n else 1
    scatter = torch.empty(total, dtype=torch.long, device=device)
    scatter[real_tokens] = seg * width + offset[seg] + real_tokens - starts[seg]
    gather = torch.zeros(n * width, dtype=torch.long, device=device)
    free = torch.ones(n * width, dtype=torch.bool, device=device)
    prefix = int(offset.max()) if n else 0
    if prefix:
        place = torch.arange(prefix, device=device).expand(n, prefix)
        in_prefix = place < offset[:, None]
        slot_places = (torch.arange(n, device=device)[:, None] * width + place)[in_prefix]
        gather[slot_places] = place[in_prefix]  # row 0's first tokens
        free[slot_places] = False
    if len(pad_tokens):
        free[scatter[real_tokens]] = False
        places = free.nonzero().squeeze(1)
        if len(places) < len(pad_tokens):  # no room left in the examples' slots: slots of their own
            extra = -(-(len(pad_tokens) - len(places)) // width)
            places = torch.cat([places, torch.arange(n * width, (n + extra) * width, device=device)])
            gather = torch.cat([gather, gather.new_zeros(extra * width)])
            n += extra
        scatter[pad_tokens] = places[: len(pad_tokens)]
    gather[scatter] = tokens
    return Segments(gather, scatter, n, width, shared=prefix > 0)


class _Regroup(torch.autograd.Function):
    """x.index_select(0, forward) whose backward is again an index_select (by `backward`), not the
    scatter-add autograd would use: every used row maps to exactly one source row, and the rows that
    are not used (slot padding) never receive a gradient. Except a shared prefix's tokens, read into
    several slots (`backward` is None): their gradients are summed (the unused places' are zero)."""

    @staticmethod
    def forward(ctx, x, forward, backward, n_rows):
        ctx.backward_index, ctx.n_rows = (forward, x.shape[0]) if backward is None else (backward, n_rows)
        ctx.summed = backward is None
        return x.index_select(0, forward)

    @staticmethod
    def backward(ctx, grad):
        index = ctx.backward_index
        if ctx.summed:
            return grad.new_zeros((ctx.n_rows, *grad.shape[1:])).index_add_(0, index, grad), None, None, None
        if ctx.n_rows is None:  # tokens <- slots: each token's gradient sits in its slot
            return grad.index_select(0, index), None, None, None
        out = grad.new_zeros((ctx.n_rows, *grad.shape[1:]))  # slots <- tokens: padding slots get zero
        return out.index_copy_(0, index, grad), None, None, None


class _ShortCausalAttention(torch.autograd.Function):
    """Causal attention written out with matmuls, for slots short enough that the [w, w] scores fit in
    one product: on CPU this beats SDPA's flash kernel several times over at w ~ 100, mostly in the
    backward pass. Keeps q, k and v for the backward pass, which makes the probabilities again (one
    score product and softmax, the same ops on the same inputs: the same numbers) rather than keep
    them: [heads, w, w] per slot per layer was a sixth of an fp32 LoRA step's saved activations
    (55 MB of 336 on the seed data); measured -55 MB peak RSS for whole runs, the same step time
    (step_ab median 1.003). Grouped query attention without copying k/v: each kv head's query group
    is stacked along the rows.

    The [w, w] tensors are the memory traffic here, so each is touched as few times as possible: the
    scale and the causal mask (an additive -inf bias) are applied inside the score product, softmax
    reads and writes the compute dtype (it accumulates in fp32 inside), and its gradient is one
    fused kernel (`_softmax_backward_data`) - where fp32 copies with a separate scale, mask and
    cast each made a pass of their own (measured +2.4% a LoRA step on the embedded model).

    q: [n, heads, w, dim]; k, v: [n, kv_heads, w, dim]; all in the compute dtype.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale):
        n, heads, w, dim = q.shape
        kv = k.shape[1]
        q = q.reshape(n * kv, heads // kv * w, dim)
        k, v = k.reshape(n * kv, w, dim), v.reshape(n * kv, w, dim)
        out = torch.bmm(_short_probs(q, k, scale), v)
        ctx.save_for_backward(q, k, v)
        ctx.scale, ctx.shape = scale, (n, heads, w, dim)
        return out.view(n, heads, w, dim)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        probs = _short_probs(q, k, ctx.scale)  # made again, bit for bit, rather than kept
        grad_out = grad_out.to(q.dtype).reshape(q.shape)
        grad_v = torch.bmm(probs.transpose(-1, -2), grad_out)
        grad_probs = torch.bmm(grad_out, v.transpose(-1, -2))
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_q = torch.bmm(grad_scores, k).mul_(ctx.scale).view(ctx.shape)
        grad_k = torch.bmm(grad_scores.transpose(-1, -2), q).mul_(ctx.scale)
        n, _, w, dim = ctx.shape
        return grad_q, grad_k.view(n, -1, w, dim), grad_v.view(n, -1, w, dim), None


def _short_probs(q, k, scale):
    """softmax(scale * q k^T + causal bias) in _ShortCausalAttention's layout: q [batch, groups * w, dim]
    (each kv head's query group stacked along the rows), k [batch, w, dim]."""
    w = k.shape[1]
    bias = _causal_bias(w, q.shape[1] // w, q.dtype, q.device)
    return torch.softmax(torch.baddbmm(bias, q, k.transpose(-1, -2), alpha=scale), -1)


class _BlockedCausalAttention(torch.autograd.Function):
    """Causal attention for slots too wide to keep their [w, w] probabilities: queries a block of
    BLOCK positions at a time against only the keys they can see (the upper triangle is skipped a
    block at a time), and the backward pass recomputes each block's probabilities instead of keeping
    them - FlashAttention's bargain (memory linear in w), with the work in batched matrix products of
    a few hundred rows, where SDPA's CPU kernel works in small tiles: 1.5-2x faster than SDPA forward
    and backward at w = 200-1024 on the embedded model's shapes (`_kernel`).

    Queries are laid out position-major within each kv group ([batch, w * groups, dim], pre-scaled),
    so a block of positions is a slice, not a copy, and only the block's diagonal tile of the scores
    gets the causal mask. The output and q's gradient are written straight into the [n, w, heads, dim]
    layout the packed regrouping reads. The gradients of k and v, summed over blocks, are accumulated
    in fp32.

    q: [n, heads, w, dim]; k, v: [n, kv_heads, w, dim]; all in the compute dtype.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale):
        n, heads, w, dim = q.shape
        kv = k.shape[1]
        groups = heads // kv
        qt = _position_major(q, kv, scale)
        k, v = k.reshape(n * kv, w, dim), v.reshape(n * kv, w, dim)
        out = torch.empty(n, w, kv, groups, dim, dtype=q.dtype, device=q.device)
        for start, end in _blocks(w):
            probs = _block_probs(qt, k, start, end, groups)
            block = torch.bmm(probs, v[:, :end]).view(n, kv, end - start, groups, dim)
            out[:, start:end] = block.transpose(1, 2)
        ctx.save_for_backward(qt, k, v)
        ctx.scale, ctx.shape = scale, (n, heads, w, dim)
        return out.view(n, w, heads, dim).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        qt, k, v = ctx.saved_tensors
        n, heads, w, dim = ctx.shape
        kv = k.shape[0] // n
        groups = heads // kv
        g_all = _position_major(grad_out.to(qt.dtype), kv, 1.0)
        grad_q = torch.empty(n, w, kv, groups, dim, dtype=qt.dtype, device=qt.device)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for start, end in _blocks(w):
            probs = _block_probs(qt, k, start, end, groups)  # recomputed, not kept
            g = g_all[:, start * groups : end * groups]
            grad_v[:, :end] += torch.bmm(probs.transpose(-1, -2), g)
            grad_probs = torch.bmm(g, v[:, :end].transpose(-1, -2))
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            block = torch.bmm(grad_scores, k[:, :end]).mul_(ctx.scale).view(n, kv, end - start, groups, dim)
            grad_q[:, start:end] = block.transpose(1, 2)
            grad_k[:, :end] += torch.bmm(grad_scores.transpose(-1, -2), qt[:, start * groups : end * groups])
        grad_q = grad_q.view(n, w, heads, dim).transpose(1, 2)
        return grad_q, grad_k.to(k.dtype).view(n, -1, w, dim), grad_v.to(v.dtype).view(n, -1, w, dim), None


BLOCK = 64  # query positions per block of _BlockedCausalAttention (x groups: the product's rows; 64
# and 128 measured alike from w=200 to 1024, 64 ahead at the short end)


def _blocks(w: int):
    return [(start, min(start + BLOCK, w)) for start in range(0, w, BLOCK)]


def _position_major(x: torch.Tensor, kv: int, scale: float) -> torch.Tensor:
    """[n, kv * groups, w, dim] -> scale * x as [n * kv, w * groups, dim] (row: position, then group)."""
    n, heads, w, dim = x.shape
    out = torch.empty(n, kv, w, heads // kv, dim, dtype=x.dtype, device=x.device)
    torch.mul(x.reshape(n, kv, heads // kv, w, dim).transpose(2, 3), scale, out=out)
    return out.view(n * kv, -1, dim)


def _block_probs(qt, k, start, end, groups):
    """softmax(q_block k[:end]^T, causal): [batch, (end - start) * groups, end] (q pre-scaled)."""
    scores = torch.bmm(qt[:, start * groups : end * groups], k[:, :end].transpose(-1, -2))
    scores[:, :, start:end] += _diagonal_bias(end - start, groups, scores.dtype, scores.device)
    return torch.softmax(scores, -1)


@functools.lru_cache(maxsize=8)
def _diagonal_bias(rows: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[rows * groups, rows]: the causal bias of a query block against its own positions (the keys
    before the block are all visible): -inf where the key comes after the query."""
    return _causal_tile(rows, dtype, device).repeat_interleave(groups, dim=0)


@functools.lru_cache(maxsize=8)
def _causal_bias(w: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[groups * w, w]: 0 where a query (row i of each group) may see a key (j <= i), else -inf.
    Made once per slot width, not once per layer: every layer of a step has the same width."""
    return _causal_tile(w, dtype, device).repeat(groups, 1)


def _causal_tile(w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[w, w]: 0 where query i may see key j (j <= i), else -inf."""
    later = torch.ones(w, w, dtype=torch.bool, device=device).triu_(1)
    return torch.zeros(w, w, dtype=dtype, device=device).masked_fill_(later, float("-inf"))


SHORT = 160  # widest slot for _ShortCausalAttention (keeps [w, w] probabilities); wider: blocked, or SDPA


def _kernel(width: int, device_type: str, dropout: float) -> str:
    """Which attention a slot width gets. On the CPU, measured forward+backward on the embedded model's
    shapes (4 slots, 9 heads in 3 kv groups, bf16, 2 cores): the short kernel is fastest up to ~160
    positions (w=104: 1.6 ms, blocked 2.3); from there the blocked one (w=256: 8.6 ms, short 11.9,
    SDPA 16.6; w=512: 28 / 48 / 56; w=1024: 88 / 189 / 136). On a GPU, SDPA's flash kernels."""
    if dropout:
        return "sdpa"
    if width <= SHORT:
        return "short"
    return "blocked" if device_type == "cpu" else "sdpa"


def attend(query, key, value, seg: Segments, scaling: float, dropout: float = 0.0):
    """Causal attention within each example of a packed batch: [rows, heads, L, dim] in (k and v with
    their own, fewer heads), [rows, L, heads, dim] out."""
    rows, _, length, dim = query.shape
    dtype = compute_dtype(query)

    def regroup(x):  # [rows, h, L, dim] -> [n, h, width, dim], cast to the compute dtype on the way
        # (rotary embeddings hand over fp32 q and k: one pass casts and lays out, the rest moves bf16)
        flat = x.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format).view(rows * length, x.shape[1], dim)
        slots = _Regroup.apply(flat, seg.gather, None if seg.shared else seg.scatter, None)
        return slots.view(seg.n, seg.width, x.shape[1], dim).transpose(1, 2)

    q, k, v = regroup(query), regroup(key), regroup(value)
    kind = q.device.type
    kernel = _kernel(seg.width, kind, dropout)
    if kernel != "sdpa":
        function = _ShortCausalAttention if kernel == "short" else _BlockedCausalAttention
        with torch.autocast(kind, enabled=False):
            out = function.apply(q, k, v, scaling)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=k.shape[1] != q.shape[1]
        )
    out = out.transpose(1, 2).reshape(seg.n * seg.width, q.shape[1], dim)
    out = _Regroup.apply(out, seg.scatter, seg.scatter, seg.n * seg.width)
    return out.view(rows, length, q.shape[1], dim)


# transformers' models (a tuned model evaluated by `tuneforge eval`, the server's loss checks) take the
# same attention through transformers' attention interface, registered on first use: importing
# transformers' masking code costs ~90 MB that a training process (train.model) has no use for.
_current: ContextVar[Segments | None] = ContextVar("tuneforge_segments", default=None)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: [rows, heads, L, dim] in, [rows, L, heads, dim] out."""
    seg = _current.get()
    if seg is None:
        raise RuntimeError("packed_attention runs only inside tuneforge.train.attention.packed()")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attend(query, key, value, seg, scale, dropout), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, lambda *args, **kwargs: None)  # no mask: segments say it all


@contextlib.contextmanager
def packed(model, position_ids: torch.Tensor, real: torch.Tensor | None = None):
    """Within this block, the transformers `model` attends only within the examples that
    `position_ids` delimit (`real`: False for padding, see `segments`)."""
    _register()
    config = model.config
    previous = config._attn_implementation
    token = _current.set(segments(position_ids, real))
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _current.reset(token)
