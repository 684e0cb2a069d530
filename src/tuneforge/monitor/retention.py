"""Served traffic does not pile up for ever: what the server kept is deleted once it is old enough.

Stored completions (`store: true`) and kept responses hold whole conversations - users' data - and
OpenAI keeps both for 30 days; usage rows hold only counts and timings, and are worth keeping longer
for the monitor's history. Neither is deleted unless a deployment says so: `tuneforge prune`, or
TUNEFORGE_RETENTION_DAYS / TUNEFORGE_USAGE_RETENTION_DAYS, which the server applies when it starts
and every hour (serve.app). Whatever was already turned into a training file stays in that file.
"""

from __future__ import annotations

from sqlalchemy import delete
from sqlalchemy.orm import Session

from ..store.database import ResponseRow, StoredCompletionRow, UsageRow, now

DAY = 86400.0


def prune(s: Session, *, days: float | None = None, usage_days: float | None = None,
          at: float | None = None) -> dict[str, int]:
    """Delete stored completions and kept responses older than `days`, usage rows older than
    `usage_days` (None: keep them), all projects; how many rows of each went."""
    at = now() if at is None else at
    limits = {"stored_completions": (StoredCompletionRow, days), "responses": (ResponseRow, days),
              "usage": (UsageRow, usage_days)}
    gone = {}
    for name, (table, keep) in limits.items():
        if keep is None:
            continue
        if keep <= 0:
            raise ValueError(f"a retention of {keep} days would delete everything: give a positive number of days")
        gone[name] = s.execute(delete(table).where(table.created_at < at - keep * DAY)).rowcount
    s.commit()
    return gone
