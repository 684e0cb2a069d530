import pytest

from tuneforge.data.example import Example
from tuneforge.data.render import IGNORE, Rendered
from tuneforge.data.stats import (
    TokenStats,
    distribution,
    estimate_costs,
    estimate_local_seconds,
    load_pricing,
    resolve_n_epochs,
)
from tuneforge.models.tiny import tiny_tokenizer


@pytest.mark.parametrize(
    "n, epochs",
    [(1, 25), (3, 25), (5, 20), (10, 10), (33, 3), (34, 3), (50, 3), (100, 3), (8333, 3), (8334, 2),
     (10000, 2), (25001, 1)],
)
def test_resolve_n_epochs_matches_openai(n, epochs):
    assert resolve_n_epochs(n) == epochs


def test_resolve_n_epochs_needs_examples():
    with pytest.raises(ValueError):
        resolve_n_epochs(0)


def test_distribution():
    assert distribution([1, 2, 3, 4, 10]) == {
        "min": 1.0, "max": 10.0, "mean": 4.0, "median": 3.0, "p10": pytest.approx(1.4), "p90": pytest.approx(7.6),
    }


def chat(system: str, user: str, answer: str) -> Example:
    return Example("chat", [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ])


def test_token_counts_with_the_byte_level_tokenizer():
    # ChatML: each turn is <|im_start|> role \n content <|im_end|> \n; the tiny tokenizer makes one
    # token per byte plus one per special token. The answer's loss covers "ok" <|im_end|> (the "\n"
    # after it is the template's separator: render.learned_end).
    chat_tokens = 6 + len("system\nS\nuser\nhi\nassistant\nok\n")  # 36
    examples = [chat("S", "hi", "ok"), Example("text", text="hello"), chat("S", "hi", "ok")]
    examples[2].messages[2]["weight"] = 0
    stats = TokenStats.compute(examples, tiny_tokenizer(), max_length=30)
    assert chat_tokens == 36
    assert stats.tokens_per_example["min"] == 6  # "hello" + end of text
    assert stats.tokens_per_example["max"] == 36
    assert stats.loss_tokens_per_example["max"] == 6  # raw text trains on every token
    assert stats.loss_tokens_per_example["median"] == 3
    assert stats.loss_tokens_per_example["min"] == 0  # weight 0
    assert stats.messages_per_example == distribution([3, 0, 3])
    assert stats.n_truncated == 2
    assert stats.billing_tokens == 36 + 6 + 36
    assert stats.trained_tokens == 30 + 6 + 30


def test_preference_counts_prompt_and_chosen_answer():
    ex = Example("preference", [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
                 chosen=[{"role": "assistant", "content": "ok"}], rejected=[{"role": "assistant", "content": "no"}])
    stats = TokenStats.compute([ex], tiny_tokenizer())
    assert stats.tokens_per_example["max"] == 36 and stats.loss_tokens_per_example["max"] == 3
    assert stats.messages_per_example["max"] == 3


def test_billing_caps_each_example_at_16385_tokens():
    long = Rendered(list(range(20000)), [IGNORE] * 20000)
    short = Rendered([1, 2, 3], [IGNORE, 2, 3])
    stats = TokenStats.from_rendered([chat("S", "hi", "ok")] * 2, [long, short], max_length=4096)
    assert stats.billing_tokens == 16385 + 3
    assert stats.trained_tokens == 4096 + 3
    assert stats.n_truncated == 1 and stats.n_sequences == 2


def test_a_long_text_counts_every_token_in_its_windows():
    """A text longer than max_length trains as windows of max_length (render_sequences): all its
    tokens are trained and billed (each window an example of its own), none cut."""
    long = Rendered(list(range(20000)), list(range(20000)))
    stats = TokenStats.from_rendered([Example("text", text="x")], [long], max_length=4096)
    assert stats.n_sequences == 5  # 4 x 4096 + 3616
    assert stats.trained_tokens == stats.billing_tokens == 20000
    assert stats.n_truncated == 0


def test_a_texts_one_token_tail_is_not_a_sequence():
    """render.window_spans leaves out a last window of one token (it trains nothing): stats agree."""
    tail = Rendered(list(range(8193)), list(range(8193)))
    stats = TokenStats.from_rendered([Example("text", text="x")], [tail], max_length=4096)
    assert (stats.n_sequences, stats.trained_tokens, stats.n_truncated) == (2, 8192, 0)


def test_estimate_costs_from_pricing_table():
    pricing = load_pricing()
    assert pricing["as_of"] and pricing["source"]
    costs = {c["model"]: c for c in estimate_costs(10_000, 3)}
    assert set(costs) == {"gpt-3.5-turbo", "gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"}
    assert costs["gpt-3.5-turbo"]["usd"] == pytest.approx(0.24)
    assert costs["gpt-4o-mini"]["usd"] == pytest.approx(0.09)
    assert costs["gpt-4o"]["usd"] == pytest.approx(0.75)
    assert costs["gpt-4.1-mini"]["usd"] == pytest.approx(0.15)
    assert costs["gpt-4o"]["trained_tokens"] == 30_000 and costs["gpt-4o"]["as_of"].startswith("2025")


def test_estimate_local_seconds():
    assert estimate_local_seconds(5000, 250.0) == 20.0
    assert estimate_local_seconds(5000, None) is None
    assert estimate_local_seconds(5000, 0) is None
