"""tuneforge's own decoder (train.model) is transformers' model, PEFT's LoRA and their saved forms:
same logits, same loss and gradients (fp32), no further from fp32 under bf16, adapters PEFT loads."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tests.conftest import assert_no_further_from
from tuneforge.data.example import Example
from tuneforge.data.pack import pack
from tuneforge.data.render import render_example
from tuneforge.models.adapters import load_weights_into, prepare_for_training, save_weights
from tuneforge.models.tiny import tiny_model
from tuneforge.train import model as native
from tuneforge.train.device import prepare_for_autocast
from tuneforge.train.lora import group_layers, lora_parts
from tuneforge.train.loss import batch_loss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAIRS = [("What is 2+2?", "4."), ("Name a colour.", "Blue, like the sea."), ("Say hi.", "Hi!")]


@pytest.fixture(scope="module")
def tiny():
    hf, tok = tiny_model(seed=0)
    for name, p in hf.named_parameters():  # norms start at one: make their weights matter
        if "norm" in name:
            torch.nn.init.normal_(p, mean=1.0, std=0.2, generator=torch.Generator().manual_seed(len(name)))
    examples = [Example("chat", [{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in PAIRS]
    # several examples in one row: attention must stay inside each of them
    return hf, pack([render_example(e, tok) for e in examples], 4096, tok.pad_token_id)


def _b(name: str) -> torch.Generator:
    """The generator of the B matrix of that name's values (B starts at zero: make the adapters matter)."""
    return torch.Generator().manual_seed(len(name))


def _native(hf, method, dropout=0.0, bf16=False):
    m = native.from_transformers(copy.deepcopy(hf))
    torch.manual_seed(0)
    m = prepare_for_training(m, method, rank=4, alpha=8, dropout=dropout, targets=TARGETS)
    _set_b(m)
    m.train()
    if bf16:
        prepare_for_autocast(m, torch.bfloat16)
    group_layers(m)
    return m


def _set_b(m):
    for name, p in m.named_parameters():
        if "lora_B" in name:
            key = name.replace("base_model.model.", "").replace(".default", "")
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=_b(key)) * 0.05)


def _peft(hf, nat, method, bf16=False):
    """transformers (+ PEFT) with the same weights and adapters as `nat`."""
    m = copy.deepcopy(hf)
    if method == "lora":
        m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
        own = {k: v for k, v in nat.named_parameters() if "lora_" in k}
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_" in name:
                    p.copy_(own[name.replace("base_model.model.", "").replace(".default", "")])
    m.train()
    if bf16:
        prepare_for_autocast(m, torch.bfloat16)
    return m


def _step(m, batch, dtype):
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = batch_loss(m, batch)
    out.loss.backward()
    grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad.clone()
             for n, p in m.named_parameters() if p.grad is not None}
    return out.loss.item(), grads


