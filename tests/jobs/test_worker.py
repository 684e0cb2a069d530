"""The worker in-process: a good file trains to a registered model, a bad one fails with its code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from tuneforge.jobs.worker import fine_tuned_name, run_worker
from tuneforge.settings import get_settings
from tuneforge.store.database import CheckpointRow, EventRow, FileRow, JobRow, ModelRow, new_id, session


def add_file(n: int, pairs: int = 0) -> str:
    """n chat examples, then `pairs` preference pairs."""
    file_id = new_id("file-")
    path = Path(get_settings().files_dir) / f"{file_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"twice {i}?"},
                                             {"role": "assistant", "content": str(2 * i)}]}) + "\n")
        for i in range(pairs):
            f.write(json.dumps({"input": {"messages": [{"role": "user", "content": f"twice {i}?"}]},
                                "preferred_output": [{"role": "assistant", "content": str(2 * i)}],
                                "non_preferred_output": [{"role": "assistant", "content": "no idea"}]}) + "\n")
    with session() as s:
        s.add(FileRow(id=file_id, project="p", filename="t.jsonl", purpose="fine-tune", bytes=1, path=str(path)))
        s.commit()
    return file_id


def add_job(file_id: str, meta: dict | None = None, method: str = "supervised", model: str = "tiny-llama",
            **hp) -> str:
    with session() as s:
        row = JobRow(id=new_id("ftjob-"), project="p", model=model, training_file=file_id, method=method,
                     status="validating_files", hyperparameters=hp, seed=3, suffix="unit", meta=meta)
        s.add(row)
        s.commit()
        return row.id


def load(job_id: str):
    with session() as s:
        job = s.scalar(select(JobRow).where(JobRow.id == job_id))
        events = s.scalars(select(EventRow.message).where(EventRow.job_id == job_id).order_by(EventRow.seq)).all()
        ckpts = s.scalars(select(CheckpointRow.step).where(CheckpointRow.job_id == job_id)).all()
        model = s.scalar(select(ModelRow).where(ModelRow.job_id == job_id))
    return job, events, ckpts, model


def test_worker_trains_a_job_to_a_model():
    job_id = add_job(add_file(10), n_epochs=2, batch_size=5)
    run_worker(poll_interval=0.1, once=True)
    job, events, ckpts, model = load(job_id)
    assert job.status == "succeeded", job.error
    assert job.worker_id is None and job.trained_tokens > 0
    assert job.hyperparameters == {"n_epochs": 2, "batch_size": 5, "learning_rate_multiplier": 1.0}
    assert job.fine_tuned_model == fine_tuned_name("tiny-llama", "tuneforge", "unit", job_id) == model.id
    assert Path(model.path, "adapter_model.safetensors").is_file()
    assert sorted(ckpts) == [2, 4]
    assert events[0].startswith("Validating training file") and events[-1] == "The job has successfully completed"
    assert "Files validated, moving job to queued state" in events
    with session() as s:
        results = s.scalar(select(FileRow).where(FileRow.id == job.result_files[0]))
    assert results.purpose == "fine-tune-results"
    assert Path(results.path).read_text().splitlines()[0].startswith("step,train_loss,train_accuracy")


def test_a_job_on_a_fine_tuned_model_continues_its_training():
    """OpenAI's fine-tuning of an ft: model: the job starts from that model's weights, and its model is
    named and served after the base the first run started from (a checkpoint too)."""
    from tuneforge.serve.models import checkpoint_base

    first = add_job(add_file(10), n_epochs=1, batch_size=5)
    run_worker(poll_interval=0.1, once=True)
    tuned = load(first)[0].fine_tuned_model
    second = add_job(add_file(10), model=tuned, n_epochs=1, batch_size=5)
    run_worker(poll_interval=0.1, once=True)
    job, events, ckpts, model = load(second)
    assert job.status == "succeeded", job.error
    assert job.model == tuned and model.base == "tiny-llama"
    assert model.id == fine_tuned_name("tiny-llama", "tuneforge", "unit", second)
    assert any(e.startswith("Continuing from the trained weights of ") for e in events), events
    with session() as s:
        path = s.scalar(select(CheckpointRow.path).where(CheckpointRow.job_id == second))
        s.delete(s.scalar(select(ModelRow).where(ModelRow.id == tuned)))
        s.commit()
    assert checkpoint_base(job.model, path) == "tiny-llama"
    third = add_job(add_file(10), model=tuned, n_epochs=1, batch_size=5)  # on a model deleted since
    run_worker(poll_interval=0.1, once=True)
    job, *_ = load(third)
    assert job.status == "failed" and job.error["code"] == "model_not_available", job.error
    assert job.error["message"] == f"The model {tuned} this job trains on was deleted"


def test_a_paused_continued_job_resumes_after_its_source_model_was_deleted(monkeypatch):
    """A job on an ft: model paused after a checkpoint goes on from its own checkpoint: the model it
    started from may be deleted meanwhile (it failed saying the source was deleted, and would have
    named its model after "ft:..." as the base)."""
    from tuneforge.jobs import worker

    first = add_job(add_file(10), n_epochs=1, batch_size=5)
    run_worker(poll_interval=0.1, once=True)
    tuned = load(first)[0].fine_tuned_model
    job_id = add_job(add_file(10), model=tuned, n_epochs=2, batch_size=5)
    should_stop = worker.JobRunner._should_stop
    monkeypatch.setattr(worker.JobRunner, "_should_stop",  # paused once the first epoch's checkpoint is there
                        lambda self: "pause" if (self.run_dir / "checkpoints").exists() else should_stop(self))
    run_worker(poll_interval=0.1, once=True)
    monkeypatch.setattr(worker.JobRunner, "_should_stop", should_stop)
    with session() as s:
        s.delete(s.scalar(select(ModelRow).where(ModelRow.id == tuned)))
        s.scalar(select(JobRow).where(JobRow.id == job_id)).status = "queued"  # resumed (queue.resume)
        s.commit()
    run_worker(poll_interval=0.1, once=True)
    job, events, ckpts, model = load(job_id)
    assert job.status == "succeeded", job.error
    assert "Resumed from checkpoint at step 2" in events and ckpts == [2, 4]
    assert model.base == "tiny-llama" and model.id == fine_tuned_name("tiny-llama", "tuneforge", "unit", job_id)


def test_full_fine_tuning_is_chosen_through_metadata():
    job_id = add_job(add_file(10), meta={"tuneforge.method": "full"}, n_epochs=1, batch_size=5)
    run_worker(poll_interval=0.1, once=True)
    job, _, _, model = load(job_id)
    assert job.status == "succeeded", job.error
    assert Path(model.path, "model.safetensors").is_file()  # full weights, not an adapter


def test_a_qlora_job_keeps_its_base_in_four_bits():
    pytest.importorskip("bitsandbytes")
    job_id = add_job(add_file(10), meta={"tuneforge.quantize": "nf4"}, n_epochs=1, batch_size=5)
    run_worker(poll_interval=0.1, once=True)
    job, _, _, model = load(job_id)
    assert job.status == "succeeded", job.error
    assert json.loads(Path(job.run_dir, "config.json").read_text())["quantize"] == "nf4"
    assert Path(model.path, "adapter_model.safetensors").is_file()


def test_a_dpo_job_trains_on_preference_pairs():
    job_id = add_job(add_file(0, pairs=10), method="dpo", n_epochs=1, batch_size=5, beta=0.5)
    run_worker(poll_interval=0.1, once=True)
    job, _, _, model = load(job_id)
    assert job.status == "succeeded", job.error
    assert job.hyperparameters == {"n_epochs": 1, "batch_size": 5, "learning_rate_multiplier": 1.0, "beta": 0.5}
    assert json.loads(Path(job.run_dir, "config.json").read_text())["objective"] == "dpo"
    assert Path(job.run_dir, "reference_logps.json").is_file() and Path(model.path, "adapter_model.safetensors").is_file()


def test_a_dpo_job_on_a_file_with_other_examples_fails_naming_the_line():
    job_id = add_job(add_file(10), method="dpo")
    run_worker(poll_interval=0.1, once=True)
    job, *_ = load(job_id)
    assert job.status == "failed" and job.error["code"] == "invalid_preference_data"
    assert job.error["param"] == "training_file" and "line 1 is a chat example" in job.error["message"]


def test_bad_file_fails_in_the_validating_phase():
    job_id = add_job(add_file(3))
    run_worker(poll_interval=0.1, once=True)
    job, events, _, model = load(job_id)
    assert job.status == "failed" and model is None and job.worker_id is None
    assert job.error["code"] == "invalid_n_examples" and job.error["param"] == "training_file"
    assert "has 3 example(s)" in job.error["message"]
    assert events[-1].startswith("Fine-tuning job failed")


def test_an_invalid_file_fails_naming_its_first_errors_by_line_and_field():
    file_id = add_file(12)
    path = Path(get_settings().files_dir) / f"{file_id}.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = "{not json"
    lines[4] = json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]})
    lines[6] = lines[7] = lines[8] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    path.write_text("\n".join(lines) + "\n")
    job_id = add_job(file_id)
    run_worker(poll_interval=0.1, once=True)
    job, *_ = load(job_id)
    message = job.error["message"]
    assert job.status == "failed" and job.error["code"] == "invalid_json", job.error
    assert message.startswith(f"Training file {file_id} is invalid: line 3") and "line 5, field messages[0].role" in message
    assert "line 7" in message and "and 2 more error(s)" in message and f"{file_id}.jsonl" not in message


def test_a_small_validation_file_is_enough():
    """OpenAI's 10-example minimum is for training files; a job may validate on a handful."""
    job_id = add_job(add_file(12), n_epochs=1)
    with session() as s:
        s.scalar(select(JobRow).where(JobRow.id == job_id)).validation_file = add_file(3)
        s.commit()
    run_worker(poll_interval=0.1, once=True)
    job, events, *_ = load(job_id)
    assert job.status == "succeeded", job.error
    assert any("Validating validation file" in e for e in events)


