"""Per-request usage: who called what, how many tokens, how long it took and how it ended.

One row per API request (written by the server's usage middleware). `summary()` aggregates it per
model (with the 95th-percentile latency: a mean hides the slow requests users notice), `timeline()`
per hour or day for a chart, and `openai_cost()` prices the tokens at OpenAI's rates for fine-tuned
models - what the same traffic would have cost there (data/pricing.json, a rough guide).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import Integer, case, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

from ..data.stats import load_pricing
from ..store.database import UsageRow, now, session

CLIENT_CLOSED = 499  # the status of a request whose client hung up before its answer was whole


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


def _errors():
    """The count of failed requests: a client that hung up (Stop in a chat UI; 499, nginx's "client
    closed request") is none - it is counted apart, as stopped_by_client."""
    return func.sum(case(((UsageRow.status >= 400) & (UsageRow.status != CLIENT_CLOSED), 1), else_=0)).label("errors")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank: a latency some request actually had (what
    summary() asks the database for)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# The aggregates are the database's work: reading every row into Python took 2.5 s for 300,000 rows
# (a month of a few requests a minute) on each refresh of the dashboard's usage page.


def summary(project: str | None = None, since: float | None = None, database_url: str | None = None) -> list[dict]:
    """Requests, tokens, errors, mean and 95th-percentile latency per (project, model), optionally
    since a time; ordered by project and model, calls without a model first. The percentile by nearest
    rank (as percentile()): the latency ranked ceil(0.95 n) in its group, read from the slow end - the
    database then keeps only the slowest 5% in order (a window function over every row: 4x slower in
    SQLite; percentile aggregates are not shared by SQLite and PostgreSQL)."""
    key = (UsageRow.project, UsageRow.model)
    totals = _scoped(select(
        *key, func.count().label("requests"), func.sum(UsageRow.prompt_tokens).label("prompt_tokens"),
        func.sum(UsageRow.completion_tokens).label("completion_tokens"),
        _errors(), func.sum(case((UsageRow.status == CLIENT_CLOSED, 1), else_=0)).label("stopped_by_client"),
        func.avg(UsageRow.latency_ms).label("mean_latency_ms"),
    ), project, since).group_by(*key)
    rows = []
    with session(database_url) as s:
        for g in s.execute(totals).all():
            rank = -(-95 * g.requests // 100)  # ceil(0.95 n), 1-based from the fastest
            p95 = s.scalar(_scoped(select(UsageRow.latency_ms), g.project, since)
                           .where(_is(UsageRow.project, g.project), _is(UsageRow.model, g.model))
                           .order_by(UsageRow.latency_ms.desc()).offset(g.requests - rank).limit(1))
            rows.append({
                "project": g.project,
                "model": g.model,
                "requests": g.requests,
                "prompt_tokens": g.prompt_tokens or 0,
                "completion_tokens": g.completion_tokens or 0,
                "errors": g.errors,
                "stopped_by_client": g.stopped_by_client,
                "mean_latency_ms": round(g.mean_latency_ms, 1),
                "p95_latency_ms": round(p95, 1),
            })
    return sorted(rows, key=lambda r: tuple((r[k] is not None, r[k] or "") for k in ("project", "model")))


def _is(column, value):
    return column.is_(None) if value is None else column == value


class _floor(FunctionElement):
    """floor() of a timestamp as an integer: PostgreSQL's floor(); SQLite's cast (for the positive
    numbers timestamps are it truncates, i.e. floors; its floor() needs a build with math functions)."""

    type = Integer()
    inherit_cache = True


@compiles(_floor)
def _floor_default(element, compiler, **kw):
    return f"CAST(floor({compiler.process(element.clauses, **kw)}) AS INTEGER)"


@compiles(_floor, "sqlite")
def _floor_sqlite(element, compiler, **kw):
    return f"CAST({compiler.process(element.clauses, **kw)} AS INTEGER)"


def timeline(project: str | None = None, since: float | None = None, bucket_seconds: int = 86400,
             database_url: str | None = None, until: float | None = None) -> list[dict]:
    """Requests, tokens and errors per `bucket_seconds` (UTC hours or days), oldest first, from the
    bucket holding `since` (or the first request) to the one holding `until` (now): empty buckets
    included, so a chart's gaps are real."""
    bucket = _floor(UsageRow.created_at / bucket_seconds).label("bucket")
    q = _scoped(select(
        bucket, func.count().label("requests"), func.sum(UsageRow.prompt_tokens).label("prompt_tokens"),
        func.sum(UsageRow.completion_tokens).label("completion_tokens"),
        _errors(),
    ), project, since).group_by(bucket)
    with session(database_url) as s:
        counted = {r.bucket * bucket_seconds: r for r in s.execute(q)}
    if since is None and not counted:
        return []
    start = int(since // bucket_seconds) * bucket_seconds if since is not None else min(counted)
    end = int((until or now()) // bucket_seconds) * bucket_seconds
    out = []
    for t in range(start, end + bucket_seconds, bucket_seconds):
        r = counted.get(t)
        out.append({"start": t, "requests": r.requests if r else 0, "prompt_tokens": (r.prompt_tokens or 0) if r else 0,
                    "completion_tokens": (r.completion_tokens or 0) if r else 0, "errors": r.errors if r else 0})
    return out


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
