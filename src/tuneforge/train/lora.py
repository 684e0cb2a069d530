"""LoRA linear layers as one autograd node each, for training speed.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` out of separate modules: under autocast
that is a cast of each adapter matrix and of the input, three matmuls, a multiply and an add in the
forward pass, and a dozen autograd nodes with their own casts and temporaries in the backward pass -
on a 135M model about a quarter of the step time, for 4% of its FLOPs. `_LoraLinear` does the same
arithmetic with the low-rank update accumulated into the base product (addmm) and a hand-written
backward pass: two small matmuls for the adapter gradients, one accumulated into the input gradient.

Only plain LoRA is taken over (one active adapter, no dropout, no DoRA or other variant, not merged);
anything else keeps PEFT's forward. Parameters, state dicts and saved adapters are PEFT's, unchanged.
"""

from __future__ import annotations

import sys
import types

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from ..models.quantize import Nf4Weights
from .device import compute_dtype


class _LoraLinear(torch.autograd.Function):
    """y = x @ W.T (+ bias) + scale * (x @ A.T) @ B.T, all products in `dtype`; W and bias frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, dtype):
        with torch.autocast(x.device.type, enabled=False):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            y, saved = lora_product(x2, weight, bias, a, b, scale, dtype)
        xa, w, a_, b_ = saved
        ctx.save_for_backward(x2, xa, keep_weight(ctx, w), a_, b_)
        ctx.scale, ctx.shape, ctx.dtypes = scale, shape, (x.dtype, a.dtype, b.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, xa, w, a_, b_ = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        with torch.autocast(grad_y.device.type, enabled=False):
            saved = (xa, kept_weight(ctx, w), a_, b_)
            g_xa, grad_b, grad_x = lora_gradients(grad_y, saved, ctx.scale, ctx.needs_input_grad[0])
            grad_a = (g_xa.T @ x2).to(a_dtype)
            if grad_x is not None:
                grad_x = grad_x.to(x_dtype).view(ctx.shape)
        return grad_x, None, None, grad_a, grad_b.to(b_dtype, memory_format=torch.contiguous_format), None, None


def lora_product(x2, weight, bias, a, b, scale, dtype):
    """x2 @ W.T (+ bias) + scale * (x2 @ A.T) @ B.T with every product in `dtype` (x2: [tokens, in],
    already in `dtype`); returns it and what `lora_gradients` needs: (xa, W, A, B) in `dtype`. The
    frozen W is a tensor or 4-bit weights (models.quantize.Nf4Weights): see `frozen`."""
    w, a_, b_ = frozen(weight, dtype), a.to(dtype), b.to(dtype)
    xa = x2 @ a_.T  # [tokens, rank]
    if bias is not None:
        y = torch.addmm(bias.to(dtype), x2, w.T)  # (4-bit layers with a bias are not fused: _plain)
    else:
        y = times_t(x2, w)
    y.addmm_(xa, b_.T, alpha=scale)
    return y, (xa, w, a_, b_)


def lora_gradients(grad_y, saved, scale, input_grad: bool):
    """For `lora_product`'s output gradient: (scale * grad_y @ B - what A's gradient is made of, with
    the input -, B's gradient, the input's gradient or None), in the product dtype. B's gradient is a
    transposed view: see b_gradient."""
    xa, w, a_, b_ = saved
    g = grad_y.reshape(-1, grad_y.shape[-1]).to(a_.dtype)
    g_xa = (g @ b_).mul_(scale)  # [tokens, rank]
    grad_b = b_gradient(g, xa, scale)
    grad_x = times(g, w).addmm_(g_xa, a_) if input_grad else None
    return g_xa, grad_b, grad_x


def frozen(weight, dtype):
    """A frozen weight as `times_t` and `times` multiply by it: a tensor in `dtype` (the parameter
    itself, no copy, when it is stored in that dtype), or 4-bit weights as they are (Nf4Weights
    de-quantises them a layer at a time, within each product)."""
    return weight if isinstance(weight, Nf4Weights) else weight.to(dtype)


def times_t(x, w):
    """x @ W.T for a frozen weight (`frozen`)."""
    return w.mm_t(x) if isinstance(w, Nf4Weights) else x @ w.T


def times(g, w):
    """g @ W for a frozen weight (`frozen`)."""
    return w.mm(g) if isinstance(w, Nf4Weights) else g @ w


def keep_weight(ctx, w):
    """A frozen weight (`frozen`) for save_for_backward: 4-bit weights are not a tensor, so ctx holds
    them; `kept_weight` gives either back."""
    ctx.nf4 = w if isinstance(w, Nf4Weights) else None
    return None if ctx.nf4 is not None else w


def kept_weight(ctx, w):
    return ctx.nf4 if ctx.nf4 is not None else w


def b_gradient(g, xa, scale):
    """scale * g.T @ xa ([out, rank]), made as (xa.T @ g).T: oneDNN takes [rank, tokens] x [tokens, out]
    in ~0.6x the time of [out, tokens] x [tokens, rank] (measured 100 vs 163 us at out=1536, 384
    tokens). A transposed view: cast it to the parameter's dtype with memory_format=contiguous_format,
    which transposes in the same copy."""
    return torch.mm(xa.T, g).mul_(scale).T


def _fused_forward(self, x, *args, **kwargs):
    parts = None if args or kwargs else lora_parts(self)
    if parts is None:
        return type(self).forward(self, x, *args, **kwargs)
    return _LoraLinear.apply(x, *parts, compute_dtype(x))


def lora_parts(module):
    """(weight, bias, A, B, scale) of a LoRA linear that fuse_lora took over, while its adapter is on
    and not merged into the weight; None otherwise (then PEFT's own forward is the one to run)."""
    taken = getattr(getattr(module, "forward", None), "__func__", None) is _fused_forward
    if not taken or module.disable_adapters or module.merged:
        return None
    (name,) = module.active_adapters
    base = module.base_layer
    weight = Nf4Weights([base.weight]) if _is_nf4(base) else base.weight
    return weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]


