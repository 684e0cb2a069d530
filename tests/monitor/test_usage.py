"""Usage aggregates over real rows in the database: per model with p95 latency, per hour or day
with the empty buckets kept, and the same tokens priced at OpenAI's fine-tuned model rates."""

from __future__ import annotations

import pytest

from tuneforge.monitor.usage import openai_cost, percentile, summary, timeline
from tuneforge.store.database import UsageRow, session

DAY = 86400
T0 = 1_700_000_000 // DAY * DAY  # a UTC midnight


def add(created_at: float, model: str | None = "m", latency: float = 10.0, prompt: int = 0, completion: int = 0,
        status: int = 200, project: str = "p") -> None:
    with session() as s:
        s.add(UsageRow(project=project, model=model, method="POST", path="/v1/chat/completions", status=status,
                       latency_ms=latency, prompt_tokens=prompt, completion_tokens=completion, created_at=created_at))
        s.commit()


def test_summary_has_the_p95_latency_per_model():
    for i in range(1, 21):  # latencies 10..200 ms for model m: p95 by nearest rank is the 19th, 190
        add(T0 + i, latency=10.0 * i, prompt=3, completion=2, status=500 if i == 7 else 200)
    add(T0 + 30, model="other", latency=5.0)
    add(T0 + 40, model="m", latency=999.0, project="elsewhere")
    rows = {r["model"]: r for r in summary("p")}
    assert rows["m"]["p95_latency_ms"] == 190.0 and rows["m"]["mean_latency_ms"] == 105.0
    assert (rows["m"]["requests"], rows["m"]["prompt_tokens"], rows["m"]["completion_tokens"], rows["m"]["errors"]) == (
        20, 60, 40, 1)
    assert rows["other"]["p95_latency_ms"] == 5.0
    assert {r["model"] for r in summary("p", since=T0 + 25)} == {"other"}


def test_the_databases_p95_is_the_nearest_rank_one_for_any_group_size():
    import random

    rng = random.Random(7)
    latencies: dict = {}
    for i in range(300):  # groups of 1 to ~150 requests, with ties; calls without a model too
        model = rng.choice(["a", "b", None]) if i > 2 else f"single-{i}"
        latency = float(rng.randint(1, 60))
        latencies.setdefault(model, []).append(latency)
        add(T0 + i, model=model, latency=latency)
    got = {r["model"]: r for r in summary("p")}
    assert {m: r["p95_latency_ms"] for m, r in got.items()} == {m: percentile(v, 95) for m, v in latencies.items()}
    assert {m: r["requests"] for m, r in got.items()} == {m: len(v) for m, v in latencies.items()}
    assert [r["model"] for r in summary("p")][0] is None  # calls without a model first


def test_percentile_is_a_value_that_occurred():
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([5.0, 1.0, 4.0, 2.0, 3.0], 95) == 5.0


def test_timeline_buckets_by_day_with_empty_days_kept():
    add(T0 + 100, prompt=10, completion=5)
    add(T0 + 200, prompt=1, completion=1, status=404)
    add(T0 + 2 * DAY + 5, prompt=7, completion=3)
    add(T0 + 2 * DAY + 6, project="elsewhere", prompt=100)
    days = timeline("p", since=T0 + 50, until=T0 + 3 * DAY + 1)
    assert [d["start"] for d in days] == [T0, T0 + DAY, T0 + 2 * DAY, T0 + 3 * DAY]
    assert [(d["requests"], d["prompt_tokens"], d["completion_tokens"], d["errors"]) for d in days] == [
        (2, 11, 6, 1), (0, 0, 0, 0), (1, 7, 3, 0), (0, 0, 0, 0)]
    hours = timeline("p", since=T0 + 2 * DAY, bucket_seconds=3600, until=T0 + 2 * DAY + 7200)
    assert [h["requests"] for h in hours] == [1, 0, 0]
    assert timeline("p", since=None, until=T0 + 2 * DAY + 1)[0]["start"] == T0  # all time: from the first request
    assert timeline("nobody", since=None) == []


def test_openai_cost_prices_input_and_output_tokens():
    traffic = [{"prompt_tokens": 600_000, "completion_tokens": 500_000}, {"prompt_tokens": 400_000, "completion_tokens": 0}]
    costs = {c["model"]: c["usd"] for c in openai_cost(traffic)}
    assert costs["gpt-4o-mini"] == pytest.approx(0.3 + 0.5 * 1.2)
    assert costs["gpt-4o"] == pytest.approx(3.75 + 0.5 * 15.0)
    assert all(c["usd"] == 0 for c in openai_cost([]))
