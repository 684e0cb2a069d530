"""A GGUF base's frozen linear layers and tied embedding trained on in the file's own blocks (models.gguf).

The reference for every weight is transformers' own GGUF loading (what fills the safetensors cache a
GGUF base is otherwise trained from): the blocks must give those weights bit for bit, and a LoRA step
over them the loss and gradients of a step over the fp32 copy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from tests.conftest import write_chat
from tuneforge.data.pack import pack
from tuneforge.data.render import render_example
from tuneforge.data.validate import load_examples
from tuneforge.models import gguf
from tuneforge.models.adapters import prepare_for_training
from tuneforge.models.gguf import GgufEmbedding, GgufLinear, GgufTiedHead, keep_blocks, read_linear_blocks
from tuneforge.models.tiny import tiny_model
from tuneforge.train.lora import group_layers
from tuneforge.train.loss import batch_loss
from tuneforge.train.model import Config, from_state_dict

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0]
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of llama's q/k rows (what transformers undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf_model, tokenizer=None) -> None:
    """The tiny llama as llama.cpp writes a llama GGUF file: q/k rows permuted, norms f32, the (tied)
    token embedding Q8_0 as in SmolLM2's file, the linear layers in Q4_0, Q4_1 and Q8_0 - one kind per
    group of layers that read the same input (q/k/v, o, gate/up, down), in turn, so that each kind
    meets several of train.lora's products. With `tokenizer` (the tiny byte-level one), the file holds
    it too, as a "gpt2" tokenizer: a base model transformers can load from the file alone."""
    cfg = hf_model.config
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    if tokenizer is None:
        writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(cfg.vocab_size)])  # an array to skip
    else:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([t for t, _ in vocab])
        writer.add_token_scores([0.0] * len(vocab))
        writer.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t, _ in vocab])  # control / normal
        writer.add_token_merges([])  # every byte a token of its own
        writer.add_bos_token_id(tokenizer.bos_token_id)
        writer.add_eos_token_id(tokenizer.eos_token_id)
        writer.add_pad_token_id(tokenizer.pad_token_id)
        writer.add_chat_template(tokenizer.chat_template)
    groups = {"self_attn.q_proj": 0, "self_attn.k_proj": 0, "self_attn.v_proj": 0, "self_attn.o_proj": 1,
              "mlp.gate_proj": 2, "mlp.up_proj": 2, "mlp.down_proj": 3}
    for name, tensor in hf_model.state_dict().items():
        w = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            q8 = GGMLQuantizationType.Q8_0
            writer.add_tensor("token_embd.weight", quantize(np.ascontiguousarray(w), q8), raw_dtype=q8)
            continue
        if name == "model.norm.weight":
            writer.add_tensor("output_norm.weight", w)
            continue
        if not name.startswith("model.layers."):
            continue  # lm_head: tied
        layer, module = name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
        gguf_name = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
        if w.ndim == 1:
            writer.add_tensor(gguf_name, w)
            continue
        if module.endswith(("q_proj", "k_proj")):
            w = _permute(w, cfg.num_attention_heads if module.endswith("q_proj") else cfg.num_key_value_heads)
        kind = KINDS[(4 * int(layer) + groups[module]) % len(KINDS)]
        writer.add_tensor(gguf_name, quantize(np.ascontiguousarray(w), kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(the GGUF file, the model transformers loads from it, as train.model's CausalLM, in fp32)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf, tok = tiny_model()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, hf)
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    state = dict(hf.state_dict()) | loaded  # transformers' de-quantised (and un-permuted) weights
    return path, state, tok, Config.from_hf(hf.config.to_dict(), tied=True)


def _model(tiny_gguf, blocks: bool):
    path, state, _, config = tiny_gguf
    model = from_state_dict(config, {k: v.clone() for k, v in state.items()})
    if blocks:
        assert keep_blocks(model, path, config.num_attention_heads, config.num_key_value_heads) == "Q4_0/Q4_1/Q8_0"
    return model


def test_the_blocks_are_transformers_weights_bit_for_bit(tiny_gguf):
    path, state, _, _ = tiny_gguf
    model = _model(tiny_gguf, blocks=True)
    kept = {name: m for name, m in model.named_modules() if isinstance(m, GgufLinear) and not isinstance(m, GgufTiedHead)}
    assert len(kept) == 2 * 7  # every linear layer of both decoder layers
    assert {m.kind for m in kept.values()} == {"Q4_0", "Q4_1", "Q8_0"}
    for name, module in kept.items():
        assert torch.equal(module.weight.dequantize(), state[name + ".weight"]), name
    # and the quantisation is real: these are not the tiny model's own fp32 weights
    hf_q = tiny_model()[0].state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(kept["model.layers.0.self_attn.q_proj"].weight.dequantize(), hf_q)
    # the tied embedding: one set of blocks, looked up and projected onto
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, GgufEmbedding) and embed.kind == "Q8_0" and isinstance(head, GgufTiedHead)
    assert head.weight.qs is embed.qs and "lm_head" not in dict(model.named_buffers())
    assert torch.equal(embed.weight.dequantize(), state["model.embed_tokens.weight"])
    ids = torch.tensor([[5, 0, 258, 5], [7, 7, 1, 2]])
    assert torch.equal(embed(ids), state["model.embed_tokens.weight"][ids])
    assert len(read_linear_blocks(path)) == 15


def test_the_tied_head_is_the_fp32_head_a_few_rows_at_a_time(tiny_gguf, tmp_path, monkeypatch):
    """Logits and a LoRA step's loss and gradients with the head de-quantised 16 of its 259 rows at a
    time (the embedded model's 49,152 rows go HEAD_ROWS at a time): the same to float rounding (the
    products of a few rows may take other kernels; the input gradient sums the row blocks)."""
    monkeypatch.setattr(gguf, "HEAD_ROWS", 16)
    ids = torch.tensor([[5, 9, 200, 31, 7, 7, 2, 0]])
    with torch.no_grad():
        torch.testing.assert_close(_model(tiny_gguf, True)(ids), _model(tiny_gguf, False)(ids), rtol=1e-5, atol=1e-6)
    batch = _batch(tmp_path, tiny_gguf[2])
    for targets in (TARGETS, ["q_proj", "lm_head"]):  # the fused loss kernel's head; a LoRA-wrapped one
        (loss_a, grads_a), (loss_b, grads_b) = (_lora_step(tiny_gguf, batch, blocks, targets, 0.0) for blocks in (False, True))
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_cache_that_does_not_match_the_file_keeps_its_own_weights(tiny_gguf):
    path, state, _, config = tiny_gguf
    changed = {k: v.clone() for k, v in state.items()}
    changed["model.layers.0.mlp.up_proj.weight"][3, 5] += 1e-3  # (which layer 0 is checked against)
    changed["model.embed_tokens.weight"][258, 63] += 1e-3  # (every row of which is checked: the last one)
    model = from_state_dict(config, changed)
    assert keep_blocks(model, path, config.num_attention_heads, config.num_key_value_heads) is None
    assert not any(isinstance(m, (GgufLinear, GgufEmbedding)) for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_the_linear_layers_and_the_embedding_are_checked_each_on_its_own(tiny_gguf):
    path, state, _, config = tiny_gguf
    for changed_name, kept_kinds in (("model.embed_tokens.weight", "Q4_0/Q4_1/Q8_0"),
                                     ("model.layers.0.mlp.up_proj.weight", "Q8_0")):
        changed = {k: v.clone() for k, v in state.items()}
        changed[changed_name][0, 0] += 1e-3
        model = from_state_dict(config, changed)
        assert keep_blocks(model, path, config.num_attention_heads, config.num_key_value_heads) == kept_kinds
        embedding_kept = isinstance(model.get_input_embeddings(), GgufEmbedding)
        assert embedding_kept == (changed_name != "model.embed_tokens.weight")
        assert any(isinstance(m, GgufLinear) for m in model.modules())  # the tied head, at least


def test_a_file_that_is_not_gguf_keeps_nothing(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)  # a header that runs past the file
    assert read_linear_blocks(bad) == {}
    bad.write_bytes(b"not a gguf file at all")
    assert read_linear_blocks(bad) == {}


def _batch(tmp_path, tok):
    examples = load_examples(str(write_chat(tmp_path / "t.jsonl", 10)), tok, 256)[:4]
    return pack([render_example(e, tok, 256) for e in examples], 1024, tok.pad_token_id)


def _lora_step(tiny_gguf, batch, blocks: bool, targets, dropout):
    """(loss, {name: gradient}) of one LoRA step of the tiny model, over its blocks or its fp32 weights."""
    model = _model(tiny_gguf, blocks)
    torch.manual_seed(0)
    model = prepare_for_training(model, "lora", rank=4, alpha=8, dropout=dropout, targets=targets)
    with torch.no_grad():  # B starts at zero: give the input gradients through the base something to carry
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    model.train()
    group_layers(model)
    torch.manual_seed(1)
    loss = batch_loss(model, batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("targets", "dropout"), [(TARGETS, 0.0), (["q_proj", "v_proj", "down_proj"], 0.1),
                                                  (["q_proj", "lm_head"], 0.0)])
def test_lora_over_the_blocks_is_lora_over_the_fp32_weights(tiny_gguf, tmp_path, targets, dropout):
    """Grouped q/k/v and gate/up products, the fused SwiGLU + down projection, plain frozen layers, LoRA
    layers with dropout, the tied embedding and head (LoRA over it too): the same loss and adapter
    gradients, bit for bit."""
    batch = _batch(tmp_path, tiny_gguf[2])
    (loss_a, grads_a), (loss_b, grads_b) = (_lora_step(tiny_gguf, batch, blocks, targets, dropout) for blocks in (False, True))
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.slow
def test_the_embedded_models_lora_base_is_its_gguf_blocks_and_the_same_weights():
    from tuneforge.models.catalogue import EMBEDDED, resolve
    from tuneforge.models.load import model_folder
    from tuneforge.train.model import load_for_training, read_weights

    model, _ = load_for_training(EMBEDDED, gguf_blocks=True)
    kept = {name: m for name, m in model.named_modules() if isinstance(m, GgufLinear) and not isinstance(m, GgufTiedHead)}
    assert len(kept) == 30 * 7 and {m.kind for m in kept.values()} == {"Q4_1"}
    cached = read_weights(model_folder(resolve(EMBEDDED)))  # what transformers de-quantised on first use
    for name, module in kept.items():
        assert torch.equal(module.weight.dequantize(), cached[name + ".weight"]), name
    embed = model.get_input_embeddings()
    assert isinstance(embed, GgufEmbedding) and embed.kind == "Q8_0"  # the tied embedding, 49,152 x 576
    assert torch.equal(embed.weight.dequantize(), cached["model.embed_tokens.weight"])
    full, _ = load_for_training(EMBEDDED)  # full fine-tuning trains the fp32 weights themselves
    assert not any(isinstance(m, GgufLinear) for m in full.modules())


def test_products_de_quantise_into_one_buffer_per_thread(tiny_gguf):
    """The same weights as a fresh de-quantisation, in a buffer each thread reuses (no fresh temporary
    per product to fragment the heap between the tensors a step keeps)."""
    import threading

    blocks = read_linear_blocks(tiny_gguf[0])
    big, small = blocks["model.layers.0.mlp.gate_proj"], blocks["model.layers.0.self_attn.k_proj"]
    first = big.dequantize(scratch=True)
    assert torch.equal(first, big.dequantize())
    second = small.dequantize(scratch=True)
    assert torch.equal(second, small.dequantize()) and second.data_ptr() == first.data_ptr()
    other = []
    thread = threading.Thread(target=lambda: other.append(small.dequantize(scratch=True).data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != first.data_ptr()


def test_the_logits_of_a_lora_wrapped_head_include_its_update(tiny_gguf):
    """CausalLM.forward (all logits) through a LoRA layer over the output layer: over the fp32 head and
    over the tied head in blocks, the base logits plus scale * (h A^T) B^T."""
    ids = torch.tensor([[5, 9, 200, 31, 7, 7, 2, 0]])
    logits = []
    for blocks in (False, True):
        torch.manual_seed(0)  # the same A in both
        model = prepare_for_training(_model(tiny_gguf, blocks), "lora", rank=4, alpha=8, dropout=0.0, targets=["lm_head"])
        head = model.lm_head
        with torch.no_grad():
            head.lora_B.weight.copy_(torch.randn(head.lora_B.weight.shape, generator=torch.Generator().manual_seed(0)))
            hidden = model.hidden(ids, torch.arange(8)[None])
            expected = _model(tiny_gguf, False)(ids) + head.scaling * (hidden @ head.lora_A.weight.T) @ head.lora_B.weight.T
            logits.append(model(ids))
        torch.testing.assert_close(logits[-1], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-6, atol=1e-6)
