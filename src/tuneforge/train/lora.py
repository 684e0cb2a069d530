"""LoRA layers (PEFT's arithmetic, parameters and saved form, not its code), as one autograd node each.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` out of separate modules: under autocast
that is a cast of each adapter matrix and of the input, three matmuls, a multiply and an add in the
forward pass, and a dozen autograd nodes with their own casts and temporaries in the backward pass -
on a 135M model about a quarter of the step time, for 4% of its FLOPs. `_LoraLinear` does the same
arithmetic with the low-rank update accumulated into the base product (addmm) and a hand-written
backward pass: two small matmuls for the adapter gradients, one accumulated into the input gradient.

LoRA layers that read the same input (q/k/v, gate/up) run as one `_LoraGroup`. A layer with dropout
takes the plain three products. The parameter names are PEFT's, so an adapter saved from these layers
(models.adapters) is a PEFT adapter that PEFT, the server and export load as they are.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ..models.gguf import GgufLinear, GgufWeights
from ..models.quantize import Nf4Weights
from .device import compute_dtype, drop_file_pages, weights_file_maps

# Frozen weights kept packed (4-bit NF4, a GGUF file's blocks), de-quantised inside each product
PACKED = (Nf4Weights, GgufWeights)


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
    frozen W is a tensor or packed weights (`PACKED`): see `frozen`."""
    w, a_, b_ = frozen(weight, dtype), a.to(dtype), b.to(dtype)
    xa = x2 @ a_.T  # [tokens, rank]
    if bias is None:
        y = times_t(x2, w)
    elif isinstance(w, PACKED):
        y = times_t(x2, w).add_(bias.to(dtype))
    else:
        y = torch.addmm(bias.to(dtype), x2, w.T)
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
    itself, no copy, when it is stored in that dtype), or packed weights as they are (`PACKED`: they
    are de-quantised a layer or a stack at a time, within each product)."""
    return weight if isinstance(weight, PACKED) else weight.to(dtype)


def times_t(x, w):
    """x @ W.T for a frozen weight (`frozen`)."""
    return w.mm_t(x) if isinstance(w, PACKED) else x @ w.T


def times(g, w):
    """g @ W for a frozen weight (`frozen`)."""
    return w.mm(g) if isinstance(w, PACKED) else g @ w


def keep_weight(ctx, w):
    """A frozen weight (`frozen`) for save_for_backward: packed weights are not a tensor, so ctx holds
    them; `kept_weight` gives either back."""
    ctx.packed = w if isinstance(w, PACKED) else None
    return None if ctx.packed is not None else w


def kept_weight(ctx, w):
    return ctx.packed if ctx.packed is not None else w


def b_gradient(g, xa, scale):
    """scale * g.T @ xa ([out, rank]), made as (xa.T @ g).T: oneDNN takes [rank, tokens] x [tokens, out]
    in ~0.6x the time of [out, tokens] x [tokens, rank] (measured 100 vs 163 us at out=1536, 384
    tokens). A transposed view: cast it to the parameter's dtype with memory_format=contiguous_format,
    which transposes in the same copy."""
    return torch.mm(xa.T, g).mul_(scale).T


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trained low-rank update: base(x) + scale * B(A(dropout(x))).

    PEFT's LoRA layer, with PEFT's initialisation (A Kaiming-uniform, B zero: training starts from the
    base model) and parameter names (`base_layer`, `lora_A`, `lora_B`), so the adapter saved from it
    (models.adapters) is a PEFT adapter. Without dropout, over a plain frozen layer, it runs as one
    `_LoraLinear` node; with dropout, as the three products autograd differentiates itself."""

    def __init__(self, base, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.weight.device if base.weight.device.type != "meta" else None
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.stacked = None  # the frozen weights of its group, on a group's first layer (lora_group)

    @property
    def weight(self):
        """The frozen base weight (as PEFT's LoRA layers answer): a LoRA-adapted output layer is still
        the one train.device.prepare_for_autocast stores in bf16."""
        return self.base_layer.weight

    def forward(self, x):
        parts = lora_parts(self)
        if parts is None:
            return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return _LoraLinear.apply(x, *parts, compute_dtype(x))


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets) -> None:
    """Freeze `model` and put a LoRA layer over every linear layer named in `targets` (by its attribute
    name, as PEFT's target_modules match: "q_proj" is every layer's q_proj)."""
    model.requires_grad_(False)
    targets, adapted = set(targets), 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, (nn.Linear, GgufLinear)):  # a 4-bit layer is an nn.Linear
                setattr(parent, name, LoraLinear(child, rank, alpha, dropout))
                adapted += 1
    if not adapted:
        raise ValueError(f"lora_targets {sorted(targets)}: no linear layer of the model has any of these names")


