"""Llama-family layers as single autograd nodes, for training speed and memory (train.model uses them).

Under bf16 autocast, transformers' eager layers spend a step mostly outside the matmuls: RMSNorm is six
elementwise passes in fp32 whose output every projection then casts to bf16 again (q, k and v each
make their own copy), and SwiGLU keeps three [tokens, 3 x width] tensors for its backward pass. On a
135M model that is ~40 KB of saved activations per token per layer, and as much time as the matmuls.

- `_RMSNorm` hands the consumers the bf16 tensor they would have cast its output to (so q/k/v or
  gate/up share one input); it keeps only its normalised input in bf16 and the per-token scale for
  the backward pass, and a LoRA group reading its output makes that output again from them rather
  than keeping it.
- `_SwiGLU` keeps just its two bf16 inputs and recomputes silu(gate) in the backward pass.
- `_Rotary` applies rotary embeddings in two passes each way (transformers: five), in the layout packed
  attention gathers from.
- Plain LoRA q/k/v and gate/up run as one `train.lora._LoraGroup` each: the rank-16 products are
  latency-bound on a CPU, so fewer and wider ones pay (~9% a LoRA step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .device import compute_dtype
from .lora import keep_weight, kept_weight, lora_gradients, lora_parts, lora_product, run_group


class _RMSNorm(torch.autograd.Function):
    """weight * x / rms(x), in fp32, returned in `dtype` (what the next matmul would cast it to),
    with the normalised input x / rms(x) in `dtype` as a second, non-differentiable output.

    The backward pass keeps x / rms(x) rounded to `dtype` and 1 / rms(x), not the fp32 input: half
    the bytes of the residual stream, twice per layer (in fp32 training, nothing changes). The output
    is made from that rounded x / rms(x) too, so the backward pass differentiates exactly what the
    forward pass computed, and a LoRA group can make its input again bit for bit (`normalized`): under
    bf16 autocast an element of the output may differ from transformers' (which rounds once, after
    the weight) by one bf16 rounding step."""

    @staticmethod
    def forward(ctx, x, weight, eps, dtype):
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            xhat = torch.mul(xf, rstd, out=torch.empty(xf.shape, dtype=dtype, device=xf.device))  # one pass
            y = normalized(xhat, weight, dtype)
        ctx.save_for_backward(xhat, weight, rstd)
        ctx.x_dtype = x.dtype
        ctx.mark_non_differentiable(xhat)
        return y, xhat

    @staticmethod
    def backward(ctx, grad_y, _grad_xhat):
        xhat, weight, rstd = ctx.saved_tensors
        with torch.autocast(xhat.device.type, enabled=False):
            xf = xhat.float()
            gw = grad_y * weight.float()  # fp32 (grad_y is in the compute dtype)
            # d/dx of x * rstd(x): rstd * (gw - xhat * mean(gw * xhat)): the row dot product is one
            # pass, as a batched matrix product, with no temporary
            dot = torch.einsum("...i,...i->...", gw, xf).unsqueeze(-1).div_(xf.shape[-1])
            grad_x = gw.addcmul_(xf, dot, value=-1).mul_(rstd).to(ctx.x_dtype)
            grad_w = None
            if ctx.needs_input_grad[1]:
                grad_w = (grad_y.float() * xf).reshape(-1, xf.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None, None


def normalized(xhat, weight, dtype):
    """The norm's output from its normalised input (as the norm's backward pass keeps it): in the
    forward pass, and again in a LoRA group's backward pass (`train.lora`)."""
    return torch.mul(xhat, weight, out=torch.empty(xhat.shape, dtype=dtype, device=xhat.device))  # in fp32, one pass


