"""Job rows: atomic claims, reclaim of jobs whose worker died, and the API's state transitions."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from sqlalchemy import select

from tuneforge.jobs import queue
from tuneforge.store.database import EventRow, JobRow, new_id, now, session


def make_job(status: str = "validating_files", **kw) -> str:
    with session() as s:
        job = JobRow(id=new_id("ftjob-"), project="p", model="tiny-llama", training_file="file-x",
                     status=status, hyperparameters={}, seed=1, **kw)
        s.add(job)
        s.commit()
        return job.id


def job(job_id: str) -> JobRow:
    with session() as s:
        return s.scalar(select(JobRow).where(JobRow.id == job_id))


def test_racing_workers_never_claim_the_same_job():
    ids = [make_job() for _ in range(5)]
    won: dict[str, list[str]] = {}
    lock = threading.Lock()

    def worker(n: int):
        with session() as s:
            while (got := queue.claim(s, f"host:{n}:w")) is not None:
                with lock:
                    won.setdefault(got[0].id, []).append(n)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == sorted(ids)
    assert all(len(v) == 1 for v in won.values())


def test_a_live_workers_job_is_not_taken_but_a_dead_ones_is():
    me = queue.make_worker_id()
    alive = make_job("running", worker_id=me, heartbeat_at=now())
    dead_proc = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_proc.wait()
    dead_id = f"{me.split(':')[0]}:{dead_proc.pid}:gone"
    orphan = make_job("running", worker_id=dead_id, heartbeat_at=now())
    silent = make_job("running", worker_id="elsewhere:1:x", heartbeat_at=now() - 3600)
    with session() as s:
        first = queue.claim(s, "host:2:new")
        second = queue.claim(s, "host:2:new")
        assert queue.claim(s, "host:2:new") is None
    assert (first[0].id, first[1]) == (orphan, dead_id)
    assert (second[0].id, second[1]) == (silent, "elsewhere:1:x")
    assert job(alive).worker_id == me


def test_heartbeat_and_transitions_only_apply_to_the_holder():
    job_id = make_job("queued", worker_id="h:1:a", heartbeat_at=0)
    with session() as s:
        assert queue.heartbeat(s, job_id, "h:1:a")
        assert not queue.heartbeat(s, job_id, "h:1:b")
        assert not queue.transition(s, job_id, "h:1:b", ("queued",), status="running")
        assert queue.transition(s, job_id, "h:1:a", ("queued",), status="running")
        s.commit()
    assert job(job_id).status == "running" and job(job_id).heartbeat_at > 0


def test_cancel_pause_resume_rules():
    waiting = make_job("queued")
    held = make_job("running", worker_id="h:1:a", heartbeat_at=now())
    finished = make_job("succeeded")
    with session() as s:
        rows = {r.id: r for r in s.scalars(select(JobRow)).all()}
        queue.cancel(s, rows[waiting])
        assert rows[waiting].control is None  # nobody to tell
        queue.pause(s, rows[held])
        assert rows[held].status == "paused" and rows[held].control == "pause"
        with pytest.raises(queue.InvalidTransition, match="already succeeded"):
            queue.cancel(s, rows[finished])
        with pytest.raises(queue.InvalidTransition):
            queue.resume(s, rows[finished])
        queue.resume(s, rows[held])
        assert rows[held].status == "queued" and rows[held].control is None
        s.commit()
        messages = s.scalars(select(EventRow.message)).all()
    assert "Fine-tuning job cancelled" in messages and "Fine-tuning job resumed" in messages
    assert job(waiting).status == "cancelled" and job(waiting).finished_at
