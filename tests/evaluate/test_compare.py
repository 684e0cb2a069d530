"""Base vs tuned on held-out data, on the tiny model."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import write_chat, write_pairs
from tuneforge.data.example import Example
from tuneforge.data.validate import DataError
from tuneforge.evaluate.compare import compare, is_classification
from tuneforge.evaluate.report import format_comparison
from tuneforge.train.checkpoint import checkpoint_dirs
from tuneforge.train.config import TrainConfig
from tuneforge.train.loop import train


def test_tuned_beats_base_on_held_out_data(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 40)
    held = write_chat(tmp_path / "held.jsonl", 12)
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), base="tiny-llama", n_epochs=3,
                      batch_size=4, learning_rate_multiplier=3.0))
    seen = []
    report = compare(tmp_path / "run", held, n_samples=2, max_tokens=8, on_progress=lambda d, t: seen.append((d, t)))
    assert seen == [(d, 6) for d in range(7)]  # (0: counted) loss + 2 samples, for base then tuned
    assert report["tuned"]["loss"] < report["base"]["loss"]
    assert report["tuned"]["token_accuracy"] > report["base"]["token_accuracy"]
    assert report["n_examples"] == 12 and len(report["base"]["samples"]) == 2
    assert report["fit"]["verdict"] in {"good_fit", "overfitting", "underfitting"}
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["tuned"] == report["tuned"]
    text = format_comparison(report)
    assert "cross-entropy" in text and "tuned:" in text


def test_classification_is_recognised_and_scored(tmp_path):
    rows = [("great film", "positive"), ("awful", "negative"), ("loved it", "positive"),
            ("boring", "negative")] * 4
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t},
                                                      {"role": "assistant", "content": label}]}) + "\n"
                            for t, label in rows))
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), base="tiny-llama", n_epochs=1))
    report = compare(tmp_path / "run", data, n_samples=1, max_tokens=4)
    assert report["classification"] is True
    assert 0.0 <= report["tuned"]["exact_match"] <= 1.0


def test_long_free_text_answers_are_not_classification():
    ex = [Example("chat", [{"role": "user", "content": "q"},
                           {"role": "assistant", "content": f"a long answer number {i} here"}])
          for i in range(8)]
    assert not is_classification(ex)


def test_a_converted_classification_file_is_classification_however_small():
    """Five held-out examples over three labels: too few for the short-answers rule (at most n/2 labels),
    but data convert's system prompt names the label set, and every answer is one of them."""
    from tuneforge.data.convert import from_dataframe

    df = pd.DataFrame({"text": ["good", "bad", "meh", "great", "awful"], "label": ["pos", "neg", "mid", "pos", "neg"]})
    ex = [Example("chat", r["messages"]) for r in from_dataframe(df, text_col="text", label_col="label")]
    assert is_classification(ex)
    ex[0].messages[-1]["content"] = "positive, I think"  # an answer outside the listed labels
    assert not is_classification(ex)


def test_preference_pairs_are_scored_on_how_the_models_rank_the_answers(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 24)
    held = write_pairs(tmp_path / "held.jsonl", 30)  # persons 24-29 were never seen
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), base="tiny-llama", objective="dpo",
                      n_epochs=2, batch_size=4, learning_rate_multiplier=10.0))
    seen = []
    report = compare(tmp_path / "run", held, n_samples=1, max_tokens=4, on_progress=lambda d, t: seen.append((d, t)))
    assert seen == [(d, 6) for d in range(7)]  # (0: counted) loss + ranking + 1 sample, for base then tuned
    assert report["preference_pairs"] == 30 and report["n_examples"] == 30
    assert report["tuned"]["preference_accuracy"] >= report["base"]["preference_accuracy"]
    assert report["tuned"]["preference_margin"] > report["base"]["preference_margin"]
    assert report["references"][0] == "Hello, person 0!"  # the preferred answer is the reference
    assert "preferred ranked first" in format_comparison(report)


def tiny_run(tmp_path: Path, **settings) -> Path:
    data = write_chat(tmp_path / "train.jsonl", 12)
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), base="tiny-llama", n_epochs=1, **settings))
    return tmp_path / "run"


