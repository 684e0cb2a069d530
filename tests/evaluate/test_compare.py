"""Base vs tuned on held-out data, on the tiny model."""

from __future__ import annotations

import json

from tests.conftest import write_chat, write_pairs
from tuneforge.data.example import Example
from tuneforge.evaluate.compare import compare, is_classification
from tuneforge.evaluate.report import format_comparison
from tuneforge.train.config import TrainConfig
from tuneforge.train.loop import train


def test_tuned_beats_base_on_held_out_data(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 40)
    held = write_chat(tmp_path / "held.jsonl", 12)
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), base="tiny-llama", n_epochs=3,
                      batch_size=4, learning_rate_multiplier=3.0))
    seen = []
    report = compare(tmp_path / "run", held, n_samples=2, max_tokens=8, on_progress=lambda d, t: seen.append((d, t)))
    assert seen == [(d, 6) for d in range(1, 7)]  # loss + 2 samples, for base then tuned
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


def test_preference_pairs_are_scored_on_how_the_models_rank_the_answers(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 24)
    held = write_pairs(tmp_path / "held.jsonl", 30)  # persons 24-29 were never seen
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), base="tiny-llama", objective="dpo",
                      n_epochs=2, batch_size=4, learning_rate_multiplier=10.0))
    seen = []
    report = compare(tmp_path / "run", held, n_samples=1, max_tokens=4, on_progress=lambda d, t: seen.append((d, t)))
    assert seen == [(d, 6) for d in range(1, 7)]  # loss + ranking + 1 sample, for base then tuned
    assert report["preference_pairs"] == 30 and report["n_examples"] == 30
    assert report["tuned"]["preference_accuracy"] >= report["base"]["preference_accuracy"]
    assert report["tuned"]["preference_margin"] > report["base"]["preference_margin"]
    assert report["references"][0] == "Hello, person 0!"  # the preferred answer is the reference
    assert "preferred ranked first" in format_comparison(report)
