"""Per-request usage: who called what, how many tokens, how long it took and how it ended.

One row per API request (written by the server's usage middleware); `summary()` is the simple
aggregate a dashboard or `tuneforge` command can show.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

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


def summary(project: str | None = None, since: float | None = None, database_url: str | None = None) -> list[dict]:
    """Requests, tokens, errors and mean latency per (project, model), optionally since a time."""
    q = select(
        UsageRow.project,
        UsageRow.model,
        func.count().label("requests"),
        func.coalesce(func.sum(UsageRow.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(UsageRow.completion_tokens), 0).label("completion_tokens"),
        func.sum(case((UsageRow.status >= 400, 1), else_=0)).label("errors"),
        func.avg(UsageRow.latency_ms).label("mean_latency_ms"),
    ).group_by(UsageRow.project, UsageRow.model).order_by(UsageRow.project, UsageRow.model)
    if project is not None:
        q = q.where(UsageRow.project == project)
    if since is not None:
        q = q.where(UsageRow.created_at >= since)
    with session(database_url) as s:
        return [
            {
                "project": r.project,
                "model": r.model,
                "requests": r.requests,
                "prompt_tokens": int(r.prompt_tokens),
                "completion_tokens": int(r.completion_tokens),
                "errors": int(r.errors or 0),
                "mean_latency_ms": round(float(r.mean_latency_ms or 0.0), 1),
            }
            for r in s.execute(q).all()
        ]


def last_day(project: str | None = None, database_url: str | None = None) -> list[dict]:
    return summary(project, since=now() - 86400, database_url=database_url)
