"""A training worker: claims jobs from the database and runs the library's training loop on them.

Started by `tuneforge serve` (one process per `--workers`) or on its own with `tuneforge worker`.
Training never runs in the API server's process: a job can take hours and the server must keep
answering. Everything the worker learns (phase messages, metrics, checkpoints, the final model, a
failure and its reason) goes into the database, where the API reads it.

A job has two phases here: `validating_files` (jobs.validation: the training file is checked with the
same validator as `tuneforge data validate`, so a bad file fails the job with OpenAI's error code),
which the API server has usually done already, then training (`queued` -> `running`). Any exception
fails the job with its reason: a job never hangs silently.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ..settings import Settings, get_settings
from ..store.database import (
    CheckpointRow,
    EventRow,
    FileRow,
    JobRow,
    ModelRow,
    new_id,
    now,
    resolve_url,
    session_factory,
)
from . import queue
from .queue import METHOD_KEY, QUANTIZE_KEY
from .validation import JobFailed, job_paths, validate_files

log = logging.getLogger("tuneforge.worker")

# A worker that dies holding a job (killed, out of memory, a crash) hands it to the next one, which
# resumes from the last checkpoint; a job that kills its worker every time fails instead of looping.
MAX_WORKER_STOPS = 3
WORKER_STOPPED = "The worker running this job stopped"
CONTROL_POLL_SECONDS = 0.5  # how often should_stop reads the job row (it is called every step)
PARENT_ENV = "TUNEFORGE_WORKER_PARENT"  # set by `tuneforge serve`: the worker dies with its server


SUFFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # no ':' (it separates the parts of ft: names)
SUFFIX_RULE = "suffix must be 1 to 64 letters, digits, '-', '_' or '.'"


def fine_tuned_name(base_slug: str, org: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's naming: ft:{base}:{org}:{suffix}:{id} (the suffix part stays empty when not given)."""
    if suffix is not None and not SUFFIX_RE.match(suffix):
        raise ValueError(f"{SUFFIX_RULE}, got {suffix!r}")
    return f"ft:{base_slug}:{org}:{suffix or ''}:{job_id.removeprefix('ftjob-')[:8]}"


def _base_slug(model: str) -> str:
    from ..models.catalogue import resolve

    try:
        return resolve(model).slug
    except ValueError:
        return model


def _source(sessions: sessionmaker[Session], job: JobRow, run_dir: Path) -> tuple[str, str | None]:
    """(base model, run folder or checkpoint to continue, or None) of a job: its model is a base, a
    fine-tuned model of its project, whose row names the base and whose weights lie in its run folder,
    or a checkpoint of one of its jobs."""
    if not job.model.startswith("ft:"):
        return job.model, None
    from ..models.load import run_folder
    from ..train.checkpoint import checkpoint_dirs
    from ..train.config import TrainConfig

    with sessions() as s:
        row = s.scalar(select(ModelRow).where(ModelRow.id == job.model, ModelRow.project == job.project))
        ckpt = s.scalar(select(CheckpointRow.path).join(JobRow, JobRow.id == CheckpointRow.job_id)
                        .where(CheckpointRow.name == job.model, JobRow.project == job.project))
    if row is not None:
        return row.base, str(run_folder(row.path))
    if ckpt is not None and Path(ckpt).is_dir():  # a checkpoint (ft:...:ckpt-step-N): its run names the base
        return TrainConfig.load(run_folder(ckpt)).base, str(Path(ckpt).parent)

    # Deleted since the job started: a job paused (or whose worker stopped) after a checkpoint goes on
    # from its own checkpoint, whose run config names the base (the loop does not read the source again).
    if checkpoint_dirs(run_dir):
        cfg = TrainConfig.load(run_dir)
        return cfg.base, cfg.init_from
    return job.model, None  # before any checkpoint: the job fails saying so (JobRunner._run)


class JobLost(Exception):
    """The job was taken over by another worker (this one stopped beating for longer than the stale
    limit: a paused process, a partitioned host). Raised from should_stop rather than answered as a
    stop reason: the loop writes a checkpoint for a stop, and the run folder is now the other
    worker's (its checkpoint pruning would delete the new holder's optimizer state)."""