def write_chats(path: Path, *chats: tuple) -> Path:
    """(user content, assistant content[, assistant weight]) per line: content a string or parts."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}
                          | ({"weight": w[0]} if w else {})]} for q, a, *w in chats]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def not_json(constant: str):
    raise AssertionError(f"{constant} is not JSON")


def test_held_out_data_is_checked_as_training_data_is(tmp_path, caplog):
    run = tiny_run(tmp_path, max_length=64)
    # truncation to 64 tokens leaves none of the answer: once scored as loss 0.000, perplexity 1.00
    long = write_chats(tmp_path / "long.jsonl", ("word " * 40, "A short answer here."), ("q", "a"))
    with pytest.raises(DataError, match="line 1: example_too_long"):
        compare(run, long, n_samples=0)
    assert not (run / "eval.json").exists()
    # an answer of weight 0 teaches nothing in training: nothing to score either, and not counted
    quiet = write_chats(tmp_path / "quiet.jsonl", ("q1", "a1"), ("q2", "a2", 0), ("q3", "a3"))
    with caplog.at_level(logging.WARNING, logger="tuneforge.evaluate.compare"):
        report = compare(run, quiet, n_samples=0)
    assert report["n_examples"] == 2 and report["base"]["n_tokens"] == report["tuned"]["n_tokens"] > 0
    assert "1 example(s) left out, every answer with weight 0: nothing to score (line 2)" in caplog.text


def test_content_parts_are_read_as_their_text(tmp_path):
    run = tiny_run(tmp_path)
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "a tensor?"}]
    label = [{"type": "text", "text": "yes"}]
    held = write_chats(tmp_path / "parts.jsonl", *[(parts, label)] * 2, *[("Is it?", "no")] * 2)
    report = compare(run, held, n_samples=1, max_tokens=2)
    assert report["classification"] is True  # (a parts answer was no label: .strip() of a list)
    assert report["prompts"] == ["What is a tensor?"] and report["references"] == ["yes"]
    assert "Q: What is a tensor?" in format_comparison(report)


def test_a_model_whose_loss_is_nan_gives_valid_json_and_says_so(tmp_path):
    run = tiny_run(tmp_path)
    adapter = run / "adapter" / "adapter_model.safetensors"  # what a diverged training leaves
    save_file({k: torch.full_like(v, math.nan) for k, v in load_file(adapter).items()}, adapter,
              metadata={"format": "pt"})
    report = compare(run, write_chat(tmp_path / "held.jsonl", 4), n_samples=0)
    assert math.isnan(report["tuned"]["loss"]) and not math.isnan(report["base"]["loss"])
    saved = json.loads((run / "eval.json").read_text(), parse_constant=not_json)
    assert saved["tuned"]["loss"] is None and saved["tuned"]["perplexity"] is None
    assert saved["base"] == report["base"]
    assert "the tuned model's loss is not a number (NaN)" in format_comparison(report)


def test_a_negative_sample_count_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="samples must be at least 0, got -2"):
        compare(tmp_path / "no-run", tmp_path / "no.jsonl", n_samples=-2)


def test_weights_that_do_not_fit_the_base_are_a_user_error(tmp_path):
    from tuneforge.models.tiny import tiny_model

    run = tiny_run(tmp_path)
    model, tokenizer = tiny_model(hidden_size=32)  # the same kind of model, half as wide
    model.save_pretrained(tmp_path / "narrow")
    tokenizer.save_pretrained(tmp_path / "narrow")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"base": str(tmp_path / "narrow")}))
    with pytest.raises(ValueError, match=r"run's weights do not fit its base model .*narrow: size mismatch for "
                                         r".* \(and \d+ more\)$"):
        compare(run, write_chat(tmp_path / "held.jsonl", 4), n_samples=0)


def test_scoring_on_the_training_file_is_warned_of(tmp_path, caplog):
    run = tiny_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tuneforge.evaluate.compare"):
        compare(run, TrainConfig.load(run).data, n_samples=0)
    assert "is the run's training file" in caplog.text


def test_a_continued_pre_training_run_is_scored_on_held_out_text(tmp_path):
    """Raw text trains on every token; held-out text is scored the same way (it was refused: 'no
    examples with an assistant answer'), and a sample continues the first half of a text."""
    lines = [f"The river {i} runs past the mill and the old stone bridge toward the sea." for i in range(24)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:20]))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[20:]))
    train(TrainConfig(data=str(tmp_path / "train.jsonl"), out=str(tmp_path / "run"), base="tiny-llama",
                      n_epochs=3, learning_rate_multiplier=3.0, validation_split=0))
    report = compare(tmp_path / "run", tmp_path / "held.jsonl", n_samples=1, max_tokens=4)
    assert report["n_examples"] == 4 and report["tuned"]["loss"] < report["base"]["loss"]
    assert report["prompts"] == ["The river 20 runs past the mill"]
    assert report["references"] == [" and the old stone bridge toward the sea."]
    assert len(report["tuned"]["samples"]) == 1
    assert "held-out examples" in format_comparison(report)