def lora_config(model: nn.Module) -> dict | None:
    """PEFT's adapter_config.json fields for the LoRA layers of `model` (None without any)."""
    layers = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    if not layers:
        return None
    first = next(iter(layers.values()))
    rank = first.lora_A.weight.shape[0]
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    alpha = first.scaling * rank
    alpha = int(alpha) if alpha == int(alpha) else alpha
    return {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(layers)}


def lora_parts(module):
    """(weight, bias, A, B, scale) of a LoRA layer that runs as one `_LoraLinear` node - no dropout,
    over a plain frozen layer, a GGUF one, or a 4-bit one without bias -, None for any other module."""
    if not isinstance(module, LoraLinear) or not isinstance(module.lora_dropout, nn.Identity):
        return None
    base = module.base_layer
    if isinstance(base, GgufLinear):
        weight = base.weight
    elif _is_nf4(base) and base.bias is None:
        weight = Nf4Weights([base.weight])
    elif isinstance(base, nn.Linear) and not base.weight.requires_grad:
        weight = base.weight
    else:
        return None
    return weight, base.bias, module.lora_A.weight, module.lora_B.weight, module.scaling


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


def _is_nf4(layer) -> bool:
    """A bitsandbytes 4-bit layer (models.quantize.to_nf4 makes them); none unless it is imported."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(layer, bnb.nn.Linear4bit) and layer.weight.bnb_quantized


def lora_group(modules, mapped: list[tuple[int, int]]) -> bool:
    """Prepare LoRA layers that share their input (q/k/v, gate/up) to run as one `_LoraGroup`: their
    frozen weights become row blocks of one stacked matrix (views, no copy left behind), kept on the
    first. False, and nothing changed, if they can't (other modules, biases, different ranks) or
    already are one. `mapped`: the weights files' address ranges (train.device.weights_file_maps)."""
    if getattr(modules[0], "stacked", None) is not None:
        return False
    parts = [lora_parts(m) for m in modules]
    if any(p is None or p[1] is not None for p in parts):
        return False
    if len({m.lora_A.weight.shape[0] for m in modules}) != 1 or len({m.scaling for m in modules}) != 1:
        return False
    if any(_is_nf4(m.base_layer) for m in modules):  # 4-bit: each layer de-quantised in turn (Nf4Weights)
        if not all(_is_nf4(m.base_layer) for m in modules):
            return False
        modules[0].stacked = Nf4Weights([m.base_layer.weight for m in modules])
        return True
    if any(isinstance(m.base_layer, GgufLinear) for m in modules):  # GGUF blocks: stacked as blocks
        if len({getattr(m.base_layer, "kind", None) for m in modules}) != 1:
            return False
        stacked = GgufWeights.stack([m.base_layer.weight for m in modules])
        modules[0].stacked, start = stacked, 0
        for m in modules:  # each layer's blocks become views of the stack: no copy left behind
            m.base_layer.use(stacked.rows(start, start + m.out_features))
            start += m.out_features
        return True
    if len({m.base_layer.weight.dtype for m in modules}) != 1:
        return False
    stacked = torch.cat([m.base_layer.weight.detach() for m in modules])
    modules[0].stacked = stacked
    start = 0
    for m in modules:
        width = m.base_layer.weight.shape[0]
        old, m.base_layer.weight.data = m.base_layer.weight.data, stacked[start : start + width]
        drop_file_pages(old, mapped)  # fp32 weights are views of the weights file: its pages just read go back
        start += width
    return True


GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def group_layers(model: nn.Module) -> int:
    """Make every q/k/v and gate/up trio or pair of plain LoRA layers one group (`lora_group`); how many.
    Call it once the frozen weights are where and in the dtype they will stay (after .to(device) and
    train.device.prepare_for_autocast)."""
    n, mapped = 0, weights_file_maps()  # read once: /proc/self/maps takes ~1 ms, and there are 2 groups a layer
    for module in model.modules():
        for names in GROUPS:
            layers = [getattr(module, name, None) for name in names]
            if all(isinstance(m, LoraLinear) for m in layers) and lora_group(layers, mapped):
                n += 1
    return n


def run_group(modules, x):
    """(outputs side by side in one tensor, their widths) of LoRA layers that `lora_group` prepared,
    for input x; None if they were not."""
    stacked = getattr(modules[0], "stacked", None)
    if stacked is None:
        return None
    widths = tuple(m.out_features for m in modules)
    adapters = [t for m in modules for t in (m.lora_A.weight, m.lora_B.weight)]
    return _LoraGroup.apply(x, stacked, widths, modules[0].scaling, compute_dtype(x), *adapters), widths


def project(modules, x):
    """The outputs of linear layers that read the same input: one group's product when they are one."""
    grouped = run_group(modules, x)
    if grouped is None:
        return [m(x) for m in modules]
    y, widths = grouped
    return y.split(widths, dim=-1)

