"""DPO on the tiny model: the answer-only labels, packed log-probabilities against plain transformers,
the loss's start and direction, resume from the saved reference, and what it refuses."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tuneforge.data.example import Example
from tuneforge.data.pack import pack
from tuneforge.data.render import IGNORE, render_preference
from tuneforge.models.tiny import tiny_model
from tuneforge.train import dpo
from tuneforge.train import loss as loss_mod
from tuneforge.train import metrics as metrics_log
from tuneforge.train.config import TrainConfig
from tuneforge.train.loop import TrainingStopped, train


def config(tmp_path, data, name="run", **kw) -> TrainConfig:
    kw.setdefault("n_epochs", 2)
    kw.setdefault("batch_size", 4)
    return TrainConfig(data=str(data), out=str(tmp_path / name), base="tiny-llama", objective="dpo", **kw)


def test_only_the_answers_tokens_are_labelled():
    _, tok = tiny_model(seed=0)
    example = Example(
        "preference",
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Earlier answer."},
         {"role": "user", "content": "Greet me"}],
        chosen=[{"role": "assistant", "content": "Hello there!"}],
        rejected=[{"role": "assistant", "content": "No."}],
    )
    chosen, rejected = render_preference(example, tok)
    for r, answer in ((chosen, "Hello there!"), (rejected, "No.")):
        labelled = tok.decode([t for t in r.labels if t != IGNORE])
        assert labelled.startswith(answer) and "Earlier" not in labelled
    prompt = next(i for i, t in enumerate(rejected.labels) if t != IGNORE)  # the same prompt before both answers
    assert chosen.input_ids[:prompt] == rejected.input_ids[:prompt] and chosen.labels[prompt] != IGNORE


def test_packed_sequence_logps_equal_plain_transformers():
    model, tok = tiny_model(seed=0)
    model.eval()
    examples = [
        Example("preference", [{"role": "user", "content": q}],
                chosen=[{"role": "assistant", "content": a}], rejected=[{"role": "assistant", "content": "No."}])
        for q, a in [("Say hi.", "Hi!"), ("Count to three, please.", "1, 2, 3."), ("Colour?", "Blue, like the sea.")]
    ]
    seqs = [r for e in examples for r in render_preference(e, tok)]
    batch = pack(seqs, max(len(r.input_ids) for r in seqs) + 12, tok.pad_token_id)  # several rows
    assert batch.input_ids.shape[0] > 1
    with torch.no_grad():
        out = dpo.sequence_logps(model, batch)
        for k, r in enumerate(seqs):
            logits = model(input_ids=torch.tensor([r.input_ids]), use_cache=False).logits[0, :-1]
            targets = torch.tensor(r.labels[1:])
            keep = targets != IGNORE
            want = torch.log_softmax(logits.float(), -1)[keep].gather(1, targets[keep, None]).sum()
            assert out.logps[k] == pytest.approx(float(want), abs=1e-4)
            assert out.n_tokens[k] == int(keep.sum())


def test_frozen_head_kernel_gives_autograds_log_probs_and_gradients():
    """With a frozen output layer (a LoRA run's) sequence_logps takes train.loss's one-pass kernel; its
    per-position gradients, weighted differently per sequence as DPO weights them, are autograd's."""
    model, tok = tiny_model(seed=0)
    model.lm_head.weight.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(False)
    examples = [
        Example("preference", [{"role": "user", "content": q}],
                chosen=[{"role": "assistant", "content": a}], rejected=[{"role": "assistant", "content": "No."}])
        for q, a in [("Say hi.", "Hi!"), ("Count to three, please.", "1, 2, 3."), ("Colour?", "Blue, like the sea.")]
    ]
    batch = pack([r for e in examples for r in render_preference(e, tok)], 4096, tok.pad_token_id)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])  # one per sequence, like DPO's coefficients
    results = []
    for kernel in (True, False):
        model.zero_grad(set_to_none=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loss_mod, "fusable", lambda head, config, kernel=kernel: kernel)
            out = dpo.sequence_logps(model, batch, chunk=7)  # several chunks, the last one partial
        (out.logps * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (fast, fast_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fast.logps, plain.logps, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.n_correct, plain.n_correct) and torch.equal(fast.n_tokens, plain.n_tokens)
    assert plain_grads and plain_grads.keys() == fast_grads.keys()
    for name, g in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_dpo_starts_at_log2_and_learns_the_preference(tmp_path, pairs_file):
    result = train(config(tmp_path, pairs_file, learning_rate_multiplier=10.0))
    run = tmp_path / "run"
    assert result.baseline["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert result.baseline["reward_accuracy"] == 0.0
    reference = json.loads((run / dpo.REFERENCE_FILE).read_text())
    assert len(reference["train"]) == 22 and len(reference["valid"]) == 2
    rows = metrics_log.read(run)
    assert {"train_reward_accuracy", "train_reward_margin"} <= rows[0].keys()
    last = rows[-1]
    assert last["train_loss"] < math.log(2) and last["valid_loss"] < math.log(2)
    assert last["valid_reward_accuracy"] == 1.0 and last["valid_reward_margin"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").exists()


def test_resume_reads_the_reference_made_before_training(tmp_path, pairs_file):
    train(config(tmp_path, pairs_file, "whole", learning_rate_multiplier=10.0))
    calls = {"n": 0}

    def stop_before_step_9():
        calls["n"] += 1
        return "paused" if calls["n"] == 9 else None

    cfg = config(tmp_path, pairs_file, "split", learning_rate_multiplier=10.0)
    with pytest.raises(TrainingStopped):
        train(cfg, should_stop=stop_before_step_9)
    train(cfg, resume=True)
    whole, split = metrics_log.read(tmp_path / "whole"), metrics_log.read(tmp_path / "split")
    assert [r["train_loss"] for r in split] == pytest.approx([r["train_loss"] for r in whole], rel=1e-5)


def test_full_fine_tuning_with_dpo(tmp_path, pairs_file):
    result = train(config(tmp_path, pairs_file, method="full", n_epochs=1))
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert result.final["train_loss"] > 0 and "train_reward_accuracy" in result.final


def test_dpo_refuses_a_file_that_is_not_preference_pairs(tmp_path, chat_file):
    with pytest.raises(ValueError, match=r"train\.jsonl, line 1: DPO trains on preference pairs .* chat example"):
        train(config(tmp_path, chat_file))
