"""Packing is an optimisation only: same loss and gradients as unpacked examples, no cross-talk.

Everything runs on the tiny random model (tuneforge.models.tiny) in fp32, so the tolerances are tight.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tuneforge.data.example import Example
from tuneforge.data.pack import pack
from tuneforge.data.render import IGNORE, render_example
from tuneforge.models.tiny import tiny_model
from tuneforge.train import attention
from tuneforge.train import loss as loss_mod
from tuneforge.train import model as native
from tuneforge.train.attention import packed, segments
from tuneforge.train.loss import batch_loss

QUESTIONS = ["What is 2+2?", "Name a colour.", "Say hi.", "Why is the sky blue? Explain briefly.", "Count to 3."]
ANSWERS = ["4.", "Blue, like the sea.", "Hi!", "Rayleigh scattering of sunlight by air.", "1, 2, 3."]


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model(seed=0)
    examples = [
        Example("chat", [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        for q, a in zip(QUESTIONS, ANSWERS)
    ]
    return model, tok, [render_example(e, tok) for e in examples]


def _reference(model, rendered):
    """Plain transformers, one example at a time, its own (shifting) loss: the ground truth."""
    total, n = 0.0, 0
    for r in rendered:
        out = model(input_ids=torch.tensor([r.input_ids]), labels=torch.tensor([r.labels]), use_cache=False)
        k = sum(1 for x in r.labels[1:] if x != IGNORE)
        total, n = total + out.loss * k, n + k
    return total / n


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_pack_lays_out_every_example_once_with_per_example_targets(tiny):
    _, tok, rendered = tiny
    longest = max(len(r.input_ids) for r in rendered)
    batch = pack(rendered, longest + 10, tok.pad_token_id, share=False)
    assert batch.input_ids.shape[0] > 1  # several rows, so padding and row ends are exercised
    assert batch.n_tokens == sum(len(r.input_ids) for r in rendered)
    assert batch.n_loss_tokens == sum(sum(1 for x in r.labels[1:] if x != IGNORE) for r in rendered)
    pieces = []
    for ids, pos in zip(batch.input_ids.tolist(), batch.position_ids.tolist()):
        for i, p in enumerate(pos):
            if p == 0:
                pieces.append([])
            pieces[-1].append(ids[i])
    examples = [p for p in pieces if set(p) != {tok.pad_token_id}]
    assert sorted(examples) == sorted(r.input_ids for r in rendered)
    # each token knows which of the given examples it came from (rows are filled longest first)
    for k, r in enumerate(rendered):
        assert batch.input_ids[batch.example == k].tolist() == r.input_ids
    assert (batch.example[~batch.real] == -1).all() and (batch.example[batch.real] >= 0).all()
    # each example's last token predicts nothing (never the first token of the next example)
    for row_pos, row_tgt in zip(batch.position_ids, batch.targets):
        ends = (row_pos[1:] == 0).nonzero().squeeze(1)
        assert (row_tgt[ends] == IGNORE).all()


def test_rows_are_padded_to_a_multiple_that_carries_no_loss(tiny):
    _, tok, rendered = tiny
    batch = pack(rendered, 4096, tok.pad_token_id, multiple=128, share=False)
    n = sum(len(r.input_ids) for r in rendered)
    assert batch.input_ids.shape == (1, -(-n // 128) * 128) and batch.n_tokens == n
    assert (batch.input_ids[0, n:] == tok.pad_token_id).all()
    assert (batch.targets[0, n:] == IGNORE).all()
    assert batch.position_ids[0, n:].tolist() == list(range(batch.input_ids.shape[1] - n))  # its own "example"
    # never past the row limit
    assert pack(rendered, n + 1, tok.pad_token_id, multiple=128, share=False).input_ids.shape == (1, n + 1)
    assert pack(rendered, 4096, tok.pad_token_id, multiple=1, share=False).input_ids.shape == (1, n)


def test_segments_cover_each_example_and_padding():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    seg = segments(pos)
    assert (seg.n, seg.width) == (5, 4)
    flat = torch.arange(12)
    slots = torch.full((seg.n * seg.width,), -1)
    slots[seg.scatter] = flat
    assert slots.view(5, 4).tolist() == [[0, 1, 2, -1], [3, 4, -1, -1], [5, -1, -1, -1], [6, 7, 8, 9], [10, 11, -1, -1]]
    assert torch.equal(seg.gather[seg.scatter], flat)


def _decoder(model, kind):
    """A copy of the transformers model, or tuneforge's decoder (train.model) with the same weights."""
    return copy.deepcopy(model) if kind == "transformers" else native.from_transformers(copy.deepcopy(model))


