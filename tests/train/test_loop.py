"""The training loop on the tiny model: determinism, resume, run folder, early stopping, full FT."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tuneforge.models.load import load_tuned
from tuneforge.train import metrics as metrics_log
from tuneforge.train.checkpoint import checkpoint_dirs, read_meta
from tuneforge.train.config import TrainConfig
from tuneforge.train.loop import TrainingStopped, train


def config(tmp_path, data, name="run", **kw) -> TrainConfig:
    kw.setdefault("n_epochs", 2)
    kw.setdefault("batch_size", 4)
    return TrainConfig(data=str(data), out=str(tmp_path / name), base="tiny-llama", **kw)


def losses(run_dir) -> list[float]:
    return [r["train_loss"] for r in metrics_log.read(run_dir)]


def test_run_folder_holds_everything(tmp_path, chat_file):
    result = train(config(tmp_path, chat_file))
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    # "auto" hyperparameters are resolved and written down
    assert saved["n_epochs"] == 2 and saved["batch_size"] == 4 and saved["learning_rate_multiplier"] == 1.0
    for name in ("adapter/adapter_model.safetensors", "tokenizer/tokenizer.json", "metrics.jsonl",
                 "loss.png", "result.json", "baseline.json"):
        assert (run / name).exists(), name
    # 24 examples -> 22 train / 2 held out (10%), batch 4 -> 6 steps an epoch, 2 epochs
    assert result.steps == 12
    rows = metrics_log.read(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"train_loss", "train_mean_token_accuracy", "learning_rate", "tokens_per_second"} <= rows[0].keys()
    assert [r["step"] for r in rows if "valid_loss" in r] == [6, 12]  # once an epoch
    epochs = [read_meta(c) for c in checkpoint_dirs(run)]
    assert [m["state"]["global_step"] for m in epochs] == [6, 12]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_auto_epochs_follow_openai_rule(tmp_path, chat_file):
    cfg = TrainConfig(data=str(chat_file), out=str(tmp_path / "r"), base="tiny-llama")
    resolved = cfg.resolve(22)
    assert resolved.n_epochs == 4  # 22 * 3 < 100 -> 100 // 22
    assert resolved.batch_size == 4


def test_same_seed_same_losses_other_seed_differs(tmp_path, chat_file):
    train(config(tmp_path, chat_file, "a", seed=1, lora_dropout=0.1))
    train(config(tmp_path, chat_file, "b", seed=1, lora_dropout=0.1))
    train(config(tmp_path, chat_file, "c", seed=2, lora_dropout=0.1))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")


def test_resume_after_stop_gives_the_same_run(tmp_path, chat_file):
    train(config(tmp_path, chat_file, "whole", lora_dropout=0.1))
    calls = {"n": 0}

    def stop_at_step_8():
        calls["n"] += 1
        return "paused" if calls["n"] == 9 else None  # asked before each step: stop before step 9

    cfg = config(tmp_path, chat_file, "split", lora_dropout=0.1)
    with pytest.raises(TrainingStopped) as stopped:
        train(cfg, should_stop=stop_at_step_8)
    assert stopped.value.reason == "paused"
    assert read_meta(stopped.value.checkpoint)["state"]["global_step"] == 8
    result = train(cfg, resume=True)
    assert result.steps == 12
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
    # the interrupt checkpoint is superseded; only the epoch checkpoints stay
    assert [read_meta(c)["kind"] for c in checkpoint_dirs(tmp_path / "split")] == ["epoch", "epoch"]


def test_a_stop_right_after_an_epoch_keeps_that_epochs_checkpoint(tmp_path, chat_file):
    """A pause just as an epoch ended wrote its interrupt checkpoint under the epoch checkpoint's name
    (same step), replacing it; the resumed run's next checkpoint then pruned it as an interrupt one, so
    the epoch's checkpoint (listed by a job, a candidate for early stopping) was gone."""
    calls = {"n": 0}

    def stop_before_step_7():  # step 6 ended the first epoch
        calls["n"] += 1
        return "paused" if calls["n"] == 7 else None

    cfg = config(tmp_path, chat_file, "run", lora_dropout=0.1)
    with pytest.raises(TrainingStopped) as stopped:
        train(cfg, should_stop=stop_before_step_7)
    assert stopped.value.checkpoint.name == "step-000006" and read_meta(stopped.value.checkpoint)["kind"] == "epoch"
    train(cfg, resume=True)
    assert [(c.name, read_meta(c)["kind"]) for c in checkpoint_dirs(tmp_path / "run")] == [
        ("step-000006", "epoch"), ("step-000012", "epoch")]


