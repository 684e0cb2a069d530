"""Fused norms and MLPs are an optimisation only: transformers' loss and gradients, for LoRA and full."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import assert_no_further_from
from tuneforge.data.example import Example
from tuneforge.data.pack import pack
from tuneforge.data.render import render_example
from tuneforge.models.adapters import prepare_for_training
from tuneforge.models.tiny import tiny_model
from tuneforge.train.device import prepare_for_autocast
from tuneforge.train.fused import fuse_for_training
from tuneforge.train.loss import batch_loss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model(seed=0)
    for name, p in model.named_parameters():  # norms start at one: make their weights matter
        if "norm" in name:
            torch.nn.init.normal_(p, mean=1.0, std=0.2)
    examples = [
        Example("chat", [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        for q, a in [("What is 2+2?", "4."), ("Name a colour.", "Blue, like the sea."), ("Say hi.", "Hi!")]
    ]
    return model, pack([render_example(e, tok) for e in examples], 4096, tok.pad_token_id)


def _model(model, method):
    torch.manual_seed(0)  # LoRA A is initialised from the global generator
    m = prepare_for_training(copy.deepcopy(model), method, rank=4, alpha=8, dropout=0.0, targets=TARGETS)
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    return m


def _step(m, batch, dtype):
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = batch_loss(m, batch)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fused_layers_give_transformers_loss_and_gradients(tiny, method):
    model, batch = tiny
    plain, fused = _model(model, method), _model(model, method)
    counts = fuse_for_training(fused)
    assert counts["norm"] == 2 * 2 + 1 and counts["mlp"] == 2  # two per layer and the final norm
    assert counts["lora"] == (2 * len(TARGETS) if method == "lora" else 0)
    assert counts["groups"] == (2 * 2 if method == "lora" else 0)  # q/k/v and gate/up of each layer
    ref_loss, ref_grads = _step(plain, batch, None)
    loss, grads = _step(fused, batch, None)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    if method == "full":
        assert any("norm" in n for n in grads)  # trained norm weights get their gradient too
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fused_layers_under_bf16_are_as_close_to_fp32_as_transformers(tiny, method):
    """bf16 rounds at other points in each; the fused one may not stray further from fp32."""
    model, batch = tiny
    truth = _step(_model(model, method), batch, None)
    runs = []
    for fuse in (False, True):
        m = _model(model, method)
        prepare_for_autocast(m, torch.bfloat16)  # the training loop's set-up
        if fuse:
            fuse_for_training(m)
        runs.append(_step(m, batch, torch.bfloat16))
    assert_no_further_from(truth, *runs)


def test_other_architectures_keep_their_forward():
    norm = torch.nn.RMSNorm(8)  # not one of the transformers classes the fusions were written against
    model = torch.nn.Sequential(norm, torch.nn.Linear(8, 8))
    assert fuse_for_training(model) == {"norm": 0, "mlp": 0, "groups": 0, "lora": 0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_transformers_rotary(dtype):
    """Same output; in bf16 the input gradient is rounded once (transformers rounds each of its two
    terms, then adds them in bf16), so it may only be closer to the fp32 gradient."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from tuneforge.train.fused import _Rotary

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 7, 3 * 4 * 8, generator=g).to(dtype)  # [rows, length, 3 heads x 4 x dim 8]
    angles = torch.randn(2, 7, 4, generator=g)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()  # fp32, as transformers
    grad = torch.randn(2, 4, 7, 8, generator=g)

    def run(rotary, inputs):
        leaf = inputs.clone().requires_grad_()
        x = leaf.view(2, 7, 3, 4, 8)[:, :, 1].transpose(1, 2)  # the middle third, as q/k are views of q/k/v
        out = rotary(x)
        out.backward(grad)
        return out, leaf.grad

    transformers_rotary = lambda x: apply_rotary_pos_emb(x, x, cos, sin)[0]  # noqa: E731
    ref, ref_grad = run(transformers_rotary, qkv)
    out, out_grad = run(lambda x: _Rotary.apply(x, cos, sin), qkv)
    assert out.dtype == ref.dtype == torch.float32 and out_grad.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(out_grad, ref_grad, rtol=1e-6, atol=1e-6)
        return
    _, truth = run(transformers_rotary, qkv.float())
    assert (out_grad.float() - truth).norm() <= (ref_grad.float() - truth).norm()


def _saved_bytes(m, batch) -> int:
    """Bytes the autograd graph keeps for the backward pass (each storage once), and run it."""
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = batch_loss(m, batch)
    out.loss.backward()
    return sum(storages.values())


def test_a_lora_group_makes_its_normalised_input_again_instead_of_keeping_it(tiny):
    model, batch = tiny
    remade, kept = _model(model, "lora"), _model(model, "lora")
    fuse_for_training(remade), fuse_for_training(kept)
    prepare_for_autocast(remade, torch.bfloat16), prepare_for_autocast(kept, torch.bfloat16)
    for m in kept.modules():  # the norms' outputs without what they were made from: groups keep them
        if type(m).__name__ == "LlamaRMSNorm":
            m.forward = lambda h, fwd=m.forward: _without_source(fwd(h))
    remade_bytes, kept_bytes = _saved_bytes(remade, batch), _saved_bytes(kept, batch)
    # two groups a layer, each not keeping a [tokens, hidden] bf16 input - but the first layer's q/k/v,
    # whose norm is not in the graph (frozen input and weight) and keeps nothing to make it from
    tokens, hidden, layers = batch.input_ids.numel(), model.config.hidden_size, model.config.num_hidden_layers
    assert kept_bytes - remade_bytes == (2 * layers - 1) * tokens * hidden * 2
    for (name, p), (_, q) in zip(remade.named_parameters(), kept.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), name  # made again bit for bit


def _without_source(y):
    y.__dict__.pop("_tuneforge_norm", None)
    return y
