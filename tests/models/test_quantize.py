"""QLoRA: a base kept in 4 bits (bitsandbytes NF4) trains LoRA adapters that serve on the plain base."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import write_chat
from tuneforge.data.pack import pack
from tuneforge.data.render import render_example
from tuneforge.data.validate import load_examples
from tuneforge.evaluate.metrics import evaluate_loss
from tuneforge.models.adapters import prepare_for_training
from tuneforge.models.load import load_base, load_tuned
from tuneforge.train.config import TrainConfig
from tuneforge.train.device import prepare_for_autocast
from tuneforge.train.loop import _split, train
from tuneforge.train.lora import group_layers
from tuneforge.train.loss import batch_loss
from tuneforge.train.model import load_for_training

bnb = pytest.importorskip("bitsandbytes")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_grads(model, batch) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    batch_loss(model, batch).loss.backward()
    return [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]


def _batch(tmp_path, tok):
    examples = load_examples(str(write_chat(tmp_path / "t.jsonl", 10)), tok, 256)[:4]
    rendered = [render_example(e, tok, 256) for e in examples]
    return rendered, pack(rendered, 1024, tok.pad_token_id)


def _randomise_b(model):
    with torch.no_grad():  # B starts at zero, so only A's gradients depend on what flows through the base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)


def test_the_base_is_stored_in_four_bits_and_gradients_survive_a_validation_pass(tmp_path):
    model, tok = load_for_training("tiny-llama", quantize="nf4", compute_dtype=torch.float32)
    linears = [m for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) and m.weight.dtype == torch.uint8 for m in linears)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the output layer keeps its precision
    model = prepare_for_training(model, "lora", rank=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"])
    model.train()
    prepare_for_autocast(model, None)
    group_layers(model)
    rendered, batch = _batch(tmp_path, tok)
    _randomise_b(model)
    before = _lora_grads(model, batch)
    # A validation pass (eval mode, no gradients) must not change how the frozen layers are multiplied:
    # bitsandbytes would re-pack their weights on a CPU for a kernel without a backward pass.
    evaluate_loss(model, rendered, pad_id=tok.pad_token_id)
    model.train()
    after = _lora_grads(model, batch)
    assert all(g.abs().sum() > 0 for g in before)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)


def test_lora_over_a_four_bit_base_gives_peft_bitsandbytes_loss_and_gradients(tmp_path):
    """train.lora runs 4-bit layers as it runs plain ones: the same arithmetic as PEFT's bitsandbytes
    LoRA layers (de-quantise, multiply), in fewer nodes, keeping no de-quantised weight."""
    from peft import LoraConfig, get_peft_model

    ours, tok = load_for_training("tiny-llama", quantize="nf4", compute_dtype=torch.float32)
    torch.manual_seed(0)
    ours = prepare_for_training(ours, "lora", rank=4, alpha=8, dropout=0.0, targets=TARGETS)
    _randomise_b(ours)
    assert group_layers(ours) == 4  # q/k/v and gate/up of both layers
    peft_model, _ = load_base("tiny-llama", quantize="nf4", compute_dtype=torch.float32)
    peft_model = get_peft_model(peft_model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    adapters = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(adapters[n.replace("base_model.model.", "").replace(".default", "")])
    _, batch = _batch(tmp_path, tok)
    runs = []
    for model in (peft_model, ours):
        model.zero_grad(set_to_none=True)
        out = batch_loss(model, batch)
        out.loss.backward()
        runs.append((out.loss.item(), {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                                       for n, p in model.named_parameters() if p.grad is not None}))
    (ref_loss, ref_grads), (loss, grads) = runs
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 2 * len(TARGETS)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-6, msg=name)


def test_a_qlora_run_learns_and_its_adapter_serves_on_the_plain_base(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 24)
    result = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), base="tiny-llama", quantize="nf4",
                               n_epochs=3, batch_size=4))
    assert result.config["quantize"] == "nf4"
    assert result.final["valid_loss"] < result.baseline["loss"]
    # served as QLoRA adapters are: on the unquantised base
    model, tok = load_tuned(tmp_path / "run", dtype=torch.float32)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    rendered = [render_example(e, tok, 256) for e in _held_out(tmp_path / "run", tok)]
    served = evaluate_loss(model, rendered, pad_id=tok.pad_token_id)["loss"]
    assert abs(served - result.final["valid_loss"]) < 0.25 * result.final["valid_loss"]


def _held_out(run_dir, tok):
    cfg = TrainConfig.load(run_dir)
    return _split(load_examples(cfg.data, tok, cfg.max_length), cfg, tok)[1]


@pytest.mark.parametrize("kw, says", [
    (dict(method="full", quantize="nf4"), "method lora"),
    (dict(quantize="int8"), "nf4"),
])
def test_impossible_quantization_is_refused_by_name(kw, says):
    with pytest.raises(ValueError, match="quantize") as e:
        TrainConfig(data="d.jsonl", out="o", **kw)
    assert says in str(e.value)


def test_a_stopped_qlora_run_resumes_to_the_same_run(tmp_path):
    from tuneforge.train import metrics as metrics_log
    from tuneforge.train.loop import TrainingStopped

    data = write_chat(tmp_path / "train.jsonl", 24)
    config = lambda name: TrainConfig(data=str(data), out=str(tmp_path / name), base="tiny-llama",  # noqa: E731
                                      quantize="nf4", n_epochs=2, batch_size=4)
    train(config("whole"))
    asked = {"n": 0}

    def stop_before_step_5():
        asked["n"] += 1
        return "paused" if asked["n"] == 5 else None

    with pytest.raises(TrainingStopped):
        train(config("split"), should_stop=stop_before_step_5)
    assert train(config("split"), resume=True).steps == 12  # the base is quantised again, as before
    losses = [[r["train_loss"] for r in metrics_log.read(tmp_path / name)] for name in ("whole", "split")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