@pytest.mark.parametrize("stopped_before,ends", [(2, "succeeded"), (3, "failed")])
def test_a_job_whose_worker_keeps_dying_fails_instead_of_looping(stopped_before, ends):
    import socket
    import subprocess
    import sys

    from tuneforge.jobs import queue
    from tuneforge.jobs.worker import WORKER_STOPPED

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    job_id = add_job(add_file(12), n_epochs=1)
    with session() as s:  # held by a worker that died (its process is gone), after `stopped_before` such deaths
        row = s.scalar(select(JobRow).where(JobRow.id == job_id))
        row.status, row.worker_id = "running", f"{socket.gethostname()}:{gone.pid}:dead"
        for _ in range(stopped_before):
            queue.add_event(s, job_id, f"{WORKER_STOPPED}; restarting from the beginning", level="warn")
        for step in (1, 2):  # what the dead worker logged before any checkpoint: made again, listed once
            queue.add_event(s, job_id, f"Step {step}/3: training loss=9.0", type="metrics", data={"step": step})
        s.commit()
    run_worker(poll_interval=0.1, once=True)
    job, events, *_ = load(job_id)
    assert job.status == ends, job.error
    if ends == "failed":
        assert job.error["code"] == "worker_died" and "stopped 4 times" in job.error["message"]
    else:
        assert sum(e.startswith(WORKER_STOPPED) for e in events) == stopped_before + 1
        with session() as s:
            steps = [e.data["step"] for e in s.scalars(select(EventRow).where(
                EventRow.job_id == job_id, EventRow.type == "metrics").order_by(EventRow.seq))]
        assert steps == list(range(1, len(steps) + 1)) and "loss=9.0" not in " ".join(events)