class RMSNorm(torch.nn.Module):
    """weight * x / rms(x) as one `_RMSNorm` node (transformers' LlamaRMSNorm: same parameter, same
    arithmetic in fp32)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width))
        self.variance_epsilon = eps

    def forward(self, x):
        y, xhat = _RMSNorm.apply(x, self.weight, self.variance_epsilon, compute_dtype(x))
        # What it was made from: a LoRA group reading y keeps these instead of y itself, and makes y
        # again when its backward pass needs it (train.lora._LoraGroup) - when the norm keeps xhat
        # anyway, i.e. it is in the autograd graph (not the first layer's, whose input and weight are
        # frozen in LoRA).
        if y.requires_grad:
            y._tuneforge_norm = (normalized, xhat, self.weight)
        return y


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for the backward pass."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        _swiglu_backward(grad, gate, up, grad_gate, grad_up)
        return grad_gate, grad_up


class _StackedSwiGLU(torch.autograd.Function):
    """silu(gate) * up for gate and up side by side in one tensor (a LoRA group's output): its
    gradient is written into one tensor of the same layout, where split() + two gradients would make
    autograd concatenate them (a copy of [tokens, 2 x width] per layer)."""

    @staticmethod
    def forward(ctx, gate_up, width):
        ctx.save_for_backward(gate_up)
        ctx.width = width
        return F.silu(gate_up[..., :width]) * gate_up[..., width:]

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        w = ctx.width
        grad_gate_up = torch.empty_like(gate_up)
        _swiglu_backward(grad, gate_up[..., :w], gate_up[..., w:], grad_gate_up[..., :w], grad_gate_up[..., w:])
        return grad_gate_up, None


class _SwiGLUDown(torch.autograd.Function):
    """A LoRA MLP's second half as one node: silu(gate) * up from the gate/up group's output, then the
    plain LoRA down projection of it (`train.lora._LoraLinear`'s arithmetic). The product silu(gate) *
    up - the down projection's input, [tokens, intermediate] - is not kept for the backward pass but
    made again there from gate_up, which is kept anyway, next to the silu(gate) the SwiGLU gradient
    needs: one multiplication instead of 3 bytes per token per intermediate unit per layer (about a
    tenth of a LoRA step's saved activations)."""

    @staticmethod
    def forward(ctx, gate_up, width, weight, bias, a, b, scale, dtype):
        with torch.autocast(gate_up.device.type, enabled=False):
            shape = gate_up.shape
            gate_up2 = gate_up.reshape(-1, shape[-1]).to(dtype)
            act = F.silu(gate_up2[:, :width]) * gate_up2[:, width:]
            y, (xa, w, a_, b_) = lora_product(act, weight, bias, a, b, scale, dtype)
        ctx.save_for_backward(gate_up2, xa, keep_weight(ctx, w), a_, b_)
        ctx.width, ctx.scale, ctx.shape, ctx.dtypes = width, scale, shape, (gate_up.dtype, a.dtype, b.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        gate_up, xa, w, a_, b_ = ctx.saved_tensors
        width = ctx.width
        gate_up_dtype, a_dtype, b_dtype = ctx.dtypes
        with torch.autocast(grad_y.device.type, enabled=False):
            saved = (xa, kept_weight(ctx, w), a_, b_)
            g_xa, grad_b, grad_act = lora_gradients(grad_y, saved, ctx.scale, True)
            gate, up = gate_up[:, :width], gate_up[:, width:]
            silu = F.silu(gate)
            grad_a = (g_xa.T @ (silu * up)).to(a_dtype)  # the input, made again
            grad_gate_up = torch.empty_like(gate_up)
            _swiglu_backward(grad_act, gate, up, grad_gate_up[:, :width], grad_gate_up[:, width:], silu)
        grad_gate_up = grad_gate_up.to(gate_up_dtype).view(ctx.shape)
        return grad_gate_up, None, None, None, grad_a, grad_b.to(b_dtype, memory_format=torch.contiguous_format), None, None


def _swiglu_backward(grad, gate, up, grad_gate, grad_up, silu=None) -> None:
    # the same fused kernels autograd would run, plus silu(gate) recomputed (or handed in) instead of kept
    torch.mul(grad, F.silu(gate) if silu is None else silu, out=grad_up)
    torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)


def swiglu_mlp(gate, up, down, x):
    """down(silu(gate(x)) * up(x)): gate and up as one LoRA group when they are one (train.lora), then
    the down projection fused with SwiGLU when it is a plain LoRA layer."""
    grouped = run_group([gate, up], x)
    if grouped is None:
        return down(_SwiGLU.apply(gate(x), up(x)))
    both, widths = grouped
    parts = lora_parts(down)
    if parts is not None:
        return _SwiGLUDown.apply(both, widths[0], *parts, compute_dtype(both))
    return down(_StackedSwiGLU.apply(both, widths[0]))


class _Rotary(torch.autograd.Function):
    """transformers' apply_rotary_pos_emb for one of q or k: x * cos + rotate_half(x) * sin, in fp32
    (cos and sin are fp32: what transformers computes too), in two passes where transformers makes five
    (and five again backward). The output is laid out [rows, length, heads, dim] in memory, the layout
    packed attention gathers from, so it needs no transposing copy there. Measured +3.7% a LoRA step
    (benchmarks/step_ab.py).

    x: [rows, heads, length, dim] (a view of the q/k/v projection); cos, sin: [rows, length, dim].
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        rows, heads, length, dim = x.shape
        half = dim // 2
        out = torch.empty(rows, length, heads, dim, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
        out = out.transpose(1, 2)
        torch.mul(x, c, out=out)
        out[..., :half].addcmul_(x[..., half:], s[..., :half], value=-1)  # rotate_half: (-x2, x1)
        out[..., half:].addcmul_(x[..., :half], s[..., half:])
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        half = grad.shape[-1] // 2
        g = grad * c
        g[..., :half].addcmul_(grad[..., half:], s[..., half:])
        g[..., half:].addcmul_(grad[..., :half], s[..., :half], value=-1)
        return g.to(ctx.x_dtype), None, None


def rotary(x, cos, sin):
    """x rotated by the positions' angles (`_Rotary`)."""
    return _Rotary.apply(x, cos, sin)
