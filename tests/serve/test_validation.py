"""A new job's files are validated by the server within moments, with no worker running (as when the
one worker trains another job for hours): a good file waits as `queued`, a bad one fails the job with
the worker's own error. uvicorn on loopback in this process, driven by the openai SDK; no workers."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai import OpenAI
from sqlalchemy import select

from tests.serve.conftest import serving
from tuneforge.jobs.worker import WORKER_STOPPED, run_worker
from tuneforge.settings import get_settings
from tuneforge.store.database import EventRow, FileRow, JobRow, new_id, session
from tuneforge.store.keys import create_key

VALIDATED = "Files validated, moving job to queued state"


def sdk(url: str, project: str = "proj") -> OpenAI:
    return OpenAI(base_url=url, api_key=create_key(project), max_retries=0, timeout=60)


@pytest.fixture
def client():
    with serving() as url:
        yield sdk(url)


def chat_jsonl(n: int) -> bytes:
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"What is twice {i}?"},
                                            {"role": "assistant", "content": f"Twice {i} is {2 * i}."}]}) + "\n"
                   for i in range(n)).encode()


def upload(client: OpenAI, body: bytes):
    return client.files.create(file=("train.jsonl", io.BytesIO(body)), purpose="fine-tune")


def wait_for(client: OpenAI, job_id: str, statuses: set[str], timeout: float = 10):
    deadline = time.monotonic() + timeout
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in statuses:
        assert time.monotonic() < deadline, f"{job_id} stayed {job.status}: {messages(job_id)}"
        time.sleep(0.05)
    return job


def messages(job_id: str) -> list[str]:
    with session() as s:
        return list(s.scalars(select(EventRow.message).where(EventRow.job_id == job_id).order_by(EventRow.seq)))


def row(job_id: str) -> JobRow:
    with session() as s:
        return s.scalar(select(JobRow).where(JobRow.id == job_id))


def let_go(job_id: str, timeout: float = 10) -> JobRow:
    """The job once the server's validator has let go of it (for the next free worker to claim)."""
    deadline = time.monotonic() + timeout
    while (job := row(job_id)).worker_id is not None:
        assert time.monotonic() < deadline, f"{job_id} is still held by {job.worker_id}"
        time.sleep(0.05)
    return job


def test_a_good_file_is_queued_within_moments_without_a_worker(client):
    f = upload(client, chat_jsonl(12))
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
    assert job.status == "validating_files"
    wait_for(client, job.id, {"queued"}, timeout=5)
    assert messages(job.id) == [f"Created fine-tuning job: {job.id}", f"Validating training file: {f.id}", VALIDATED]
    assert let_go(job.id).status == "queued"


def test_a_bad_file_fails_the_job_without_a_worker_as_the_worker_would(client):
    f = upload(client, b"{not json\n" * 12)
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
    failed = wait_for(client, job.id, {"failed", "queued"}, timeout=5)
    assert failed.status == "failed" and failed.finished_at is not None
    assert failed.error.code == "invalid_json" and failed.error.param == "training_file"
    assert messages(job.id)[-1] == f"Fine-tuning job failed: {failed.error.message}"
    # the same file through the worker (a job it claims still validating): the same error, word for word
    with session() as s:
        same = JobRow(id=new_id("ftjob-"), project=row(job.id).project, model="tiny-llama", training_file=f.id,
                      status="validating_files", hyperparameters={}, seed=1)
        s.add(same)
        s.commit()
    run_worker(poll_interval=0.1, once=True)
    assert row(same.id).status == "failed" and row(same.id).error == failed.error.model_dump()


def test_a_job_cancelled_while_its_file_is_validated_stays_cancelled(client):
    f = upload(client, chat_jsonl(300_000))  # about 40 MB: seconds of validation
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
    deadline = time.monotonic() + 10
    while f"Validating training file: {f.id}" not in messages(job.id):
        assert time.monotonic() < deadline, messages(job.id)
        time.sleep(0.02)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    held = let_go(job.id, timeout=30)  # once its file is read
    assert held.status == "cancelled" and held.control is None and held.error is None
    assert VALIDATED not in messages(job.id) and messages(job.id)[-1] == "Fine-tuning job cancelled"


def add_job(project: str, n: int, holder: str | None = None) -> str:
    """A job row as a stopped server left it: created, its files not validated yet (held by `holder`)."""
    file_id = new_id("file-")
    path = Path(get_settings().files_dir) / f"{file_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(chat_jsonl(n))
    with session() as s:
        s.add(FileRow(id=file_id, project=project, filename="t.jsonl", purpose="fine-tune", bytes=1, path=str(path)))
        job = JobRow(id=new_id("ftjob-"), project=project, model="tiny-llama", training_file=file_id,
                     status="validating_files", hyperparameters={"n_epochs": 1, "batch_size": 5}, seed=3,
                     worker_id=holder)
        s.add(job)
        s.commit()
    return job.id


def dead_holder() -> str:
    """The id a server or worker had that died holding a job (its process is gone)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return f"{socket.gethostname()}:{gone.pid}:dead"


def test_jobs_left_validating_are_validated_when_the_server_starts_again():
    left, held = add_job("proj", 12), add_job("proj", 3, holder=dead_holder())
    with serving() as url:
        client = sdk(url)
        wait_for(client, left, {"queued"})
        assert wait_for(client, held, {"failed"}).error.code == "invalid_n_examples"
    assert messages(left)[-1] == VALIDATED and let_go(held).status == "failed"


def test_a_worker_validates_a_job_a_dead_server_held_without_counting_a_worker_stop():
    job_id = add_job("proj", 10, holder=dead_holder())
    run_worker(poll_interval=0.1, once=True)
    assert row(job_id).status == "succeeded", row(job_id).error
    events = messages(job_id)
    assert VALIDATED in events and not any(e.startswith(WORKER_STOPPED) for e in events)
