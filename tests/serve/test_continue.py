"""Fine-tuning jobs on the project's own fine-tuned models and checkpoints (OpenAI's continued
fine-tuning), over a real loopback server with the real `openai` SDK and the worker in-process."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import openai
import pytest
from openai import OpenAI
from sqlalchemy import select

from tests.serve.conftest import serving
from tuneforge.jobs.worker import run_worker
from tuneforge.store.database import JobRow, ModelRow, session
from tuneforge.store.keys import create_key
from tuneforge.train.config import TrainConfig


@pytest.fixture
def client():
    with serving() as url:
        yield OpenAI(base_url=url, api_key=create_key("proj"), max_retries=0, timeout=60)


def upload(client: OpenAI, n: int, start: int = 0):
    body = "".join(json.dumps({"messages": [{"role": "user", "content": f"What is twice {i}?"},
                                            {"role": "assistant", "content": f"Twice {i} is {2 * i}."}]}) + "\n"
                   for i in range(start, start + n)).encode()
    return client.files.create(file=("train.jsonl", io.BytesIO(body)), purpose="fine-tune")


def row(job_id: str) -> JobRow:
    with session() as s:
        return s.scalar(select(JobRow).where(JobRow.id == job_id))


def trained_until(job_id: str) -> None:
    """One worker runs the job, once the server's validator has queued it and let go."""
    deadline = time.monotonic() + 60  # (a wait for the validator's thread, not a measure of it)
    while (job := row(job_id)).status == "validating_files" or job.worker_id is not None:
        assert time.monotonic() < deadline, f"{job_id} stayed {job.status} with {job.worker_id}"
        time.sleep(0.05)
    run_worker(poll_interval=0.1, once=True)


def trained(client: OpenAI, job_id: str):
    """The job, run by one worker to its success."""
    trained_until(job_id)
    done = client.fine_tuning.jobs.retrieve(job_id)
    assert done.status == "succeeded", done.error
    return done


def epochs(n: int) -> dict:
    return {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": n, "batch_size": 5}}}


def test_a_job_on_a_checkpoint_starts_from_its_weights(client):
    """A checkpoint model (ft:...:ckpt-step-N) is a job's model as on OpenAI (it was model_not_available):
    the job starts from that checkpoint's weights - its starting validation loss is the one measured on
    them at the checkpoint, not the source job's final model's - with the source's base and method."""
    train_file, held = upload(client, 10), upload(client, 6, start=100)
    first = client.fine_tuning.jobs.create(model="tiny-llama", training_file=train_file.id, validation_file=held.id,
                                           method=epochs(2), metadata={"tuneforge.method": "full"})
    trained(client, first.id)
    last, ckpt = client.fine_tuning.jobs.checkpoints.list(first.id).data  # newest first: steps 4 and 2
    assert (last.step_number, ckpt.step_number) == (4, 2)

    more = client.fine_tuning.jobs.create(model=ckpt.fine_tuned_model_checkpoint, training_file=train_file.id,
                                          validation_file=held.id, method=epochs(1), suffix="more")
    assert more.model == ckpt.fine_tuned_model_checkpoint
    done = trained(client, more.id)
    assert done.fine_tuned_model == f"ft:tiny-llama:tuneforge:more:{more.id[6:14]}"
    run = Path(row(more.id).run_dir)
    cfg = TrainConfig.load(run)
    assert (cfg.base, cfg.method, cfg.init_from) == ("tiny-llama", "full", str(Path(row(first.id).run_dir,
                                                                                       "checkpoints", "step-000002")))
    start = json.loads((run / "baseline.json").read_text())["loss"]
    assert start == pytest.approx(ckpt.metrics.full_valid_loss, rel=1e-4)
    assert start != pytest.approx(last.metrics.full_valid_loss, rel=1e-4)
    answer = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=2,
                                            messages=[{"role": "user", "content": "What is twice 3?"}])
    assert answer.model == done.fine_tuned_model


def add_model(tmp_path: Path, method: str) -> str:
    """A fine-tuned model of project "proj": a run folder whose config says how it was trained."""
    run = tmp_path / "run"
    weights = run / ("model" if method == "full" else "adapter")
    weights.mkdir(parents=True)
    TrainConfig(data=str(tmp_path / "data.jsonl"), out=str(run), base="tiny-llama", method=method).save(run)
    name = f"ft:tiny-llama:tuneforge::{method}0001"
    with session() as s:
        s.add(ModelRow(id=name, project="proj", base="tiny-llama", job_id="", path=str(weights), owned_by="tuneforge"))
        s.commit()
    return name


