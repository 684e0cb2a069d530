"""The one-node LoRA linear is an optimisation only: PEFT's loss and gradients, PEFT's saved adapter."""

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
from tuneforge.train.lora import fuse_lora
from tuneforge.train.loss import batch_loss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model(seed=0)
    examples = [
        Example("chat", [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        for q, a in [("What is 2+2?", "4."), ("Name a colour.", "Blue, like the sea."), ("Say hi.", "Hi!")]
    ]
    return model, pack([render_example(e, tok) for e in examples], 4096, tok.pad_token_id)


def _lora(model, dropout=0.0):
    torch.manual_seed(0)
    m = prepare_for_training(copy.deepcopy(model), "lora", rank=4, alpha=8, dropout=dropout, targets=TARGETS)
    for name, p in m.named_parameters():  # B starts at zero: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return m


def _step(m, batch, dtype):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = batch_loss(m, batch)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_fused_lora_gives_peft_loss_and_gradients(tiny):
    model, batch = tiny
    peft_m, fused_m = _lora(model), _lora(model)
    assert fuse_lora(fused_m) == len(TARGETS) * 2  # every projection of both layers
    ref_loss, ref_grads = _step(peft_m, batch, None)
    loss, grads = _step(fused_m, batch, None)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 2 * len(TARGETS)
    assert loss == pytest.approx(ref_loss, rel=1e-6)  # fp32: the same products, summed in another order
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_fused_lora_under_bf16_is_as_close_to_fp32_as_peft(tiny):
    """Under bf16 autocast both round at different points; neither may stray further from fp32."""
    model, batch = tiny
    truth = _step(_lora(model), batch, None)
    runs = []
    for fuse in (False, True):
        m = _lora(model)
        prepare_for_autocast(m, torch.bfloat16)  # the training loop's set-up: frozen base in bf16
        if fuse:
            fuse_lora(m)
        runs.append(_step(m, batch, torch.bfloat16))
    assert_no_further_from(truth, *runs)


def test_fused_lora_saves_the_same_adapter(tiny, tmp_path):
    model, _ = tiny
    m = _lora(model)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    fuse_lora(m)
    assert m.state_dict().keys() == ref.keys()
    m.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_lora_with_dropout_keeps_peft_forward(tiny):
    model, _ = tiny
    assert fuse_lora(_lora(model, dropout=0.1)) == 0