def test_resuming_a_run_killed_before_its_first_checkpoint_says_it_starts_again(tmp_path, chat_file):
    cfg = config(tmp_path, chat_file, n_epochs=1)
    (tmp_path / "run").mkdir()  # what a run killed in its first steps leaves: a folder, no checkpoint
    said = []
    result = train(cfg, on_event=lambda e: said.append(e.get("message")), resume=True)
    assert "No checkpoint to resume from yet: training from the start" in said
    assert result.steps == len(metrics_log.read(tmp_path / "run")) > 0


@pytest.mark.parametrize("damage", [b"", b"\0" * 3000, b"not a checkpoint"])
def test_a_damaged_optimizer_state_is_named_and_nothing_is_lost(tmp_path, chat_file, damage):
    cfg = config(tmp_path, chat_file, n_epochs=3)
    with pytest.raises(TrainingStopped) as stopped:
        train(cfg, should_stop=lambda: "paused" if len(metrics_log.read(tmp_path / "run")) == 7 else None)
    state = stopped.value.checkpoint / "trainer.pt"
    state.write_bytes(damage)
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=f"{state}: the optimizer state of the newest checkpoint cannot be read"):
        train(cfg, resume=True)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before
    assert (stopped.value.checkpoint / "weights" / "adapter_model.safetensors").exists()


def test_a_run_folder_moved_while_stopped_resumes_where_it_now_is(tmp_path, chat_file):
    cfg = config(tmp_path, chat_file, n_epochs=2)
    with pytest.raises(TrainingStopped):
        train(cfg, should_stop=lambda: "paused" if len(metrics_log.read(tmp_path / "run")) == 5 else None)
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    (tmp_path / "run").rename(moved)
    said = []
    result = train(TrainConfig.load(moved), on_event=lambda e: said.append(e.get("message")), resume=True)
    assert "Resumed from checkpoint at step 5" in said  # not a new run from step 1 at the old path
    assert not (tmp_path / "run").exists()
    assert result.run_dir == str(moved) and [r["step"] for r in metrics_log.read(moved)] == list(range(1, 13))


def test_full_fine_tuning_and_reload(tmp_path, chat_file):
    result = train(config(tmp_path, chat_file, method="full", n_epochs=1))
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    model, tok = load_tuned(tmp_path / "run")
    assert not hasattr(model, "peft_config")
    assert result.final["train_loss"] > 0