def _plain(module) -> bool:
    adapters = list(module.active_adapters)
    if len(adapters) != 1 or adapters[0] in module.lora_variant:
        return False
    name = adapters[0]
    base = module.base_layer
    return (
        isinstance(module.lora_dropout[name], torch.nn.Identity)
        and ((type(base) is torch.nn.Linear and not base.weight.requires_grad) or (_is_nf4(base) and base.bias is None))
        and module.lora_A[name].bias is None
        and module.lora_B[name].bias is None
    )


def _is_nf4(layer) -> bool:
    """A bitsandbytes 4-bit layer (models.quantize.to_nf4 makes them); none unless it is imported."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(layer, bnb.nn.Linear4bit) and layer.weight.bnb_quantized


def _is_lora_linear(module) -> bool:
    """PEFT's LoRA linear layer, over a plain linear or (peft.tuners.lora.bnb, loaded by PEFT when
    bitsandbytes is installed) over a 4-bit one."""
    bnb_lora = sys.modules.get("peft.tuners.lora.bnb")
    return type(module) is PeftLoraLinear or type(module) is getattr(bnb_lora, "Linear4bit", None)


def fuse_lora(model: torch.nn.Module) -> int:
    """Give every plain PEFT LoRA linear of `model` the one-node forward; returns how many."""
    n = 0
    for module in model.modules():
        if _is_lora_linear(module) and _plain(module):
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n


class _LoraGroup(torch.autograd.Function):
    """Several plain LoRA linears that read the same input (q/k/v, gate/up), as one node.

    One product with the frozen weights stacked ([sum of widths, in]), one with the stacked A matrices,
    and in the backward pass one input-gradient product for all of them: 3 (or 2) times fewer small,
    latency-bound ops and autograd nodes than one `_LoraLinear` each. Returns the outputs side by side
    in one tensor; the caller splits it (whose backward is a single concatenation).

    When the input is a fused RMSNorm's output (`train.fused`), it is not kept for the backward pass
    but made again there, bit for bit, from what the norm keeps anyway (its normalised input): 2 bytes
    per token per input width less per group, a seventh of a LoRA step's saved activations, for one
    elementwise pass.
    """

    @staticmethod
    def forward(ctx, x, weight, widths, scale, dtype, *adapters):
        with torch.autocast(x.device.type, enabled=False):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            norm = getattr(x, "_tuneforge_norm", None)
            ctx.remake = None
            if norm is not None and x.dtype == dtype:
                ctx.remake, kept = norm[0], norm[1:]
            a_all = torch.cat([a.to(dtype) for a in adapters[0::2]])  # [n * rank, in]
            bs = [b.to(dtype) for b in adapters[1::2]]
            rank = a_all.shape[0] // len(bs)
            xa = x2 @ a_all.T  # [tokens, n * rank]
            w = frozen(weight, dtype)
            y = times_t(x2, w)
            start = 0
            for i, (width, b) in enumerate(zip(widths, bs)):
                y[:, start : start + width].addmm_(xa[:, i * rank : (i + 1) * rank], b.T, alpha=scale)
                start += width
        inputs = kept if ctx.remake else (x2,)
        ctx.save_for_backward(*inputs, xa, keep_weight(ctx, w), a_all, *bs)
        ctx.n_inputs, ctx.dtype = len(inputs), dtype
        ctx.scale, ctx.shape, ctx.widths, ctx.rank = scale, shape, widths, rank
        ctx.dtypes = (x.dtype, [t.dtype for t in adapters])
        return y.view(*shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors
        inputs, (xa, weight, a_all, *bs) = saved[: ctx.n_inputs], saved[ctx.n_inputs :]
        x_dtype, adapter_dtypes = ctx.dtypes
        rank, scale = ctx.rank, ctx.scale
        with torch.autocast(grad_y.device.type, enabled=False):
            weight = kept_weight(ctx, weight)
            x2 = ctx.remake(*inputs, ctx.dtype) if ctx.remake else inputs[0]
            x2 = x2.reshape(-1, x2.shape[-1])
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(a_all.dtype)
            pieces = g.split(list(ctx.widths), dim=1)
            g_xa = torch.cat([p @ b for p, b in zip(pieces, bs)], dim=1).mul_(scale)  # [tokens, n * rank]
            grad_a = (g_xa.T @ x2).split(rank)
            grads = []
            for i, (p, a_grad) in enumerate(zip(pieces, grad_a)):
                grads.append(a_grad.to(adapter_dtypes[2 * i]))
                grad_b = b_gradient(p, xa[:, i * rank : (i + 1) * rank], scale)
                grads.append(grad_b.to(adapter_dtypes[2 * i + 1], memory_format=torch.contiguous_format))
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = times(g, weight).addmm_(g_xa, a_all).to(x_dtype).view(ctx.shape)
        return (grad_x, None, None, None, None, *grads)


def lora_group(modules) -> bool:
    """Prepare plain LoRA linears that share their input to run as one `_LoraGroup`: their frozen
    weights become row blocks of one stacked matrix (views, no copy left behind). False if they can't."""
    if not all(_is_lora_linear(m) and _plain(m) and m.base_layer.bias is None for m in modules):
        return False
    names = [m.active_adapters[0] for m in modules]
    ranks = {m.lora_A[n].weight.shape[0] for m, n in zip(modules, names)}
    scales = {m.scaling[n] for m, n in zip(modules, names)}
    dtypes = {m.base_layer.weight.dtype for m in modules}
    if len(set(names)) != 1 or len(ranks) != 1 or len(scales) != 1 or len(dtypes) != 1:
        return False
    if any(_is_nf4(m.base_layer) for m in modules):  # 4-bit: each layer de-quantised in turn (Nf4Weights)
        if not all(_is_nf4(m.base_layer) for m in modules):
            return False
        modules[0]._tuneforge_stacked = Nf4Weights([m.base_layer.weight for m in modules])
        return True
    stacked = torch.cat([m.base_layer.weight.detach() for m in modules])
    modules[0]._tuneforge_stacked = stacked
    start = 0
    for m in modules:
        width = m.base_layer.weight.shape[0]
        m.base_layer.weight.data = stacked[start : start + width]
        start += width
    return True


def run_group(modules, x):
    """The outputs of `modules` (prepared by lora_group) for input x, side by side in one tensor."""
    widths = tuple(m.base_layer.out_features for m in modules)
    stacked = modules[0]._tuneforge_stacked
    name = modules[0].active_adapters[0]
    adapters = [t for m in modules for t in (m.lora_A[name].weight, m.lora_B[name].weight)]
    return _LoraGroup.apply(x, stacked, widths, modules[0].scaling[name], compute_dtype(x), *adapters), widths
