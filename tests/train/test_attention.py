"""The packed-attention kernels are SDPA's causal grouped-query attention, written out for speed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuneforge.train import attention
from tuneforge.train.attention import _BlockedCausalAttention, _ShortCausalAttention

KERNELS = {"short": _ShortCausalAttention.apply, "blocked": _BlockedCausalAttention.apply}


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(attention, "BLOCK", 4)  # w=11: three query blocks, the last one partial


def _inputs(dtype, n=3, heads=6, kv=2, w=11, dim=16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, w, dim, generator=g) for h in (heads, kv, kv))
    grad = torch.randn(n, heads, w, dim, generator=g)
    return [t.to(dtype) for t in (q, k, v)], grad.to(dtype)


def _run(attention, dtype):
    (q, k, v), grad = _inputs(dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, 0.3)  # not a power of two: the scale is really applied
    out.backward(grad)
    return [t.float() for t in (out, q.grad, k.grad, v.grad)]


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("kernel", KERNELS)
def test_equals_sdpa_in_fp32(kernel):
    for ours, ref in zip(_run(KERNELS[kernel], torch.float32), _run(_sdpa, torch.float32)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("part", range(4))  # output, then the gradients of q, k and v
def test_bf16_is_no_further_from_fp32_than_sdpa_in_bf16(part, kernel):
    truth = _run(_sdpa, torch.float32)[part]
    ours = _run(KERNELS[kernel], torch.bfloat16)[part]
    sdpa = _run(_sdpa, torch.bfloat16)[part]
    err = lambda x: ((x - truth).norm() / truth.norm()).item()  # noqa: E731
    assert err(ours) <= max(1.5 * err(sdpa), 1e-2)


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_query_sees_a_later_key(kernel):
    (q, k, v), _ = _inputs(torch.float32)
    out = KERNELS[kernel](q, k, v, 0.3)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:], v2[:, :, 5:] = 100.0, -100.0  # change every key and value from position 5 on
    out2 = KERNELS[kernel](q, k2, v2, 0.3)
    torch.testing.assert_close(out2[:, :, :5], out[:, :, :5], rtol=0, atol=0)
    assert not torch.allclose(out2[:, :, 5:], out[:, :, 5:])


@pytest.mark.parametrize("kernel", KERNELS)
def test_keeps_no_scores_for_the_backward_pass(kernel):
    """Both kernels make the [w, w] probabilities again in the backward pass: what they keep is q, k
    and v (in their own layouts), linear in the slot width."""
    (q, k, v), _ = _inputs(torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        KERNELS[kernel](q, k, v, 0.3)
    assert sum(kept) == q.numel() + k.numel() + v.numel()