def test_a_long_held_out_text_is_scored_in_every_window_and_sampled_within_the_first(tmp_path):
    """A held-out document longer than max_length is scored on all its windows, as it would train
    (it was cut at max_length), and its sample continues the first half of its first window, text
    the model can take in - not the first half of the whole document."""
    from tuneforge.data.render import render_text
    from tuneforge.evaluate.compare import _held_out, _prompt
    from tuneforge.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    text = " ".join(f"word{i}" for i in range(300))
    (tmp_path / "held.jsonl").write_text(json.dumps({"text": text}) + "\n")
    _, examples, rendered = _held_out(tmp_path / "held.jsonl", tok, 64)
    whole = render_text(Example("text", text=text), tok).input_ids
    assert [t for r in rendered for t in r.input_ids] == whole and len(rendered) == math.ceil(len(whole) / 64)
    (sampled,) = examples
    assert text.startswith(sampled.text + " ") and len(tok(sampled.text)["input_ids"]) <= 64
    assert _prompt(sampled) == "word0 word1 word2 word3 word4"


def test_a_held_out_text_is_sampled_from_its_text_as_plain_text(tmp_path, monkeypatch):
    """A text trains with special-token text in it as plain text (data.render.render_text); the sample
    of a held-out text continues its first half tokenised the same way. It went through the raw-prompt
    path, where a quoted <|im_end|> became the end-of-turn token in the middle of the prompt."""
    from tuneforge.data.render import encode
    from tuneforge.evaluate import compare as compare_module
    from tuneforge.models.generate import input_ids
    from tuneforge.models.tiny import tiny_tokenizer

    lines = [f"In ChatML a turn {i} ends with <|im_end|> and the next one starts with <|im_start|> again."
             for i in range(14)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:12]))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[12:]))
    train(TrainConfig(data=str(tmp_path / "train.jsonl"), out=str(tmp_path / "run"), base="tiny-llama",
                      n_epochs=1, validation_split=0))
    sampled, real = [], compare_module.complete
    monkeypatch.setattr(compare_module, "complete", lambda model, tokenizer, prompt, sampling: (
        sampled.append(input_ids(tokenizer, prompt)), real(model, tokenizer, prompt, sampling))[1])
    report = compare(tmp_path / "run", tmp_path / "held.jsonl", n_samples=1, max_tokens=2)
    tok = tiny_tokenizer()
    (prompt,) = report["prompts"]
    assert "<|im_end|>" in prompt
    assert sampled == [encode(tok, prompt, split_special_tokens=True)] * 2  # base and tuned
    assert tok.convert_tokens_to_ids("<|im_end|>") not in sampled[0]


def test_a_damaged_run_config_is_named(tmp_path):
    """A run folder's config.json that is not JSON (an edit gone wrong, a copy cut short) was said as
    json's bare "Expecting property name ... (char 1)": which file?"""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"^{run / 'config.json'}: not valid JSON \(.*line 1 column 2"):
        compare(run, write_chat(tmp_path / "held.jsonl", 4), n_samples=0)
    (run / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=rf"^{run / 'config.json'}: not a run's settings \(a JSON object\)"):
        compare(run, write_chat(tmp_path / "held.jsonl", 4), n_samples=0)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_damaged_weights_file_is_a_user_error_naming_it(tmp_path, method):
    """Weights cut short (a copy that did not finish, a full disk) were a SafetensorError traceback."""
    run = tiny_run(tmp_path, method=method)
    weights = run / ("adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"^{weights}: not a readable weights file \(.*\): damaged or cut short"):
        compare(run, write_chat(tmp_path / "held.jsonl", 4), n_samples=0)


def test_a_run_without_weights_says_what_to_do(tmp_path):
    """An unfinished run is pointed at --resume alone: no command takes the checkpoints/*/weights the
    message also offered. A finished run whose weights went missing is not 'unfinished' (--resume
    refuses it: 'has finished training')."""
    import shutil

    run = tiny_run(tmp_path)
    held = write_chat(tmp_path / "held.jsonl", 4)
    shutil.rmtree(run / "adapter")
    with pytest.raises(FileNotFoundError, match=rf"^{run}: the finished run's weights are missing \(no adapter/ or "
                                                r"model/ folder holding adapter_model.safetensors or model.safetensors\)$"):
        compare(run, held, n_samples=0)
    (run / "result.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"^{run}: no trained weights yet \(the run has not finished\): "
                                                rf"continue it with tuneforge train --resume {run}$"):
        compare(run, held, n_samples=0)


def test_the_fit_verdict_reads_the_base_models_validation_loss(tmp_path):
    """A one-epoch run with validation data has a verdict (it was always 'unknown'); a damaged
    baseline.json is named, before any model loads."""
    held = write_chat(tmp_path / "held.jsonl", 4)
    run = tiny_run(tmp_path, validation_data=str(held))
    base = json.loads((run / "baseline.json").read_text())["loss"]
    fit = compare(run, held, n_samples=0)["fit"]
    assert fit["verdict"] != "unknown" and fit["base_valid_loss"] == pytest.approx(base)
    (run / "baseline.json").write_text('{"loss": ')
    with pytest.raises(ValueError, match=rf"^{run / 'baseline.json'}: damaged \(.*\); delete it"):
        compare(run, held, n_samples=0)


def write_labels(path: Path) -> Path:
    rows = [("great film", "positive"), ("awful", "negative"), ("loved it", "positive"), ("boring", "negative")] * 4
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t},
                                                      {"role": "assistant", "content": label}]}) + "\n"
                            for t, label in rows))
    return path