def test_missing_file_fails_instead_of_hanging():
    job_id = add_job("file-gone")
    run_worker(poll_interval=0.1, once=True)
    job, *_ = load(job_id)
    assert job.status == "failed" and job.error["param"] == "training_file"


def test_once_returns_when_there_is_nothing_to_do():
    run_worker(poll_interval=0.1, once=True)


def test_a_worker_whose_job_was_taken_over_stops_without_touching_it(monkeypatch):
    """A worker that stopped beating long enough (a paused process, a partitioned host) finds its job
    resumed by another: it must leave the run folder and the job's events to the new holder - an
    interrupt checkpoint of its own would prune the new holder's optimizer state."""
    from tuneforge.jobs import worker

    job_id = add_job(add_file(12), n_epochs=1, batch_size=1)
    metrics = worker.JobRunner._metrics

    def taken_over_at_step_2(self, row):
        if row["step"] == 2:  # what a reclaim by another worker writes
            with session() as s:
                s.scalar(select(JobRow).where(JobRow.id == job_id)).worker_id = "elsewhere:1:new"
                s.commit()
        metrics(self, row)

    monkeypatch.setattr(worker.JobRunner, "_metrics", taken_over_at_step_2)
    run_worker(poll_interval=0.1, once=True)
    job, events, ckpts, _ = load(job_id)
    assert job.status == "running" and job.worker_id == "elsewhere:1:new" and job.error is None
    assert [e.split(":")[0] for e in events if e.startswith("Step")] == ["Step 1/12"]  # not step 2, nor later
    assert ckpts == [] and not Path(job.run_dir, "checkpoints").exists()


