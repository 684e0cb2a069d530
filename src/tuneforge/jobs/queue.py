"""Fine-tuning jobs as database rows: state transitions, atomic claims, heartbeats and reclaims.

The database is the only channel between the API server and the workers, so a server or a worker
can die at any moment and the rows still say what is true:

- A worker claims a job with a compare-and-set UPDATE (`WHERE worker_id IS <what it read>`): two
  workers racing for one job cannot both win, on SQLite or PostgreSQL, without row locks.
- A worker that holds a job beats its heart every few seconds. A job whose worker stopped beating
  (or whose worker process is gone from this host) is claimable again and resumes from its last
  checkpoint.
- Cancel and pause are requests (`control`) that the API writes and the worker reads between
  training steps; the API also sets the visible status at once, so callers see what they asked for.
  Every later write by a worker is conditional on the job still being its own.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from ..store.database import EventRow, JobRow, new_id, now

log = logging.getLogger("tuneforge.queue")

FINAL = ("succeeded", "failed", "cancelled")
CLAIMABLE = ("validating_files", "queued", "running")
HEARTBEAT_SECONDS = 2.0

# tuneforge's extensions of the job object: how the weights are trained ("lora" or "full") and whether
# the base is kept in 4 bits. OpenAI's API has no such fields, so they travel in metadata, which every
# OpenAI client sends unchanged.
METHOD_KEY = "tuneforge.method"
QUANTIZE_KEY = "tuneforge.quantize"  # "nf4": the base frozen in 4 bits (QLoRA, models.quantize)


def stale_seconds() -> float:
    """How long a silent worker keeps its job (on another host, where its pid cannot be checked)."""
    return float(os.environ.get("TUNEFORGE_WORKER_STALE_SECONDS", "30"))


class InvalidTransition(ValueError):
    """The job's status does not allow what was asked (cancel a finished job, resume a running one)."""


def make_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{new_id('', 6)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_is_dead(worker_id: str, heartbeat_at: float | None) -> bool:
    host, _, rest = worker_id.partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
        return True  # same machine and the process is gone: no need to wait for the heartbeat
    return heartbeat_at is None or now() - heartbeat_at > stale_seconds()


def add_event(
    s: Session, job_id: str, message: str, *, level: str = "info", type: str = "message", data: dict | None = None
) -> EventRow:
    row = EventRow(id=new_id("ftevent-"), job_id=job_id, level=level, type=type, message=message, data=data)
    s.add(row)
    return row


def claim(s: Session, worker_id: str) -> tuple[JobRow, str | None] | None:
    """Take the oldest job that needs a worker; (job, previous worker id if reclaimed) or None."""
    candidates = s.execute(
        select(JobRow.id, JobRow.worker_id, JobRow.heartbeat_at)
        .where(JobRow.status.in_(CLAIMABLE))
        .order_by(JobRow.seq)
    ).all()
    for job_id, holder, beat in candidates:
        if _take(s, job_id, holder, beat, worker_id, CLAIMABLE, attempts=JobRow.attempts + 1):
            return s.scalar(select(JobRow).where(JobRow.id == job_id)), holder
    s.commit()
    return None


def take_for_validation(s: Session, job_id: str, holder: str) -> JobRow | None:
    """The API server's hold on a job whose files it validates (jobs.validation): only while the job
    is in validating_files and nobody alive holds it (a worker may have claimed it first). Not an
    attempt: no training happens."""
    row = s.execute(select(JobRow.worker_id, JobRow.heartbeat_at)
                    .where(JobRow.id == job_id, JobRow.status == "validating_files")).one_or_none()
    if row is None or not _take(s, job_id, row.worker_id, row.heartbeat_at, holder, ("validating_files",)):
        s.commit()
        return None
    return s.scalar(select(JobRow).where(JobRow.id == job_id))


def _take(s: Session, job_id: str, holder: str | None, beat: float | None, worker_id: str,
          statuses: tuple[str, ...], **values: Any) -> bool:
    """Compare-and-set the job's holder from what was read (`holder`, free or dead) to `worker_id`."""
    if holder is not None and not worker_is_dead(holder, beat):
        return False
    owner = JobRow.worker_id.is_(None) if holder is None else JobRow.worker_id == holder
    won = s.execute(
        update(JobRow)
        .where(JobRow.id == job_id, owner, JobRow.status.in_(statuses))
        .values(worker_id=worker_id, heartbeat_at=now(), **values)
    ).rowcount
    s.commit()
    return won == 1


def keep_beating(sessions: sessionmaker[Session], job_id: str, worker_id: str, stop: threading.Event) -> bool:
    """Refresh the claim every HEARTBEAT_SECONDS until `stop` is set (in a thread of the holder's own);
    False as soon as the job is no longer this holder's. A refresh that fails (a busy database) is
    tried again at the next beat rather than given up."""
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            with sessions() as s:
                if not heartbeat(s, job_id, worker_id):
                    return False
        except Exception:
            log.warning("heartbeat for %s failed", job_id, exc_info=True)
    return True


def heartbeat(s: Session, job_id: str, worker_id: str) -> bool:
    """Refresh the claim; False when the job is no longer this worker's (reclaimed elsewhere)."""
    n = s.execute(
        update(JobRow).where(JobRow.id == job_id, JobRow.worker_id == worker_id).values(heartbeat_at=now())
    ).rowcount
    s.commit()
    return n == 1


def transition(s: Session, job_id: str, worker_id: str, expected: tuple[str, ...], **values: Any) -> bool:
    """Compare-and-set by the worker holding the job: applies only if status is still `expected`."""
    n = s.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.worker_id == worker_id, JobRow.status.in_(expected))
        .values(**values)
    ).rowcount
    return n == 1


