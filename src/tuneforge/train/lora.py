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

import types

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear


class _LoraLinear(torch.autograd.Function):
    """y = x @ W.T (+ bias) + scale * (x @ A.T) @ B.T, all products in `dtype`; W and bias frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, dtype):
        with torch.autocast(x.device.type, enabled=False):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            w, a_, b_ = weight.to(dtype), a.to(dtype), b.to(dtype)
            xa = x2 @ a_.T  # [tokens, rank]
            y = torch.addmm(bias.to(dtype), x2, w.T) if bias is not None else x2 @ w.T
            y.addmm_(xa, b_.T, alpha=scale)
        ctx.save_for_backward(x2, xa, w, a_, b_)
        ctx.scale, ctx.shape, ctx.dtypes = scale, shape, (x.dtype, a.dtype, b.dtype)
        return y.view(*shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2, xa, w, a_, b_ = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        with torch.autocast(grad_y.device.type, enabled=False):
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(w.dtype)
            g_xa = (g @ b_).mul_(ctx.scale)  # [tokens, rank]
            grad_a = (g_xa.T @ x2).to(a_dtype)
            grad_b = (g.T @ xa).mul_(ctx.scale).to(b_dtype)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ w).addmm_(g_xa, a_).to(x_dtype).view(ctx.shape)
        return grad_x, None, None, grad_a, grad_b, None, None


def _fused_forward(self, x, *args, **kwargs):
    if self.disable_adapters or self.merged or args or kwargs:
        return PeftLoraLinear.forward(self, x, *args, **kwargs)
    (name,) = self.active_adapters
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    base = self.base_layer
    return _LoraLinear.apply(
        x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], dtype
    )


def _plain(module) -> bool:
    adapters = list(module.active_adapters)
    if len(adapters) != 1 or adapters[0] in module.lora_variant:
        return False
    name = adapters[0]
    return (
        isinstance(module.lora_dropout[name], torch.nn.Identity)
        and type(module.base_layer) is torch.nn.Linear
        and not module.base_layer.weight.requires_grad
        and module.lora_A[name].bias is None
        and module.lora_B[name].bias is None
    )


def fuse_lora(model: torch.nn.Module) -> int:
    """Give every plain PEFT LoRA linear of `model` the one-node forward; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear and _plain(module):
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