def test_a_continued_run_is_compared_with_the_model_it_started_from(tmp_path, caplog):
    """A continued run (--init-from) was compared with the bare base, not with what its user had before
    it: the earlier run's model. Its "before" numbers, exact matches and samples are that model's (the
    earlier run's own "tuned" ones); once those weights are gone it is the base, said in one line."""
    import shutil

    data, held = write_labels(tmp_path / "train.jsonl"), write_labels(tmp_path / "held.jsonl")
    first, second = tmp_path / "first", tmp_path / "second"
    train(TrainConfig(data=str(data), out=str(first), base="tiny-llama", n_epochs=1))
    train(TrainConfig(data=str(data), out=str(second), n_epochs=1, init_from=str(first)))
    earlier = compare(first, held, n_samples=2, max_tokens=4)
    report = compare(second, held, n_samples=2, max_tokens=4)
    assert report["classification"] and report["base"] == earlier["tuned"]
    assert (report["before"], report["continued_from"]) == (str(first), str(first))
    assert (earlier["before"], earlier["continued_from"]) == ("tiny-llama", None)
    assert json.loads((second / "eval.json").read_text())["before"] == str(first)
    text = format_comparison(report)
    assert f"earlier: {first}, the model this run continued training from" in text
    assert "     earlier       tuned" in text and "earlier: " in text.split("Q: ")[1]
    assert "base" not in format_comparison(report).split("Q: ")[0]
    shutil.rmtree(first / "adapter")  # the earlier run's weights deleted
    with caplog.at_level(logging.WARNING, logger="tuneforge.evaluate.compare"):
        fallback = compare(second, held, n_samples=2, max_tokens=4)
    assert fallback["base"] == earlier["base"] and fallback["before"] == "tiny-llama"
    assert [r.getMessage() for r in caplog.records if r.name == "tuneforge.evaluate.compare"] == [
        f"{first}: the weights this run continued training from are gone: comparing with the base model "
        "tiny-llama instead"]
    assert f"base: tiny-llama ({first}, the model this run continued training from, is gone)" in \
        format_comparison(fallback)


def test_a_continued_preference_run_is_ranked_against_the_checkpoint_it_started_from(tmp_path):
    """The ranking of preference pairs too is the starting model's: here a checkpoint of a full run (its
    last epoch's, whose weights are the run's final ones)."""
    data, held = write_pairs(tmp_path / "pairs.jsonl", 24), write_pairs(tmp_path / "held.jsonl", 30)
    first, second = tmp_path / "first", tmp_path / "second"
    train(TrainConfig(data=str(data), out=str(first), base="tiny-llama", objective="dpo", method="full",
                      n_epochs=2, batch_size=4, learning_rate_multiplier=10.0))
    ckpt = checkpoint_dirs(first)[-1]
    train(TrainConfig(data=str(data), out=str(second), objective="dpo", n_epochs=1, batch_size=4,
                      init_from=str(ckpt)))
    earlier = compare(first, held, n_samples=1, max_tokens=4)
    report = compare(second, held, n_samples=1, max_tokens=4)
    assert report["base"] == earlier["tuned"] and report["before"] == str(ckpt)
    assert report["base"]["preference_accuracy"] != earlier["base"]["preference_accuracy"] or \
        report["base"]["preference_margin"] != earlier["base"]["preference_margin"]
    assert f"earlier: {ckpt}, the model this run continued training from" in format_comparison(report)