@pytest.mark.parametrize("kernel", ["short", "blocked", "sdpa"])
@pytest.mark.parametrize("rows", ["one", "several"])  # several: row ends and padding in between
@pytest.mark.parametrize("decoder", ["tuneforge", "transformers"])  # training's, and evaluation's of a tuned model
@pytest.mark.parametrize("share", [True, False])  # the chat template's system prompt laid out once, or in each
def test_packed_loss_and_gradients_equal_unpacked_transformers(tiny, rows, kernel, decoder, share, monkeypatch):
    model, tok, rendered = tiny
    monkeypatch.setattr(attention, "_kernel", lambda width, device_type, dropout: kernel)
    monkeypatch.setattr(attention, "BLOCK", 5)  # the blocked kernel: several blocks, the last one partial
    row_tokens = 4096 if rows == "one" else max(len(r.input_ids) for r in rendered) + 10
    reference, ours = copy.deepcopy(model), _decoder(model, decoder)
    ref_loss = _reference(reference, rendered)
    ref_loss.backward()
    batch = pack(rendered, row_tokens, tok.pad_token_id, share=share)
    assert (batch.shared > 0) == share and batch.n_tokens == sum(len(r.input_ids) for r in rendered)
    out = batch_loss(ours, batch)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    ref_grads, our_grads = _grads(reference), _grads(ours)
    assert ref_grads.keys() == our_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(our_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_cross_entropy_matches_autograd(tiny, monkeypatch):
    """The one-pass loss+gradient of the vocabulary projection equals plain autograd (tied weights)."""
    model, tok, rendered = tiny
    batch = pack(rendered, 4096, tok.pad_token_id)
    results = []
    for fused in (True, False):
        m = copy.deepcopy(model)
        monkeypatch.setattr(loss_mod, "fusable", lambda head, config, fused=fused: fused)
        out = batch_loss(m, batch, chunk=7)  # several chunks, the last one partial
        out.loss.backward()
        results.append((out, _grads(m)))
    (fused_out, fused_grads), (plain_out, plain_grads) = results
    assert fused_out.loss.item() == pytest.approx(plain_out.loss.item(), rel=1e-6)
    assert (fused_out.n_tokens, fused_out.n_correct) == (plain_out.n_tokens, plain_out.n_correct)
    for name, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-7, msg=name)
    with torch.no_grad():  # evaluation path: no gradient work, same numbers
        assert batch_loss(model, batch).loss.item() == pytest.approx(plain_out.loss.item(), rel=1e-6)


@pytest.mark.parametrize("decoder", ["tuneforge", "transformers"])
def test_no_attention_crosses_an_example_boundary(tiny, decoder):
    model, tok, rendered = tiny
    a, b = rendered[0], rendered[1]
    changed = copy.deepcopy(a)
    changed.input_ids = [(t + 7) % 200 + 3 for t in a.input_ids]
    ours = _decoder(model, decoder)

    def run(ids, positions):
        if decoder == "tuneforge":
            return ours.hidden(ids, positions)
        with packed(ours, positions):
            return ours.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state

    def hidden(first):
        batch = pack([first, b], 4096, tok.pad_token_id)
        assert batch.input_ids.shape[0] == 1  # both in one row
        with torch.no_grad():
            h = run(batch.input_ids, batch.position_ids)
        starts = (batch.position_ids[0] == 0).nonzero().squeeze(1).tolist()
        # pack orders longest first: find b by its length
        for s in starts:
            if batch.input_ids[0, s : s + len(b.input_ids)].tolist() == b.input_ids:
                return h[0, s : s + len(b.input_ids)]
        raise AssertionError("example b not found in the row")

    before, after = hidden(a), hidden(changed)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    with torch.no_grad():  # and it equals b run on its own, unpacked, by transformers
        alone = model.get_decoder()(input_ids=torch.tensor([b.input_ids]), use_cache=False).last_hidden_state[0]
    torch.testing.assert_close(before, alone, rtol=1e-5, atol=1e-5)


