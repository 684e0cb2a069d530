"""Retention: kept traffic older than the deployment's limit is deleted - by `prune`, by the CLI, and
by the server on its own once configured - and nothing younger, nothing when no limit is set."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tuneforge.monitor.retention import DAY, prune
from tuneforge.serve.app import create_app
from tuneforge.settings import Settings
from tuneforge.store.database import ResponseRow, StoredCompletionRow, UsageRow, new_id, now, session

TABLES = (StoredCompletionRow, ResponseRow, UsageRow)


def keep(age_days: float) -> None:
    """One row of each kind, `age_days` old."""
    at = now() - age_days * DAY
    with session() as s:
        s.add(StoredCompletionRow(id=new_id("chatcmpl-"), project="p", model="m", messages=[], completion={},
                                  created_at=at))
        s.add(ResponseRow(id=new_id("resp_"), project="p", model="m", context=[], input=[], response={},
                          created_at=at))
        s.add(UsageRow(project="p", model="m", method="POST", path="/v1/chat/completions", status=200,
                       latency_ms=1.0, created_at=at))
        s.commit()


def counts() -> tuple[int, ...]:
    with session() as s:
        return tuple(s.scalar(select(func.count()).select_from(t)) for t in TABLES)


def test_prune_deletes_only_what_is_older_than_each_limit():
    for age in (100, 40, 10):
        keep(age)
    with session() as s:
        assert prune(s, days=30) == {"stored_completions": 2, "responses": 2}  # usage: no limit given
    assert counts() == (1, 1, 3)
    with session() as s:
        assert prune(s, usage_days=50) == {"usage": 1}
    assert counts() == (1, 1, 2)
    with session() as s, pytest.raises(ValueError, match="positive"):
        prune(s, days=0)


def test_the_server_applies_its_retention_when_it_starts():
    keep(45)
    keep(1)
    settings = Settings(retention_days=30, usage_retention_days=40)
    with TestClient(create_app(settings)):
        deadline = time.monotonic() + 30
        while counts() != (1, 1, 1) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert counts() == (1, 1, 1)
    with TestClient(create_app(Settings())):  # no retention set: nothing is ever deleted
        keep(400)
        time.sleep(0.5)
    assert counts() == (2, 2, 2)