def test_a_full_disk_fails_the_job_naming_the_file_it_could_not_write(monkeypatch):
    """A write refused at close by a full disk carries no file name ("[Errno 28] No space left on
    device"): the job's error names the file and says the disk is full. /dev/full refuses every write
    so: the run's metrics file is made a link to it as training starts."""
    import re

    from tuneforge.jobs import worker

    job_id = add_job(add_file(10), n_epochs=1, batch_size=5)
    on_event = worker.JobRunner._on_event

    def disk_full_once_training_starts(self, ev):
        if ev.get("message", "").startswith("Training started"):
            (self.run_dir / "metrics.jsonl").symlink_to("/dev/full")
        on_event(self, ev)

    monkeypatch.setattr(worker.JobRunner, "_on_event", disk_full_once_training_starts)
    run_worker(poll_interval=0.1, once=True)
    job, *_ = load(job_id)
    metrics = re.escape(str(Path(job.run_dir, "metrics.jsonl")))
    assert job.status == "failed" and job.error["code"] == "training_error", job.error
    assert re.fullmatch(rf"{metrics}: the step metrics could not be written \(no space left on the disk: \d+ MB free\)",
                        job.error["message"]), job.error


def test_a_full_disk_at_the_result_file_fails_the_job_naming_it_and_leaves_no_part_of_it(monkeypatch):
    import re

    from tuneforge.jobs import worker

    job_id = add_job(add_file(10), n_epochs=1, batch_size=5)
    full = Path(get_settings().files_dir) / "file-full"
    full.symlink_to("/dev/full")  # the result file's name: every write to it fails as on a full disk
    monkeypatch.setattr(worker, "new_id", lambda prefix, n=24: "file-full" if prefix == "file-" else new_id(prefix, n))
    run_worker(poll_interval=0.1, once=True)
    job, _, _, model = load(job_id)
    assert job.status == "failed" and model is None, job.error
    assert re.fullmatch(rf"{re.escape(str(full))}: the job's result file \(step_metrics.csv\) could not be written "
                        r"\(no space left on the disk: \d+ MB free\)\. Its run finished training: on the server, "
                        rf"`tuneforge import {re.escape(job.run_dir)} --project p` serves its model", job.error["message"])
    assert not full.exists() and not full.is_symlink()


def cancel_during_the_last_step(monkeypatch) -> str:
    """A job cancelled through the API (queue.cancel) while its last step runs: the loop asks whether to
    stop before each step only, so it goes on to write its last checkpoint and finish."""
    from tuneforge.jobs import queue, worker

    job_id = add_job(add_file(10), n_epochs=1, batch_size=5)
    metrics = worker.JobRunner._metrics

    def cancelled_in_the_last_step(self, row):
        metrics(self, row)
        if row["step"] == row["total_steps"]:
            with session() as s:
                queue.cancel(s, s.scalar(select(JobRow).where(JobRow.id == job_id)))
                s.commit()

    monkeypatch.setattr(worker.JobRunner, "_metrics", cancelled_in_the_last_step)
    run_worker(poll_interval=0.1, once=True)
    return job_id


def test_a_job_cancelled_in_its_last_step_leaves_no_result_file_without_its_row(monkeypatch):
    """As OpenAI's, a cancelled job lists no result file (step_metrics.csv is the compiled result of a
    job that completed), and the one written while the cancel came is not left on the disk unlisted."""
    job_id = cancel_during_the_last_step(monkeypatch)
    job, _, _, model = load(job_id)
    assert job.status == "cancelled" and not job.result_files and model is None and job.worker_id is None
    with session() as s:
        listed = {Path(p).name for p in s.scalars(select(FileRow.path))}
    assert {p.name for p in Path(get_settings().files_dir).iterdir()} == listed  # the training file alone


def test_nothing_is_written_for_a_job_after_its_cancel(monkeypatch):
    """The last epoch's checkpoint, made after the cancel, is neither listed nor announced after it."""
    job_id = cancel_during_the_last_step(monkeypatch)
    job, events, ckpts, _ = load(job_id)
    assert job.status == "cancelled" and events[-1] == "Fine-tuning job cancelled", events
    assert ckpts == []