def test_attention_is_restored_after_a_packed_pass(tiny):
    model, tok, rendered = tiny
    before = model.config._attn_implementation
    batch_loss(model, pack(rendered, 4096, tok.pad_token_id))
    assert model.config._attn_implementation == before
    # and ordinary (padded, masked) use of the model is unaffected
    ids = torch.tensor([rendered[0].input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(logits).all()


def test_bf16_autocast_stays_close_to_fp32(tiny):
    model, tok, rendered = tiny
    batch = pack(rendered, 4096, tok.pad_token_id)
    with torch.no_grad():
        fp32 = batch_loss(model, batch).loss.item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = batch_loss(model, batch).loss.item()
    assert bf16 == pytest.approx(fp32, rel=2e-2)


@pytest.mark.parametrize("tied", [False, True])
def test_prepare_for_autocast_gives_the_autocast_numbers(tiny, tied):
    """Frozen base in bf16, casts done once: exactly what autocast computes anyway (loss and grads).
    With the head tied to the input embeddings, those rows are rounded to bf16 too: close, not equal."""
    from transformers import LlamaForCausalLM

    from tuneforge.models.adapters import prepare_for_training
    from tuneforge.models.tiny import tiny_config
    from tuneforge.train.device import prepare_for_autocast

    tied_model, tok, rendered = tiny
    model = tied_model
    if not tied:
        config = tiny_config(len(tok))
        config.tie_word_embeddings = False
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    batch = pack(rendered, 4096, tok.pad_token_id)
    results = []
    for store in (False, True):
        torch.manual_seed(0)
        m = prepare_for_training(native.from_transformers(copy.deepcopy(model)), "lora", rank=4, alpha=8, dropout=0.0,
                                 targets=["q_proj", "down_proj"])
        for name, p in m.named_parameters():  # LoRA B starts at zero: make the adapters matter
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        if store:
            prepare_for_autocast(m, torch.bfloat16)
            assert m.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
            assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
            assert m.get_output_embeddings().weight.dtype == torch.bfloat16
            with torch.no_grad():  # the residual stream starts in fp32 whatever the embedding is stored in
                assert m.get_input_embeddings()(batch.input_ids).dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = batch_loss(m, batch)
        out.loss.backward()
        results.append((out.loss.item(), _grads(m)))
    if tied:
        assert results[1][0] == pytest.approx(results[0][0], rel=1e-2)
        return
    assert results[0][0] == results[1][0]
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=0, atol=0, msg=name)


def test_padding_takes_free_places_in_the_examples_slots():
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1]])  # examples of 4 and 2 tokens, then 2 of padding
    real = torch.tensor([[True] * 6 + [False] * 2])
    seg = segments(pos, real)
    assert (seg.n, seg.width) == (2, 4)  # without `real` the padding is a third slot
    assert segments(pos).n == 3
    slots = torch.full((seg.n * seg.width,), -1)
    slots[seg.scatter] = torch.arange(8)
    assert slots.view(2, 4)[0].tolist() == [0, 1, 2, 3]
    assert slots.view(2, 4)[1, :2].tolist() == [4, 5]  # the second example, then the padding after it
    assert sorted(slots.view(2, 4)[1, 2:].tolist()) == [6, 7]
    assert torch.equal(seg.gather[seg.scatter], torch.arange(8))
    # more padding than free places: the rest gets a slot of its own
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    seg = segments(pos, torch.tensor([[True] * 3 + [False] * 5]))
    assert (seg.n, seg.width) == (3, 3)
    assert torch.equal(seg.gather[seg.scatter], torch.arange(8))
    assert len(set(seg.scatter.tolist())) == 8


