"""A job's `validating_files` phase, shared by the API server and the workers.

The server validates a new job's files in a thread of its own (`FileValidator`) as soon as the job
exists, so a bad file fails the job within moments and a good one waits as `queued`, whatever the
workers are doing. A worker that claims a job still in `validating_files` (the server stopped
before it got there, or it died mid-way) runs the same phase first. Both hold the job while they
validate (the queue's claim), so the phase runs once, and a job cancelled or paused meanwhile is
only let go, never moved on.

Validation reads the files only (data.validate without a tokenizer): no model is loaded.
"""

from __future__ import annotations

import logging
import queue as fifo
import threading
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ..store.database import FileRow, JobRow
from . import queue

log = logging.getLogger("tuneforge.validation")

SHOWN_ERRORS = 3  # of an invalid file's errors, in the job's error message (the file report has them all)


class JobFailed(Exception):
    """A failure with an OpenAI-style error (code, message, param) for the job's `error` field."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def file_path(sessions: sessionmaker[Session], job: JobRow, file_id: str, param: str) -> str:
    with sessions() as s:
        row = s.scalar(select(FileRow).where(FileRow.id == file_id, FileRow.project == job.project))
    if row is None or not Path(row.path).is_file():
        raise JobFailed("invalid_file", f"The {param.replace('_', ' ')} {file_id} no longer exists.", param)
    return row.path


def job_paths(sessions: sessionmaker[Session], job: JobRow) -> tuple[str, str | None]:
    """(training file path, validation file path or None); JobFailed when one is gone."""
    train = file_path(sessions, job, job.training_file, "training_file")
    valid = file_path(sessions, job, job.validation_file, "validation_file") if job.validation_file else None
    return train, valid


def validate_files(sessions: sessionmaker[Session], job: JobRow, holder: str, train_path: str,
                   valid_path: str | None) -> bool:
    """The phase for a job `holder` holds: each file's event and check, then validating_files ->
    queued. JobFailed for a bad file; False when the API paused or cancelled the job meanwhile (the
    caller lets it go)."""
    from ..data.formats import parse_file
    from ..data.validate import MIN_EXAMPLES, validate_file

    for file_id, path, param in ((job.training_file, train_path, "training_file"),
                                 (job.validation_file, valid_path, "validation_file")):
        if path is None:
            continue
        _event(sessions, job.id, f"Validating {param.replace('_', ' ')}: {file_id}")
        report = validate_file(path, min_examples=MIN_EXAMPLES if param == "training_file" else 1)
        name = f"{param.replace('_', ' ').capitalize()} {file_id}"
        if not report.ok:  # the first few problems, each with its line and field, as `data validate` says them
            shown = "; ".join(str(e).replace(f"{e.code}: ", "", 1).replace(Path(path).name, "the file")
                              for e in report.errors[:SHOWN_ERRORS])  # (the error's code is the job's)
            more = f"; and {len(report.errors) - SHOWN_ERRORS} more error(s)" if len(report.errors) > SHOWN_ERRORS else ""
            raise JobFailed(report.errors[0].code, f"{name} is invalid: {shown}{more}", param)
        if job.method == "dpo" and report.format != "preference":  # a valid file has one format
            other = next(e for e in parse_file(path).examples if e.kind != "preference")  # to name its line
            raise JobFailed("invalid_preference_data", f"{name}: a DPO job trains on preference pairs "
                            '({"input", "preferred_output", "non_preferred_output"}); line '
                            f"{other.line} is a {other.kind} example", param)
    with sessions() as s:
        moved = queue.transition(s, job.id, holder, ("validating_files",), status="queued")
        if moved:
            queue.add_event(s, job.id, "Files validated, moving job to queued state")
        s.commit()
    return moved


def _event(sessions: sessionmaker[Session], job_id: str, message: str) -> None:
    with sessions() as s:
        queue.add_event(s, job_id, message)
        s.commit()


# --- in the API server ------------------------------------------------------------------------------


def validate_job(sessions: sessionmaker[Session], job_id: str) -> None:
    """Take the job if it still waits for validation and nobody alive holds it, validate, let go.
    An unexpected error (a busy database) leaves it in validating_files: the worker that claims it
    validates it then."""
    holder = queue.make_worker_id()
    with sessions() as s:
        job = queue.take_for_validation(s, job_id, holder)
    if job is None:
        return
    stop_beating = threading.Event()
    # (the hold kept fresh while a large file is read, so no worker takes the job as abandoned)
    beat = threading.Thread(target=queue.keep_beating, args=(sessions, job_id, holder, stop_beating), daemon=True)
    beat.start()
    try:
        validate_files(sessions, job, holder, *job_paths(sessions, job))
    except JobFailed as err:
        with sessions() as s:
            queue.fail(s, job_id, holder, err.code, err.message, err.param)
            s.commit()
    except Exception:
        log.exception("validating the files of %s failed; a worker validates them when it claims the job", job_id)
    finally:
        stop_beating.set()
        beat.join(timeout=5)
        with sessions() as s:
            queue.release(s, job_id, holder)
            s.commit()


class FileValidator:
    """One thread of the API server that validates jobs' files in the order they were created: off
    the event loop, one file at a time whatever the number of requests. When it starts it also takes
    the jobs a previous server left in validating_files."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions
        self.pending: fifo.SimpleQueue[str | None] = fifo.SimpleQueue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="tuneforge-validator")

    def submit(self, job_id: str) -> None:
        self.pending.put(job_id)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish the file at hand and stop; the jobs still waiting are taken at the next start."""
        self.stopping.set()
        self.pending.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        for job_id in self._left_waiting():
            self._validate(job_id)
        while (job_id := self.pending.get()) is not None:
            self._validate(job_id)

    def _left_waiting(self) -> list[str]:
        try:
            with self.sessions() as s:
                return list(s.scalars(select(JobRow.id).where(JobRow.status == "validating_files")
                                      .order_by(JobRow.seq)))
        except Exception:  # the workers validate them instead
            log.exception("could not list the jobs waiting for validation")
            return []

    def _validate(self, job_id: str) -> None:
        if self.stopping.is_set():
            return
        try:
            validate_job(self.sessions, job_id)
        except Exception:  # this job is left to a worker; the thread goes on with the next
            log.exception("could not validate the files of %s", job_id)