def test_a_checkpoint_row_a_killed_worker_left_out_is_listed_in_step_order(monkeypatch):
    """A worker killed between an epoch's checkpoint and its row: the next one adds the row, and the
    API, which lists a job's checkpoints newest first in the order their rows were added (as OpenAI, by
    step), still lists them by step, each dated when it was written."""
    import socket
    import subprocess
    import sys

    from tuneforge.jobs import worker

    job_id = add_job(add_file(10), n_epochs=3, batch_size=5)
    should_stop = worker.JobRunner._should_stop
    monkeypatch.setattr(worker.JobRunner, "_should_stop",  # stopped once the first epoch's checkpoint is there
                        lambda self: "pause" if (self.run_dir / "checkpoints").exists() else should_stop(self))
    run_worker(poll_interval=0.1, once=True)
    monkeypatch.setattr(worker.JobRunner, "_should_stop", should_stop)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with session() as s:  # what a kill right after the checkpoint leaves: its folder, no row, the job held
        s.delete(s.scalar(select(CheckpointRow).where(CheckpointRow.job_id == job_id)))
        row = s.scalar(select(JobRow).where(JobRow.id == job_id))
        row.status, row.worker_id = "running", f"{socket.gethostname()}:{gone.pid}:dead"
        s.commit()
    run_worker(poll_interval=0.1, once=True)
    job, *_ = load(job_id)
    assert job.status == "succeeded", job.error
    with session() as s:
        listed = s.execute(select(CheckpointRow.step, CheckpointRow.created_at, CheckpointRow.path)
                           .where(CheckpointRow.job_id == job_id).order_by(CheckpointRow.seq.desc())).all()
    assert [step for step, *_ in listed] == [6, 4, 2]
    assert [at for _, at, _ in listed] == [Path(path).parent.joinpath("state.json").stat().st_mtime
                                           for *_, path in listed]


def test_a_job_failed_after_a_checkpoint_says_how_to_go_on_from_it_and_that_works(monkeypatch):
    """A failed job cannot be resumed through the API (as OpenAI's): its error says which checkpoint
    is kept and the commands that finish the run and serve its model - which do."""
    import re
    import shlex

    from typer.testing import CliRunner

    from tuneforge.cli import app
    from tuneforge.jobs import worker

    job_id = add_job(add_file(10), n_epochs=2, batch_size=5)
    on_event = worker.JobRunner._on_event

    def disk_full_after_the_first_checkpoint(self, ev):
        on_event(self, ev)
        if ev["type"] == "checkpoint":
            (self.run_dir / "metrics.jsonl").rename(self.run_dir / "kept.jsonl")
            (self.run_dir / "metrics.jsonl").symlink_to("/dev/full")

    monkeypatch.setattr(worker.JobRunner, "_on_event", disk_full_after_the_first_checkpoint)
    run_worker(poll_interval=0.1, once=True)
    job, *_ = load(job_id)
    run = job.run_dir
    assert job.status == "failed", job.error
    assert job.error["message"].endswith(
        f"MB free). Its checkpoint at step 2 is kept: on the server, `tuneforge train --resume {run}` finishes "
        f"the run, then `tuneforge import {run} --project p` serves its model"), job.error
    Path(run, "metrics.jsonl").unlink()  # room made
    Path(run, "kept.jsonl").rename(Path(run, "metrics.jsonl"))
    for command in re.findall(r"`tuneforge ([^`]+)`", job.error["message"]):  # (in-process: a new one imports torch)
        done = CliRunner().invoke(app, shlex.split(command))
        assert done.exit_code == 0, done.output
    with session() as s:
        model = s.scalar(select(ModelRow).where(ModelRow.id == done.stdout.strip().splitlines()[-1]))
    assert model.project == "p" and Path(model.path, "adapter_model.safetensors").is_file()


def test_a_job_failed_by_its_file_after_a_checkpoint_is_not_told_to_resume(monkeypatch):
    """Resuming the run would fail on the same file: the error is the file's alone."""
    from tuneforge.jobs import worker

    file_id = add_file(10)
    job_id = add_job(file_id, n_epochs=2, batch_size=5)
    should_stop = worker.JobRunner._should_stop
    monkeypatch.setattr(worker.JobRunner, "_should_stop",  # paused once the first epoch's checkpoint is there
                        lambda self: "pause" if (self.run_dir / "checkpoints").exists() else should_stop(self))
    run_worker(poll_interval=0.1, once=True)
    monkeypatch.setattr(worker.JobRunner, "_should_stop", should_stop)
    path = Path(get_settings().files_dir) / f"{file_id}.jsonl"
    path.write_text(path.read_text().replace('"role": "user"', '"role": "wizard"', 1))  # changed on the disk since
    with session() as s:
        s.scalar(select(JobRow).where(JobRow.id == job_id)).status = "queued"  # resumed (queue.resume)
        s.commit()
    run_worker(poll_interval=0.1, once=True)
    job, *_ = load(job_id)
    assert job.status == "failed" and job.error["param"] == "training_file", job.error
    assert "wizard" in job.error["message"] and "tuneforge" not in job.error["message"], job.error