def test_batches_mark_their_padding(tiny):
    _, tok, rendered = tiny
    for share in (False, True):
        batch = pack(rendered, 4096, tok.pad_token_id, multiple=128, share=share)
        n = batch.n_computed
        assert batch.real[0, :n].all() and not batch.real[0, n:].any()
        assert segments(batch.position_ids, batch.real).n == len(rendered)


def test_a_shared_prefix_is_laid_out_once(tiny):
    _, tok, rendered = tiny
    whole = pack(rendered, 4096, tok.pad_token_id, multiple=1, share=False)
    batch = pack(rendered, 4096, tok.pad_token_id, multiple=1)
    prefix = batch.shared
    system = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).split("<|im_start|>user")[0]
    assert prefix >= len(tok(system)["input_ids"])  # at least the template's default system prompt
    assert batch.input_ids[0, :prefix].tolist() == rendered[0].input_ids[:prefix]
    assert batch.n_tokens == whole.n_tokens and batch.n_computed == whole.n_computed - (len(rendered) - 1) * prefix
    assert batch.n_loss_tokens == whole.n_loss_tokens
    first = batch.example[0, 0].item()  # the example the prefix is laid out with is there whole
    for k, r in enumerate(rendered):
        mine = batch.example == k
        skip = 0 if k == first else prefix
        assert batch.input_ids[mine].tolist() == r.input_ids[skip:]
        assert batch.position_ids[mine].tolist() == list(range(skip, len(r.input_ids)))
        assert batch.targets[mine].tolist() == whole.targets[whole.example == k].tolist()[skip:]
    assert (batch.targets[0, :prefix] == IGNORE).all()


def test_no_shared_position_carries_a_loss(tiny):
    _, tok, rendered = tiny
    same = [rendered[0], copy.deepcopy(rendered[0])]  # identical: everything up to the answer is shared
    first_label = next(j for j, x in enumerate(same[0].labels) if x != IGNORE)
    batch = pack(same, 4096, tok.pad_token_id)
    assert batch.shared == first_label - 1  # its hidden state predicts the answer's first token: not shared
    assert pack(rendered[:1], 4096, tok.pad_token_id).shared == 0  # nothing to share with
    short = copy.deepcopy(rendered[1])
    short.input_ids, short.labels = short.input_ids[:3], short.labels[:3]
    assert pack([rendered[0], short], 4096, tok.pad_token_id).shared == 2  # each keeps a token of its own


def test_segments_give_each_example_the_shared_prefix():
    pos = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5], [3, 4, 0, 0, 0, 0, 0, 0]])
    real = torch.tensor([[True] * 8, [True] * 2 + [False] * 6])
    seg = segments(pos, real)
    assert (seg.n, seg.width, seg.shared) == (4, 6, True)  # three examples; the padding overflows
    slots = seg.gather.view(seg.n, seg.width)[:3]
    assert slots[0].tolist() == [0, 1, 2, 3, 4, slots[0, 5].item()]
    assert slots[1].tolist() == [0, 1, 2, 5, 6, 7]  # the prefix is row 0's first three tokens
    assert slots[2, :5].tolist() == [0, 1, 2, 8, 9]
    assert torch.equal(seg.gather[seg.scatter][real.view(-1)], torch.arange(16)[real.view(-1)])


@pytest.mark.parametrize("decoder", ["tuneforge", "transformers"])
def test_a_shared_prefix_changes_no_example_s_hidden_states(tiny, decoder):
    """Each example laid out without the prefix attends to it as if it had it, and to nothing else."""
    model, tok, rendered = tiny
    ours = _decoder(model, decoder)
    batch = pack(rendered, 4096, tok.pad_token_id)
    assert batch.shared > 0
    with torch.no_grad():
        if decoder == "tuneforge":
            h = ours.hidden(batch.input_ids, batch.position_ids, batch.real)
        else:
            with packed(ours, batch.position_ids, batch.real):
                h = ours.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                       use_cache=False).last_hidden_state
        for k, r in enumerate(rendered):
            alone = model.get_decoder()(input_ids=torch.tensor([r.input_ids]), use_cache=False).last_hidden_state[0]
            mine = h[batch.example == k]
            torch.testing.assert_close(mine, alone[len(r.input_ids) - len(mine):], rtol=1e-5, atol=1e-5)