def test_the_decoder_gives_transformers_logits(tiny):
    hf, batch = tiny
    ids = batch.input_ids[:, :40]
    with torch.no_grad():
        ref = hf(ids).logits
        out = native.from_transformers(copy.deepcopy(hf))(ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_loss_and_gradients_are_transformers_and_peft(tiny, method):
    hf, batch = tiny
    m = _native(hf, method)
    assert group_layers(m) == 0  # already grouped: q/k/v and gate/up of both layers, once
    ref_loss, ref_grads = _step(_peft(hf, m, method), batch, None)
    loss, grads = _step(m, batch, None)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    if method == "lora":
        assert len(grads) == 2 * 2 * len(TARGETS)
    else:
        assert any("norm" in n for n in grads)  # trained norm weights get their gradient too
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def _other_architecture(kind: str, vocab_size: int):
    """A tiny transformers model of another supported type: Qwen2's q/k/v biases, Mistral's window,
    Qwen3's per-head query/key norms (set away from one, so that they matter) and its own head_dim."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"qwen2": {}, "mistral": {"sliding_window": 4096}, "qwen3": {"head_dim": 24, "attention_bias": True}}[kind]
    config = AutoConfig.for_model(kind, vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                  pad_token_id=2, **extra)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2 + ("norm" in name))
    return hf


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "qwen3"])
def test_other_architectures_are_transformers_and_peft(tiny, tmp_path, kind):
    llama, batch = tiny
    hf = _other_architecture(kind, llama.config.vocab_size)
    hf.save_pretrained(tmp_path)  # read back as a training run reads a base model: config.json as JSON
    config = native._read_config(tmp_path / "config.json", tied=True)
    assert config.model_type == kind and config.qk_norm == (kind == "qwen3")
    assert config.head_dim == (24 if kind == "qwen3" else 16)
    loaded = native.from_state_dict(config, native.read_weights(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch.input_ids[:, :40]), hf(batch.input_ids[:, :40]).logits, rtol=1e-5, atol=1e-5)
    m = _native(hf, "lora")
    ref_loss, ref_grads = _step(_peft(hf, m, "lora"), batch, None)
    loss, grads = _step(m, batch, None)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 2 * len(TARGETS)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    bf16_loss, _ = _step(_native(hf, "lora", bf16=True), batch, torch.bfloat16)  # the bf16 path runs too
    assert bf16_loss == pytest.approx(loss, rel=2e-2)


def test_lora_layers_run_fused_and_grouped(tiny):
    hf, _ = tiny
    m = native.from_transformers(copy.deepcopy(hf))
    prepare_for_training(m, "lora", rank=4, alpha=8, dropout=0.0, targets=TARGETS)
    assert group_layers(m) == 2 * 2  # q/k/v and gate/up of each layer
    assert all(lora_parts(getattr(layer.self_attn, n)) is not None for layer in m.model.layers for n in ("o_proj", "q_proj"))
    with_dropout = prepare_for_training(native.from_transformers(copy.deepcopy(hf)), "lora", rank=4, alpha=8,
                                        dropout=0.1, targets=TARGETS)
    assert group_layers(with_dropout) == 0 and lora_parts(with_dropout.model.layers[0].mlp.down_proj) is None


@pytest.mark.parametrize("method", ["lora", "full"])
def test_under_bf16_it_is_as_close_to_fp32_as_transformers_and_peft(tiny, method):
    """bf16 rounds at other points in each; ours may not stray further from fp32."""
    hf, batch = tiny
    truth = _step(_native(hf, method), batch, None)
    m = _native(hf, method, bf16=True)
    reference = _step(_peft(hf, m, method, bf16=True), batch, torch.bfloat16)
    assert_no_further_from(truth, reference, _step(m, batch, torch.bfloat16))


def test_an_adapted_output_layer_trains_through_the_generic_loss(tiny):
    hf, batch = tiny
    m = prepare_for_training(native.from_transformers(copy.deepcopy(hf)), "lora", rank=4, alpha=8, dropout=0.0,
                             targets=["q_proj", "lm_head"])
    prepare_for_autocast(m, torch.bfloat16)
    assert m.lm_head.base_layer.weight.dtype == torch.bfloat16
    _set_b(m)
    loss, grads = _step(m, batch, torch.bfloat16)
    assert math.isfinite(loss) and {"lm_head.lora_A.weight", "lm_head.lora_B.weight"} <= grads.keys()


def test_lora_dropout_is_active_in_training_only(tiny):
    hf, batch = tiny
    plain, dropped = _native(hf, "lora"), _native(hf, "lora", dropout=0.5)
    dropped.eval()
    with torch.no_grad():
        assert batch_loss(dropped, batch).loss.item() == pytest.approx(batch_loss(plain, batch).loss.item(), rel=1e-6)
    dropped.train()
    loss, grads = _step(dropped, batch, None)
    assert loss != pytest.approx(_step(plain, batch, None)[0], rel=1e-6) and len(grads) == 2 * 2 * len(TARGETS)


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
    hf, batch = tiny
    remade, kept = _native(hf, "lora", bf16=True), _native(hf, "lora", bf16=True)
    for m in kept.modules():  # the norms' outputs without what they were made from: groups keep them
        if type(m).__name__ == "RMSNorm":
            m.forward = lambda h, fwd=m.forward: _without_source(fwd(h))
    remade_bytes, kept_bytes = _saved_bytes(remade, batch), _saved_bytes(kept, batch)
    # two groups a layer, each not keeping a [tokens, hidden] bf16 input - but the first layer's q/k/v,
    # whose norm is not in the graph (frozen input and weight) and keeps nothing to make it from
    tokens, hidden, layers = batch.input_ids.numel(), hf.config.hidden_size, hf.config.num_hidden_layers
    assert kept_bytes - remade_bytes == (2 * layers - 1) * tokens * hidden * 2
    for (name, p), (_, q) in zip(remade.named_parameters(), kept.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), name  # made again bit for bit


def _without_source(y):
    y.__dict__.pop("_tuneforge_norm", None)
    return y


@pytest.mark.parametrize("method", ["lora", "full"])
def test_recomputed_layers_give_the_same_loss_and_gradients(tiny, method):
    """Activation checkpointing is a memory trade only: same loss and gradients, far fewer saved bytes."""
    hf, batch = tiny
    plain, recomputed = _native(hf, method), _native(hf, method)
    recomputed.model.recompute = True
    loss, grads = _step(plain, batch, None)
    re_loss, re_grads = _step(recomputed, batch, None)
    assert re_loss == pytest.approx(loss, rel=1e-6)
    assert re_grads.keys() == grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(re_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # the forward pass keeps each layer's input (and the loss's own tensors), not its activations
    assert _saved_bytes(recomputed, batch) < _saved_bytes(_native(hf, method), batch) / 4


def test_recomputed_layers_draw_the_same_dropout_masks(tiny):
    hf, batch = tiny
    plain, recomputed = _native(hf, "lora", dropout=0.3), _native(hf, "lora", dropout=0.3)
    recomputed.model.recompute = True
    torch.manual_seed(5)
    loss, grads = _step(plain, batch, None)
    torch.manual_seed(5)
    re_loss, re_grads = _step(recomputed, batch, None)
    assert re_loss == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(re_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_a_saved_adapter_is_a_peft_adapter(tiny, tmp_path):
    hf, batch = tiny
    m = _native(hf, "lora")
    save_weights(m, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    served = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path)  # as the server and `eval` load it
    ids = batch.input_ids[:, :40]
    with torch.no_grad():
        torch.testing.assert_close(m(ids), served(ids).logits, rtol=1e-5, atol=1e-5)
    # and back into a fresh model of ours (resume): every adapter weight restored
    fresh = _native(hf, "lora")
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()
    load_weights_into(fresh, tmp_path)
    for (name, p), (_, q) in zip(m.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), name


def test_full_weights_are_a_transformers_checkpoint(tiny, tmp_path):
    hf, batch = tiny
    m = _native(hf, "full")
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight.mul_(1.5)  # as if trained
    save_weights(m, tmp_path)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # config.json and model.safetensors
    ids = batch.input_ids[:, :40]
    with torch.no_grad():
        torch.testing.assert_close(m(ids), loaded(ids).logits, rtol=1e-5, atol=1e-5)
    other = copy.deepcopy(hf)
    load_weights_into(other, tmp_path)  # what attach() does for a full run
    torch.testing.assert_close(other.model.layers[1].mlp.up_proj.weight, m.model.layers[1].mlp.up_proj.weight)


def test_weights_are_read_as_views_of_the_mapped_file(tiny, tmp_path):
    hf, _ = tiny
    hf.save_pretrained(tmp_path)
    state = native.read_weights(tmp_path)
    assert state.keys() == {k for k in hf.state_dict() if k != "lm_head.weight"}  # tied: saved once
    for k, v in state.items():
        assert torch.equal(v, hf.state_dict()[k]), k
    maps = open("/proc/self/maps").read()
    assert str(tmp_path / "model.safetensors") in maps


def _mapped_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_fp32_weights_stacked_for_a_lora_group_leave_the_mapped_file(tiny, tmp_path):
    """In fp32 the frozen weights stay views of the mapped file; q/k/v and gate/up are copied into one
    stacked matrix each, and the file pages just read for that go back instead of staying resident."""
    hf, _ = tiny
    hf.save_pretrained(tmp_path)
    m = native.from_state_dict(native._read_config(tmp_path / "config.json", tied=True), native.read_weights(tmp_path))
    m = prepare_for_training(m, "lora", rank=4, alpha=8, dropout=0.0, targets=TARGETS)
    file = tmp_path / "model.safetensors"
    sum(float(p.detach().sum()) for p in m.parameters())  # every page of the file read once
    before = _mapped_kb(file)
    group_layers(m)
    stacked = sum(p.numel() * 4 for n, p in m.named_parameters() if any(f"{k}.base_layer" in n for k in
                                                                         ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")))
    # (most, not all: the tiny model's tensors share pages with neighbours that are read again later)
    assert before - _mapped_kb(file) >= 0.5 * stacked / 1024
    for name, p in m.named_parameters():
        assert torch.equal(p, hf.state_dict()[name.replace(".base_layer", "")]) if "base_layer" in name else True, name


def test_older_pickled_weights_are_read_too_and_none_is_a_clear_error(tiny, tmp_path):
    hf, _ = tiny
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # what transformers wrote before safetensors
    state = native.read_weights(tmp_path)
    assert state.keys() == hf.state_dict().keys()
    for k, v in state.items():
        assert torch.equal(v, hf.state_dict()[k]), k
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        native.read_weights(tmp_path)


def test_unsupported_models_are_refused_by_name():
    with pytest.raises(native.UnsupportedModel, match="'gpt2'.*GPT2LMHeadModel.*llama, mistral, qwen2"):
        native.Config.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    base = {"model_type": "mistral", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "sliding_window": 512}
    config = native.Config.from_hf(base)
    config.check(512)
    with pytest.raises(native.UnsupportedModel, match="max_length 1024 .* window \\(512\\)"):
        config.check(1024)
    with pytest.raises(native.UnsupportedModel, match="'yarn'"):
        native.Config.from_hf(base | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="a mistral config needs hidden_size, intermediate_size"):
        native.Config.from_hf({k: v for k, v in base.items() if k not in ("hidden_size", "intermediate_size")})


def test_a_broken_config_file_is_named(tiny, tmp_path):
    hf, _ = tiny
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: not valid JSON"):
        native.load_for_training(str(tmp_path))


def test_weights_that_do_not_fit_the_config_are_named(tiny, tmp_path):
    from tuneforge.models.tiny import tiny_tokenizer

    hf, _ = tiny
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    with pytest.raises(ValueError, match=rf"{tmp_path}: weights do not match the llama config: "
                                         r"model.layers.0.mlp.down_proj.weight is \[64, 128\], "
                                         r"the config makes it \[64, 96\] \(6 tensors differ\)"):
        native.load_for_training(str(tmp_path))


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
])
def test_scaled_rotary_frequencies_are_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=rope, max_position_embeddings=131072)
    ref, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, torch.device("cpu"))
    config = native.Config.from_hf(hf_config.to_dict())
    assert scaling == 1.0 and config.rope["rope_type"] == rope["rope_type"]
    torch.testing.assert_close(native._inv_freq(config), ref.float(), rtol=1e-6, atol=0)
    assert not math.isnan(float(native._inv_freq(config).sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_transformers_rotary(dtype):
    """Same output; in bf16 the input gradient is rounded once (transformers rounds each of its two
    terms, then adds them in bf16), so it may only be closer to the fp32 gradient."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from tuneforge.train.fused import rotary

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 7, 3 * 4 * 8, generator=g).to(dtype)  # [rows, length, 3 heads x 4 x dim 8]
    angles = torch.randn(2, 7, 4, generator=g)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()  # fp32, as transformers
    grad = torch.randn(2, 4, 7, 8, generator=g)

    def run(fn, inputs):
        leaf = inputs.clone().requires_grad_()
        x = leaf.view(2, 7, 3, 4, 8)[:, :, 1].transpose(1, 2)  # the middle third, as q/k are views of q/k/v
        out = fn(x)
        out.backward(grad)
        return out, leaf.grad

    transformers_rotary = lambda x: apply_rotary_pos_emb(x, x, cos, sin)[0]  # noqa: E731
    ref, ref_grad = run(transformers_rotary, qkv)
    out, out_grad = run(lambda x: rotary(x, cos, sin), qkv)
    assert out.dtype == ref.dtype == torch.float32 and out_grad.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(out_grad, ref_grad, rtol=1e-6, atol=1e-6)
        return
    _, truth = run(transformers_rotary, qkv.float())
    assert (out_grad.float() - truth).norm() <= (ref_grad.float() - truth).norm()


@pytest.mark.parametrize("recompute", [False, True])
def test_a_training_process_imports_no_modeling_code(tmp_path, chat_file, recompute):
    """What the decoder and train.optim are for: a whole training run (model load, steps, checkpoints,
    saved adapter) without transformers' modeling code, PEFT, or torch._dynamo and sympy (which
    torch.optim's optimizers and torch.utils.checkpoint import) in the process."""
    import subprocess
    import sys

    hf, _ = tiny_model(seed=0)
    hf.save_pretrained(tmp_path / "base")
    from tuneforge.models.tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "base")
    cfg = (f"TrainConfig(data={str(chat_file)!r}, out={str(tmp_path / 'run')!r}, base={str(tmp_path / 'base')!r}, "
           f"n_epochs=1, activation_checkpointing={recompute})")
    code = ("import sys; from tuneforge.train.loop import train; from tuneforge.train.config import TrainConfig; "
            f"train({cfg}); "
            "print(sorted(m for m in ('sympy', 'torch._dynamo', 'peft', 'transformers.modeling_utils') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
