"""Activation checkpointing is a memory trade only: same loss and gradients, far fewer saved bytes."""

from __future__ import annotations

import copy

import pytest
import torch

from tuneforge.data.example import Example
from tuneforge.data.pack import pack
from tuneforge.data.render import render_example
from tuneforge.models.adapters import prepare_for_training
from tuneforge.models.tiny import tiny_model
from tuneforge.train.fused import fuse_for_training
from tuneforge.train.loss import batch_loss
from tuneforge.train.recompute import recompute_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAIRS = [("What is 2+2?", "4."), ("Name a colour.", "Blue, like the sea."), ("Say hi.", "Hi!")]


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model(seed=0)
    examples = [Example("chat", [{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in PAIRS]
    # several examples in one row: the recomputed attention must again stay inside each of them
    return model, pack([render_example(e, tok) for e in examples], 4096, tok.pad_token_id)


def _model(model, method, recompute):
    torch.manual_seed(0)
    m = prepare_for_training(copy.deepcopy(model), method, rank=4, alpha=8, dropout=0.0, targets=TARGETS)
    for name, p in m.named_parameters():
        if "lora_B" in name:  # LoRA B starts at zero: make the adapters matter
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    m.train()
    fuse_for_training(m)
    if recompute:
        assert recompute_layers(m) == 2  # the tiny model's two decoder layers
    return m


def _step(m, batch):
    saved = []

    def pack_hook(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        out = batch_loss(m, batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return out.loss.item(), grads, sum(saved)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_recomputed_layers_give_the_same_loss_and_gradients(tiny, method):
    model, batch = tiny
    loss, grads, saved = _step(_model(model, method, False), batch)
    re_loss, re_grads, re_saved = _step(_model(model, method, True), batch)
    assert re_loss == pytest.approx(loss, rel=1e-6)
    assert re_grads.keys() == grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(re_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # the forward pass keeps each layer's input (and the loss's own tensors), not its activations
    assert re_saved < saved / 5
