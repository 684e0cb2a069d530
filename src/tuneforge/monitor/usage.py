"""Per-request usage: who called what, how many tokens, how long it took and how it ended.

One row per API request (written by the server's usage middleware). `summary()` aggregates it per
model (with the 95th-percentile latency: a mean hides the slow requests users notice), `timeline()`
per hour or day for a chart, and `openai_cost()` prices the tokens at OpenAI's rates for fine-tuned
models - what the same traffic would have cost there (data/pricing.json, a rough guide).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..data.stats import load_pricing
from ..store.database import UsageRow, now, session


@dataclass
class UsageRecord:
    method: str
    path: str
    status: int
    latency_ms: float
    key_id: str | None = None
    project: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def record(s: Session, rec: UsageRecord) -> None:
    s.add(UsageRow(**rec.__dict__))
    s.commit()


def _scoped(q, project: str | None, since: float | None):
    if project is not None:
        q = q.where(UsageRow.project == project)
    if since is not None:
        q = q.where(UsageRow.created_at >= since)
    return q


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank: a latency some request actually had."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(project: str | None = None, since: float | None = None, database_url: str | None = None) -> list[dict]:
    """Requests, tokens, errors, mean and 95th-percentile latency per (project, model), optionally
    since a time; ordered by project and model, calls without a model first. One read of the rows:
    a percentile is not an aggregate SQLite and PostgreSQL share, so all of it is counted here."""
    q = _scoped(select(UsageRow.project, UsageRow.model, UsageRow.prompt_tokens, UsageRow.completion_tokens,
                       UsageRow.status, UsageRow.latency_ms), project, since)
    groups: dict[tuple, list] = {}
    with session(database_url) as s:
        for row in s.execute(q):
            groups.setdefault((row.project, row.model), []).append(row)
    return [
        {
            "project": key[0],
            "model": key[1],
            "requests": len(rows),
            "prompt_tokens": sum(r.prompt_tokens or 0 for r in rows),
            "completion_tokens": sum(r.completion_tokens or 0 for r in rows),
            "errors": sum(r.status >= 400 for r in rows),
            "mean_latency_ms": round(sum(r.latency_ms for r in rows) / len(rows), 1),
            "p95_latency_ms": round(percentile([r.latency_ms for r in rows], 95), 1),
        }
        for key, rows in sorted(groups.items(), key=lambda kv: tuple((v is not None, v or "") for v in kv[0]))
    ]


def timeline(project: str | None = None, since: float | None = None, bucket_seconds: int = 86400,
             database_url: str | None = None, until: float | None = None) -> list[dict]:
    """Requests, tokens and errors per `bucket_seconds` (UTC hours or days), oldest first, from the
    bucket holding `since` (or the first request) to the one holding `until` (now): empty buckets
    included, so a chart's gaps are real."""
    q = _scoped(select(UsageRow.created_at, UsageRow.prompt_tokens, UsageRow.completion_tokens, UsageRow.status),
                project, since)
    with session(database_url) as s:
        rows = s.execute(q).all()
    if since is None and not rows:
        return []
    first = since if since is not None else min(r.created_at for r in rows)
    start = int(first // bucket_seconds) * bucket_seconds
    end = int((until or now()) // bucket_seconds) * bucket_seconds
    buckets = {t: {"start": t, "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0}
               for t in range(start, end + bucket_seconds, bucket_seconds)}
    for r in rows:
        b = buckets.get(int(r.created_at // bucket_seconds) * bucket_seconds)
        if b is None:  # a request after `until`
            continue
        b["requests"] += 1
        b["prompt_tokens"] += r.prompt_tokens or 0
        b["completion_tokens"] += r.completion_tokens or 0
        b["errors"] += int(r.status >= 400)
    return list(buckets.values())


def openai_cost(rows: list[dict]) -> list[dict]:
    """What the tokens of these summary() rows would cost served by each fine-tuned OpenAI model in
    pricing.json."""
    prompt_tokens = sum(r["prompt_tokens"] for r in rows)
    completion_tokens = sum(r["completion_tokens"] for r in rows)
    return [
        {"model": m["model"], "as_of": m["as_of"],
         "usd": (prompt_tokens * m["usd_per_1m_input_tokens"] + completion_tokens * m["usd_per_1m_output_tokens"]) / 1e6}
        for m in load_pricing()["models"] if "usd_per_1m_input_tokens" in m
    ]


def last_day(project: str | None = None, database_url: str | None = None) -> list[dict]:
    return summary(project, since=now() - 86400, database_url=database_url)