def _resolved(config: dict) -> dict:
    """A job's hyperparameters as the loop resolved them (a run's config.json, as a dict)."""
    out = {k: config[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    return out | ({"beta": config["dpo_beta"]} if config.get("objective") == "dpo" else {})


class JobRunner:
    """Runs one claimed job to its end: succeeded, failed, paused, cancelled or handed back."""

    def __init__(self, sessions: sessionmaker[Session], worker_id: str, job: JobRow, previous: str | None,
                 settings: Settings, shutdown: threading.Event):
        self.sessions, self.worker_id, self.settings, self.shutdown = sessions, worker_id, settings, shutdown
        self.job_id = job.id
        self.job = job
        # One held while its files were validated (by the server or a worker that stopped) had not
        # started training: there is no worker stop to report or count.
        self.previous = previous if job.status != "validating_files" else None
        self.run_dir = Path(job.run_dir) if job.run_dir else settings.runs_dir / job.id
        # a job on an ft: model continues that model's run (OpenAI's fine-tuning of a fine-tuned model):
        # the new model is named, and served, after the base that run started from
        self.base, self.init_from = _source(sessions, job, self.run_dir)
        self.name = fine_tuned_name(_base_slug(self.base), settings.org, job.suffix, job.id)
        self.lost = False
        self._last_poll = 0.0
        self._last_answer: str | None = None
        self._mirrored = False
        self._started = None  # (monotonic time, step) of this attempt's first metrics row
        self._stop_beating = threading.Event()

    # --- database helpers ---------------------------------------------------------------------------

    def event(self, message: str, **kw) -> None:
        with self.sessions() as s:
            if self._holds(s):
                queue.add_event(s, self.job_id, message, **kw)
                s.commit()

    def _holds(self, s: Session) -> bool:
        """Whether the job is still this worker's to write about. One that was taken over gets nothing
        more from this worker (its steps would be listed twice, beside the new holder's); one cancelled
        gets no step or checkpoint after its cancel (only `_stopped`'s word of where training stopped)."""
        row = s.execute(select(JobRow.worker_id, JobRow.status).where(JobRow.id == self.job_id)).one_or_none()
        if row is None or row.worker_id != self.worker_id:
            self.lost = True
        return not self.lost and row.status != "cancelled"

    def _transition(self, expected: tuple[str, ...], **values) -> bool:
        with self.sessions() as s:
            ok = queue.transition(s, self.job_id, self.worker_id, expected, **values)
            s.commit()
            return ok

    def _release(self, message: str | None = None, **values) -> None:
        with self.sessions() as s:
            queue.release(s, self.job_id, self.worker_id, **values)
            if message:
                queue.add_event(s, self.job_id, message)
            s.commit()

    def _forget_steps_after(self, step: int) -> None:
        """Drop the step events beyond `step` (as metrics_log.truncate_after does for the run folder's
        file), so the steps replayed from the checkpoint are not listed twice."""
        with self.sessions() as s:
            rows = s.scalars(select(EventRow).where(EventRow.job_id == self.job_id, EventRow.type == "metrics")).all()
            for row in rows:
                if (row.data or {}).get("step", 0) > step:
                    s.delete(row)
            s.commit()

    def _worker_stops(self) -> int:
        """How often a worker died holding this job before (each reclaim left a WORKER_STOPPED event)."""
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(EventRow).where(
                EventRow.job_id == self.job_id, EventRow.message.startswith(WORKER_STOPPED)))

    # --- the job ------------------------------------------------------------------------------------

    def run(self) -> None:
        beat = threading.Thread(target=self._heartbeat, daemon=True)
        beat.start()
        try:
            self._run()
        except JobLost:
            log.warning("job %s was taken over by another worker; stopping", self.job_id)
        except JobFailed as err:
            self._fail(err.code, err.message, err.param)
        except Exception as err:  # any bug or environment problem: the job says why, never hangs
            log.error("job %s failed:\n%s", self.job_id, traceback.format_exc())
            code, message, param = self._describe(err)
            if param is None and (then := self._how_to_go_on()):  # (a bad file or model would fail it again)
                message = f"{message.rstrip('.')}. {then}"
            self._fail(code, message, param)
        finally:
            self._stop_beating.set()
            beat.join(timeout=5)

    def _heartbeat(self) -> None:
        if not queue.keep_beating(self.sessions, self.job_id, self.worker_id, self._stop_beating):
            self.lost = True

    def _run(self) -> None:
        from ..train.checkpoint import checkpoint_dirs, read_meta
        from ..train.config import TrainConfig
        from ..train.loop import TrainingStopped, train

        job = self.job
        if job.run_dir is None:
            with self.sessions() as s:
                queue.transition(s, job.id, self.worker_id, queue.CLAIMABLE, run_dir=str(self.run_dir))
                s.commit()
        train_path, valid_path = job_paths(self.sessions, job)
        # The server validates a new job's files; one still waiting here was left by a server that
        # stopped first (or by a worker that died validating it).
        if job.status == "validating_files" and not validate_files(self.sessions, job, self.worker_id,
                                                                   train_path, valid_path):
            return self._step_aside()

        ckpts = checkpoint_dirs(self.run_dir)
        at_step = read_meta(ckpts[-1])["state"]["global_step"] if ckpts else 0
        self._forget_steps_after(at_step)  # a dead worker's steps past its last checkpoint are made again
        self._add_missing_checkpoint_rows(ckpts)
        if self.previous:
            if (stops := self._worker_stops() + 1) > MAX_WORKER_STOPS:  # it would only die again
                raise JobFailed("worker_died", f"The worker running this job stopped {stops} times, the last at step "
                                f"{at_step}: it may run out of memory, or crash (the server's log says how it ended)")
            where = f"resuming from the checkpoint at step {at_step}" if ckpts else "restarting from the beginning"
            self.event(f"{WORKER_STOPPED}; {where}", level="warn")
        elif ckpts:
            self.event(f"Resuming from the checkpoint at step {at_step}")
        if not self._transition(("queued", "running"), status="running"):
            return self._step_aside()
        if not ckpts and not self.previous:
            self.event("Fine-tuning job started")

        if job.model.startswith("ft:") and self.init_from is None:
            raise JobFailed("model_not_available", f"The model {job.model} this job trains on was deleted", "model")
        hp = job.hyperparameters or {}
        cfg = TrainConfig(
            data=train_path,
            out=str(self.run_dir),
            base=self.base,
            init_from=self.init_from,
            method=(job.meta or {}).get(METHOD_KEY, "lora"),
            quantize=(job.meta or {}).get(QUANTIZE_KEY),
            validation_data=valid_path,
            n_epochs=hp.get("n_epochs", "auto"),
            batch_size=hp.get("batch_size", "auto"),
            learning_rate_multiplier=hp.get("learning_rate_multiplier", "auto"),
            seed=job.seed,
            objective="dpo" if job.method == "dpo" else "supervised",
        )
        if hp.get("beta", "auto") != "auto":
            cfg.dpo_beta = float(hp["beta"])
        try:
            result = train(cfg, on_event=self._on_event, should_stop=self._should_stop, resume=bool(ckpts))
        except TrainingStopped as stop:
            return self._stopped(stop.reason, stop.checkpoint)
        self._succeed(result)

    def _step_aside(self) -> None:
        """The API changed the job (paused, cancelled) between two of our steps: let it go."""
        self._release()

    # --- events from the training loop ---------------------------------------------------------------

    def _on_event(self, ev: dict) -> None:
        if not self._mirrored and (self.run_dir / "config.json").exists():
            self._mirror_hyperparameters()
        if ev["type"] == "message":
            if ev["message"] != "Training finished":  # _succeed says it, once the model is registered
                self.event(ev["message"])
        elif ev["type"] == "metrics":
            self._metrics(ev["data"])
        elif ev["type"] == "checkpoint":
            self._checkpoint(Path(ev["path"]), ev["step"], ev.get("metrics") or {})

    def _mirror_hyperparameters(self) -> None:
        """Replace "auto" with the values the loop resolved (config.json), as OpenAI shows them."""
        from ..train.config import TrainConfig

        resolved = _resolved(asdict(TrainConfig.load(self.run_dir)))
        with self.sessions() as s:
            queue.transition(s, self.job_id, self.worker_id, queue.CLAIMABLE + ("paused",),
                             hyperparameters=resolved)
            s.commit()
        self._mirrored = True

    def _metrics(self, row: dict) -> None:
        keys = ("step", "train_loss", "valid_loss", "train_mean_token_accuracy", "valid_mean_token_accuracy",
                "total_steps",  # OpenAI's; DPO's own after them, then the tokens trained so far (the
                # dashboard's count for a job still running or stopped: OpenAI's job has it once succeeded)
                "trained_tokens",
                "train_reward_accuracy", "train_reward_margin", "valid_reward_accuracy", "valid_reward_margin")
        data = {k: row[k] for k in keys if row.get(k) is not None}
        msg = f"Step {row['step']}/{row['total_steps']}: training loss={row['train_loss']:.4f}"
        if row.get("valid_loss") is not None:
            msg += f", validation loss={row['valid_loss']:.4f}"
        t = time.monotonic()
        if self._started is None:
            self._started = (t, row["step"] - 1)
        t0, step0 = self._started
        per_step = (t - t0) / max(row["step"] - step0, 1)
        eta = now() + per_step * (row["total_steps"] - row["step"])
        with self.sessions() as s:
            if self._holds(s):
                queue.add_event(s, self.job_id, msg, type="metrics", data=data)
                queue.transition(s, self.job_id, self.worker_id, ("running",), estimated_finish=eta)
                s.commit()

    def _checkpoint(self, path: Path, step: int, metrics: dict) -> None:
        with self.sessions() as s:
            if self._holds(s) and self._add_checkpoint_row(s, path, step, metrics):
                queue.add_event(s, self.job_id, f"Checkpoint created at step {step}")
            s.commit()

    def _add_missing_checkpoint_rows(self, ckpts: list[Path]) -> None:
        """A worker killed between an epoch's checkpoint and its row left the row out: it is added
        before training goes on, while it is still the newest (the API lists a job's checkpoints newest
        first in the order their rows were added; added at the end, it came first)."""
        from ..train.checkpoint import read_meta

        with self.sessions() as s:
            if self._holds(s):
                for ckpt in ckpts:
                    if (meta := read_meta(ckpt))["kind"] == "epoch":
                        self._add_checkpoint_row(s, ckpt, meta["state"]["global_step"], meta["metrics"])
                s.commit()

    def _add_checkpoint_row(self, s: Session, path: Path, step: int, metrics: dict) -> bool:
        exists = s.scalar(select(CheckpointRow.id).where(CheckpointRow.job_id == self.job_id,
                                                         CheckpointRow.step == step))
        if exists:
            return False
        keys = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy")
        s.add(CheckpointRow(
            id=new_id("ftckpt_"), job_id=self.job_id, step=step, name=f"{self.name}:ckpt-step-{step}",
            path=str(path / "weights"), metrics={k: metrics.get(k) for k in keys if metrics.get(k) is not None},
            created_at=(path / "state.json").stat().st_mtime,  # when it was written, whenever its row is added
        ))
        return True

    def _should_stop(self) -> str | None:
        if self.lost:  # (before a shutdown's checkpoint, which would be written in the other's folder)
            raise JobLost
        if self.shutdown.is_set():
            return "shutdown"
        t = time.monotonic()
        if t - self._last_poll < CONTROL_POLL_SECONDS:
            return self._last_answer
        self._last_poll = t
        with self.sessions() as s:
            status, control, holder = s.execute(
                select(JobRow.status, JobRow.control, JobRow.worker_id).where(JobRow.id == self.job_id)
            ).one()
            if holder != self.worker_id:
                self.lost = True
                raise JobLost
            if control in ("cancel", "pause"):
                self._last_answer = control
            else:
                self._last_answer = None
                if status == "queued":  # resumed before we noticed the pause: just keep going
                    queue.transition(s, self.job_id, self.worker_id, ("queued",), status="running")
                    s.commit()
        return self._last_answer

    # --- endings ------------------------------------------------------------------------------------

    def _stopped(self, reason: str, checkpoint: Path) -> None:
        from ..train.checkpoint import read_meta

        step = read_meta(checkpoint)["state"]["global_step"]
        if reason == "cancel":
            self._release(f"Training stopped at step {step}")
        elif reason == "pause":
            self._release(f"Checkpoint saved at step {step}; the job resumes from it when resumed")
        else:  # shutdown (SIGTERM, the server stopping): back to the queue for the next worker
            with self.sessions() as s:
                queue.transition(s, self.job_id, self.worker_id, ("running",), status="queued")
                queue.release(s, self.job_id, self.worker_id, estimated_finish=None)
                queue.add_event(s, self.job_id, f"Worker shut down; the job resumes from step {step}")
                s.commit()

    def _succeed(self, result) -> None:
        results_file = self._write_results_csv()
        resolved = _resolved(result.config)
        with self.sessions() as s:
            # One transaction: the model exists exactly when the job says succeeded. A job cancelled
            # while its last step ran stays cancelled and gets no model.
            done = queue.transition(
                s, self.job_id, self.worker_id, ("running", "queued", "paused"),
                status="succeeded", fine_tuned_model=self.name, trained_tokens=result.trained_tokens,
                finished_at=now(), estimated_finish=None, hyperparameters=resolved,
                result_files=[results_file.id] if results_file else [],
            )
            if done:
                if results_file:
                    s.add(results_file)
                s.add(ModelRow(id=self.name, project=self.job.project, base=self.base, job_id=self.job_id,
                               path=result.weights, owned_by=self.settings.org))
                queue.add_event(s, self.job_id, f"New fine-tuned model created: {self.name}")
                queue.add_event(s, self.job_id, "The job has successfully completed")
            elif results_file:  # a cancelled job lists no result file, as OpenAI's: none is left unlisted
                Path(results_file.path).unlink(missing_ok=True)
            queue.release(s, self.job_id, self.worker_id)
            s.commit()

    def _write_results_csv(self) -> FileRow | None:
        """OpenAI's step_metrics.csv: step, train_loss, train_accuracy, valid_loss, valid_mean_token_accuracy."""
        from ..train import metrics as metrics_log
        from ..train.checkpoint import writing

        rows = metrics_log.read(self.run_dir)
        file_id = new_id("file-")
        path = self.settings.files_dir / file_id
        try:
            with writing(path, "the job's result file (step_metrics.csv)"):
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"])
                    for r in rows:
                        w.writerow([r["step"], r.get("train_loss"), r.get("train_mean_token_accuracy"),
                                    r.get("valid_loss", ""), r.get("valid_mean_token_accuracy", "")])
        except OSError:
            path.unlink(missing_ok=True)  # a part of it, which no file row would ever list, holding space
            raise
        return FileRow(id=file_id, project=self.job.project, filename="step_metrics.csv",
                       purpose="fine-tune-results", bytes=path.stat().st_size, path=str(path))

    def _describe(self, err: Exception) -> tuple[str, str, str | None]:
        from ..data.validate import DataError
        from ..models.catalogue import ModelNotFound
        from ..train.checkpoint import WriteFailed

        if isinstance(err, WriteFailed):  # it names the file and why (a full disk): the type adds nothing
            return "training_error", str(err), None
        if isinstance(err, DataError) and err.report.errors:
            first = err.report.errors[0]
            return first.code, first.message, "training_file"
        if isinstance(err, ModelNotFound):
            return "model_not_available", str(err), "model"
        return "training_error", f"{type(err).__name__}: {err}", None

    def _how_to_go_on(self) -> str:
        """What a job that failed in training keeps, and how to go on from it: a failed job cannot be
        resumed (as OpenAI's: only a paused one), but its run folder can, on the server's machine."""
        from ..train.checkpoint import checkpoint_dirs, read_meta
        from ..train.loop import RESULT_FILE

        try:  # (a run folder that cannot be read leaves the error as it is)
            ckpts = checkpoint_dirs(self.run_dir)
            step = read_meta(ckpts[-1])["state"]["global_step"] if ckpts else None
        except (OSError, ValueError):
            return ""
        run = shlex.quote(str(self.run_dir))
        serve = f"`tuneforge import {run} --project {shlex.quote(self.job.project)}`"
        if (self.run_dir / RESULT_FILE).is_file():
            return f"Its run finished training: on the server, {serve} serves its model"
        if step is None:
            return ""
        return (f"Its checkpoint at step {step} is kept: on the server, `tuneforge train --resume {run}` "
                f"finishes the run, then {serve} serves its model")

    def _fail(self, code: str, message: str, param: str | None) -> None:
        with self.sessions() as s:
            queue.fail(s, self.job_id, self.worker_id, code, message, param)
            s.commit()


# --- the process ------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """A worker started by `tuneforge serve` must not outlive it (a killed server leaves no orphans
    training on). Linux delivers SIGTERM when the parent dies; the handler checkpoints and exits."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        sys.exit(0)


def run_worker(database_url: str | None = None, poll_interval: float = 1.0, once: bool = False) -> None:
    """Claim and run jobs until SIGTERM/SIGINT (or, with once=True, after at most one job)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(message)s")
    _die_with_parent()
    settings = get_settings()
    url = resolve_url(database_url)
    sessions = session_factory(url)
    worker_id = queue.make_worker_id()
    shutdown = threading.Event()
    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        # SIGTERM/SIGINT ask the running job to checkpoint and go back to the queue, then we exit.
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous_handlers[sig] = signal.signal(sig, lambda *_: shutdown.set())
    log.info("%s polling %s", worker_id, url.split("@")[-1])
    try:
        while not shutdown.is_set():
            with sessions() as s:
                got = queue.claim(s, worker_id)
            if got is None:
                if once:
                    return
                shutdown.wait(poll_interval)
                continue
            job, previous = got
            log.info("claimed %s (%s)", job.id, job.status)
            JobRunner(sessions, worker_id, job, previous, settings, shutdown).run()
            if once:
                return
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tuneforge.jobs.worker")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    run_worker(args.database_url, args.poll_interval)


if __name__ == "__main__":
    main()