def test_a_job_on_a_full_model_refuses_lora_in_metadata(client, tmp_path):
    """metadata "lora" on a full fine-tuned model was let through (the dashboard once sent it for every
    job), and the job trained full: it is refused like any other method the model was not trained with."""
    name, f = add_model(tmp_path, "full"), upload(client, 10)
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=name, training_file=f.id, metadata={"tuneforge.method": "lora"})
    assert (err.value.body["param"], err.value.body["code"]) == ("metadata", "invalid_metadata")
    assert f"metadata['tuneforge.method'] is 'lora', but {name} was trained with 'full'" in err.value.message
    assert client.fine_tuning.jobs.create(model=name, training_file=f.id,
                                          metadata={"tuneforge.method": "full"}).model == name


def test_a_continued_job_shows_and_keeps_its_sources_method(client, monkeypatch):
    """A job on a full fine-tuned model, given no method, showed "lora" (its metadata said none: the
    page's default) though it trained full; paused after a checkpoint, it then resumed as LoRA and
    failed on the full weights. Its metadata now says the source's method, which the worker reads back."""
    from tuneforge.jobs import worker

    train_file = upload(client, 10)
    first = client.fine_tuning.jobs.create(model="tiny-llama", training_file=train_file.id, method=epochs(1),
                                           metadata={"tuneforge.method": "full", "team": "a"})
    tuned = trained(client, first.id).fine_tuned_model
    more = client.fine_tuning.jobs.create(model=tuned, training_file=train_file.id, method=epochs(2))
    assert more.metadata == {"tuneforge.method": "full"}
    other = client.fine_tuning.jobs.create(model=tuned, training_file=train_file.id, metadata={"team": "b"})
    assert other.metadata == {"team": "b", "tuneforge.method": "full"}
    client.fine_tuning.jobs.cancel(other.id)
    should_stop = worker.JobRunner._should_stop

    def paused_after_its_first_checkpoint(runner):
        if (runner.run_dir / "checkpoints").exists() and row(more.id).control is None:
            client.fine_tuning.jobs.pause(more.id)
            runner._last_poll = 0.0  # read now, not after the poll interval
        return should_stop(runner)

    monkeypatch.setattr(worker.JobRunner, "_should_stop", paused_after_its_first_checkpoint)
    trained_until(more.id)
    assert (job := client.fine_tuning.jobs.retrieve(more.id)).status == "paused", job
    monkeypatch.setattr(worker.JobRunner, "_should_stop", should_stop)
    client.fine_tuning.jobs.resume(more.id)
    done = trained(client, more.id)
    with session() as s:
        path = s.scalar(select(ModelRow.path).where(ModelRow.id == done.fine_tuned_model))
    assert Path(path, "model.safetensors").is_file()


def test_a_continued_job_resumes_on_its_sources_lora_shape(client, tmp_path, monkeypatch):
    """A job on a model trained with another LoRA rank than the default (a CLI run, imported) built the
    default rank when it resumed from its own checkpoint (the worker made the run's settings afresh,
    and only the first start read the source's shape), so loading its checkpoint failed on the shapes."""
    from tuneforge.jobs import worker
    from tuneforge.train.loop import train

    data = tmp_path / "data.jsonl"
    data.write_bytes(client.files.content(upload(client, 10).id).content)
    source = train(TrainConfig(data=str(data), out=str(tmp_path / "rank4"), base="tiny-llama", lora_rank=4,
                               n_epochs=1, batch_size=5))
    name = "ft:tiny-llama:tuneforge::rank4"
    with session() as s:
        s.add(ModelRow(id=name, project="proj", base="tiny-llama", job_id="", path=str(source.weights),
                       owned_by="tuneforge"))
        s.commit()
    more = client.fine_tuning.jobs.create(model=name, training_file=upload(client, 10).id, method=epochs(2))
    should_stop = worker.JobRunner._should_stop

    def paused_after_its_first_checkpoint(runner):
        if (runner.run_dir / "checkpoints").exists() and row(more.id).control is None:
            client.fine_tuning.jobs.pause(more.id)
            runner._last_poll = 0.0
        return should_stop(runner)

    monkeypatch.setattr(worker.JobRunner, "_should_stop", paused_after_its_first_checkpoint)
    trained_until(more.id)
    assert client.fine_tuning.jobs.retrieve(more.id).status == "paused"
    monkeypatch.setattr(worker.JobRunner, "_should_stop", should_stop)
    client.fine_tuning.jobs.resume(more.id)
    trained(client, more.id)
    assert TrainConfig.load(Path(row(more.id).run_dir)).lora_rank == 4