def test_early_stopping_keeps_the_best_epoch(tmp_path, chat_file):
    # validation answers the training data contradicts: the better the model learns the training
    # pattern, the worse its validation loss gets, so early stopping must trigger
    valid = tmp_path / "contradicting.jsonl"
    valid.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"What is twice {i}?"},
                                 {"role": "assistant", "content": "zq zq zq zq zq"}]}) + "\n"
        for i in range(10)))
    result = train(config(tmp_path, chat_file, n_epochs=6, early_stopping_patience=1,
                          validation_data=str(valid), learning_rate_multiplier=3.0))
    valid = [r["valid_loss"] for r in metrics_log.read(tmp_path / "run") if "valid_loss" in r]
    assert result.stopped_early and len(valid) < 6
    best = min(checkpoint_dirs(tmp_path / "run"), key=lambda c: read_meta(c)["metrics"]["valid_loss"])
    assert (best / "weights" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_validation_file_replaces_the_held_out_split(tmp_path, chat_file):
    from tests.conftest import write_chat

    valid = write_chat(tmp_path / "valid.jsonl", 10)
    result = train(config(tmp_path, chat_file, validation_data=str(valid), n_epochs=1))
    assert result.steps == 6  # all 24 training examples, batch 4
    assert result.baseline["n_tokens"] > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_log_says_where_and_in_what_it_trains(tmp_path, chat_file, precision):
    events = []
    train(config(tmp_path, chat_file, n_epochs=1, precision=precision), on_event=events.append)
    first = events[0]["message"]
    assert first.startswith("Training on the CPU (") and ("bf16 autocast" in first) == (precision == "bf16")
    assert "no native bf16 here" not in first  # asked for by name: no reason to give
    # the tiny model's chat template opens every example with the same default system prompt
    said = [e["message"] for e in events if e.get("type") == "message"]
    assert any(m.startswith("All training examples start with the same ") for m in said)


def test_an_automatic_fp32_says_why_and_bf16_without_native_support_says_it_is_slow(monkeypatch):
    import torch

    from tuneforge.train import device

    assert device.describe(torch.device("cpu"), None, "auto").endswith("in fp32 (no native bf16 here)")
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert device.describe(torch.device("cpu"), torch.bfloat16, "bf16").endswith("(no native bf16 on this CPU: slower than fp32)")
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    assert device.describe(torch.device("cpu"), torch.bfloat16, "bf16").endswith("fp32 master weights")


def test_no_prefix_is_shared_where_dropout_draws_masks(tmp_path, chat_file):
    """A prefix laid out once would get one dropout mask for all examples: runs with dropout (and
    batches of one) lay it out in each example, and the log does not claim otherwise."""

    from tuneforge.models.adapters import prepare_for_training
    from tuneforge.models.tiny import tiny_model
    from tuneforge.train.loss import draws_masks
    from tuneforge.train.model import from_transformers

    for dropout, batch_size in ((0.1, 4), (0.0, 1)):
        events = []
        train(config(tmp_path, chat_file, f"r{dropout}{batch_size}", n_epochs=1, lora_dropout=dropout,
                     batch_size=batch_size), on_event=events.append)
        assert not any(str(e.get("message")).startswith("All training examples start with") for e in events)
    model = prepare_for_training(from_transformers(tiny_model()[0]), "lora", rank=4, alpha=8, dropout=0.1, targets=["q_proj"])
    assert draws_masks(model.train()) and not draws_masks(model.eval())
    plain = prepare_for_training(from_transformers(tiny_model()[0]), "lora", rank=4, alpha=8, dropout=0.0, targets=["q_proj"])
    assert not draws_masks(plain.train())
    plain.config = dataclasses.replace(plain.config, attention_dropout=0.1)
    assert draws_masks(plain)


def test_a_long_raw_text_is_trained_on_all_of_it(tmp_path):
    from tuneforge.models.load import load_tokenizer

    text = tmp_path / "doc.txt"
    text.write_text(" ".join(f"word{i % 50}" for i in range(600)) + "\n")  # one document, far over 64 tokens
    result = train(config(tmp_path, text, n_epochs=1, max_length=64))
    n = len(load_tokenizer("tiny-llama")(text.read_text().strip(), add_special_tokens=False)["input_ids"])
    assert result.trained_tokens >= n  # every token, not the first 64
    assert result.steps * 4 >= -(-n // 64)  # as consecutive sequences of at most 64 tokens


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_continues_from_a_finished_runs_weights(tmp_path, chat_file, method):
    """Continued fine-tuning (OpenAI's fine-tuning of an ft: model): the new run starts where the
    earlier one ended - its base-model validation loss is the earlier run's last - with the earlier
    run's base, method and LoRA shape, whatever the new config said."""
    from tests.conftest import write_chat

    held = write_chat(tmp_path / "held.jsonl", 6)
    first = train(config(tmp_path, chat_file, "first", method=method, lora_rank=4, validation_data=str(held)))
    cfg = dataclasses.replace(config(tmp_path, chat_file, "second", n_epochs=1, validation_data=str(held),
                                     init_from=str(tmp_path / "first")), base="no-such-base")
    said = []
    train(cfg, on_event=lambda e: said.append(e.get("message")))
    saved = TrainConfig.load(tmp_path / "second")
    assert (saved.base, saved.method, saved.lora_rank, saved.init_from) == (
        "tiny-llama", method, 4, str(tmp_path / "first"))
    baseline = json.loads((tmp_path / "second" / "baseline.json").read_text())["loss"]
    assert baseline == pytest.approx(first.final["valid_loss"], rel=1e-4)
    assert f"Continuing from the trained weights of {tmp_path / 'first'}" in said
    assert any(m.startswith("Starting validation loss ") for m in said if m)  # (not the base model's)
    # a continued run stopped, then resumed once the earlier run is gone: from its own checkpoint
    third = dataclasses.replace(cfg, out=str(tmp_path / "third"), n_epochs=2, base="tiny-llama")
    with pytest.raises(TrainingStopped):
        train(third, should_stop=lambda: "paused" if len(metrics_log.read(tmp_path / "third")) == 3 else None)
    import shutil

    shutil.rmtree(tmp_path / "first")
    assert train(TrainConfig.load(tmp_path / "third"), resume=True).steps == len(metrics_log.read(tmp_path / "third"))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    TrainConfig(data=str(chat_file), out=str(unfinished), base="tiny-llama").save(unfinished)
    with pytest.raises(ValueError, match=rf"^{unfinished}: has not finished training, so it has no weights"):
        train(dataclasses.replace(cfg, out=str(tmp_path / "fourth"), init_from=str(unfinished)))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_continues_from_a_checkpoint_of_an_unfinished_run(tmp_path, chat_file, method):
    """OpenAI's job on a ckpt-step-N model: the new run starts from that checkpoint's weights - its
    starting validation loss is the one measured on them when the checkpoint was written - with the
    source run's base, method and LoRA shape, though the source run never finished."""
    import shutil

    from tests.conftest import write_chat

    held = write_chat(tmp_path / "held.jsonl", 6)
    first = tmp_path / "first"
    with pytest.raises(TrainingStopped):  # stopped one step into its second epoch
        train(config(tmp_path, chat_file, "first", method=method, lora_rank=4, validation_data=str(held)),
              should_stop=lambda: "paused" if len(metrics_log.read(first)) == 7 else None)
    epoch, interrupt = checkpoint_dirs(first)
    assert (read_meta(epoch)["kind"], read_meta(interrupt)["kind"]) == ("epoch", "interrupt")
    base_loss = json.loads((first / "baseline.json").read_text())["loss"]
    for name, given in (("second", epoch), ("third", epoch / "weights")):
        said = []
        cfg = dataclasses.replace(config(tmp_path, chat_file, name, n_epochs=1, validation_data=str(held),
                                         init_from=str(given)), base="no-such-base")
        train(cfg, on_event=lambda e, said=said: said.append(e.get("message")))
        saved = TrainConfig.load(tmp_path / name)
        assert (saved.base, saved.method, saved.lora_rank, saved.init_from) == ("tiny-llama", method, 4, str(epoch))
        start = json.loads((tmp_path / name / "baseline.json").read_text())["loss"]
        assert start == pytest.approx(read_meta(epoch)["metrics"]["valid_loss"], rel=1e-4) and start != base_loss
        assert f"Continuing from the trained weights of {epoch}" in said
    # the unfinished run itself has no final weights: the refusal names its newest checkpoint instead
    with pytest.raises(ValueError, match=rf"has not finished training.*--init-from {interrupt}\)$"):
        train(dataclasses.replace(cfg, out=str(tmp_path / "fourth"), init_from=str(first)))
    shutil.rmtree(interrupt / "weights")
    with pytest.raises(ValueError, match=rf"^{interrupt / 'weights'}: the checkpoint's trained weights are missing"):
        train(dataclasses.replace(cfg, out=str(tmp_path / "fifth"), init_from=str(interrupt)))
    assert not (tmp_path / "fifth").exists()


def test_init_from_a_folder_that_is_not_there_names_it(tmp_path):
    """A checkpoint path under a missing run said "RUN: not a tuneforge run folder" (its run's config
    was read first): the path given is named, as given."""
    given = str(tmp_path / "gone" / "checkpoints" / "step-000002")
    cfg = TrainConfig(data=str(tmp_path / "d.jsonl"), out=str(tmp_path / "out"), init_from=given)
    with pytest.raises(FileNotFoundError, match=rf"^{given}: no such folder"):
        cfg.continued_from()