def release(s: Session, job_id: str, worker_id: str, **values: Any) -> None:
    """The worker lets go of the job (paused, cancelled, finished, shutting down)."""
    s.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.worker_id == worker_id)
        .values(worker_id=None, heartbeat_at=None, control=None, **values)
    )


def fail(s: Session, job_id: str, worker_id: str, code: str, message: str, param: str | None) -> None:
    """The holder fails the job with an OpenAI-style error and lets go. A job cancelled meanwhile
    stays cancelled."""
    failed = transition(
        s, job_id, worker_id, CLAIMABLE + ("paused",), status="failed",
        error={"code": code, "message": message, "param": param}, finished_at=now(), estimated_finish=None,
    )
    if failed:
        add_event(s, job_id, f"Fine-tuning job failed: {message}", level="error")
    release(s, job_id, worker_id)


# --- requests from the API -------------------------------------------------------------------------


def cancel(s: Session, job: JobRow) -> JobRow:
    if job.status in FINAL:
        raise InvalidTransition(f"Job {job.id} has already {_past(job.status)} and cannot be cancelled.")
    job.status = "cancelled"
    job.finished_at = now()
    job.estimated_finish = None
    job.control = "cancel" if job.worker_id else None
    add_event(s, job.id, "Fine-tuning job cancelled")
    return job


def pause(s: Session, job: JobRow) -> JobRow:
    if job.status not in CLAIMABLE:
        raise InvalidTransition(f"Job {job.id} is {job.status}; only a queued or running job can be paused.")
    job.status = "paused"
    job.estimated_finish = None
    job.control = "pause" if job.worker_id else None
    add_event(s, job.id, "Fine-tuning job paused")
    return job


def resume(s: Session, job: JobRow) -> JobRow:
    if job.status != "paused":
        raise InvalidTransition(f"Job {job.id} is {job.status}; only a paused job can be resumed.")
    # Back to the queue: a free worker claims it and continues from the checkpoint the pause saved.
    # If the worker has not noticed the pause yet, it sees control cleared and simply carries on.
    job.status = "queued"
    job.control = None
    add_event(s, job.id, "Fine-tuning job resumed")
    return job


def _past(status: str) -> str:
    return {"succeeded": "succeeded", "failed": "failed", "cancelled": "been cancelled"}[status]
