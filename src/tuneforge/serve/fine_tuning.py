"""Fine-tuning jobs API: create, list, retrieve, cancel, pause, resume, events, checkpoints.

Creating a job writes a row (status `validating_files`) and hands it to the server's file validator
(jobs.validation), which moves it to `queued` within moments, or fails it for a bad file, whether or
not a worker is free; a worker process then claims the queued job and trains. Hyperparameters can
come in the deprecated top-level `hyperparameters` or in `method.supervised.hyperparameters`
(`method.dpo.hyperparameters` for a DPO job, with `beta`); both are accepted (the method's win) and
the job shows the same values in both places, "auto" until the worker resolves them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..jobs import queue
from ..jobs.queue import METHOD_KEY, QUANTIZE_KEY
from ..jobs.worker import SUFFIX_RE, SUFFIX_RULE
from ..models.catalogue import available
from ..models.quantize import check_quantize, require_bitsandbytes
from ..settings import Settings
from ..store.database import CheckpointRow, EventRow, FileRow, JobRow, metadata_matches, new_id
from ..store.keys import Principal
from .deps import DB, Caller, SettingsDep
from .errors import bad_request, not_found
from .metadata import check_metadata, metadata_filter
from .models import own_checkpoint, own_model
from .paging import check_limit, page, page_list
from .protocol import (
    Checkpoint,
    CheckpointList,
    CheckpointMetrics,
    DpoHyperparameters,
    DpoMethod,
    EventList,
    FineTuningJob,
    Hyperparameters,
    JobCreate,
    JobError,
    JobEvent,
    JobList,
    Method,
    SupervisedMethod,
)

LIMITS = {"n_epochs": (1, 50), "batch_size": (1, 256), "learning_rate_multiplier": (1e-6, 100.0)}
BETA_LIMITS = (1e-3, 10.0)  # DPO's beta; "auto" is train.config's default (0.1, OpenAI's)


def job_object(row: JobRow, settings: Settings) -> FineTuningJob:
    hp = Hyperparameters(**{k: row.hyperparameters.get(k, "auto") for k in LIMITS})
    return FineTuningJob(
        id=row.id, created_at=int(row.created_at), error=JobError(**row.error) if row.error else None,
        fine_tuned_model=row.fine_tuned_model, finished_at=int(row.finished_at) if row.finished_at else None,
        hyperparameters=hp, model=row.model, organization_id=settings.org, result_files=row.result_files or [],
        seed=row.seed, status=row.status, trained_tokens=row.trained_tokens, training_file=row.training_file,
        validation_file=row.validation_file,
        estimated_finish=int(row.estimated_finish) if row.estimated_finish and row.status == "running" else None,
        metadata=row.meta, method=_method(row.method, hp, row.hyperparameters.get("beta", "auto")),
    )


def _method(kind: str, hp: Hyperparameters, beta) -> Method:
    if kind == "dpo":
        return Method(type="dpo", dpo=DpoMethod(hyperparameters=DpoHyperparameters(**hp.model_dump(), beta=beta)))
    return Method(type="supervised", supervised=SupervisedMethod(hyperparameters=hp))


def get_job(db: Session, caller: Principal, job_id: str) -> JobRow:
    row = db.scalar(select(JobRow).where(JobRow.id == job_id, JobRow.project == caller.project))
    if row is None:
        raise not_found("fine-tuning job", job_id, param="fine_tuning_job_id")
    return row


# --- create -----------------------------------------------------------------------------------------


def _check_file(db: Session, caller: Principal, file_id: str, param: str) -> None:
    row = db.scalar(select(FileRow).where(FileRow.id == file_id, FileRow.project == caller.project))
    if row is None:
        raise bad_request(f"invalid {param}: no file with id '{file_id}' found", param=param, code="invalid_file")
    if row.purpose != "fine-tune":
        raise bad_request(f"File {file_id} has purpose '{row.purpose}'; fine-tuning needs purpose 'fine-tune'",
                          param=param, code="invalid_file_purpose")


def _tuned(db: Session, caller: Principal, model: str) -> Path | None:
    """The weights of a fine-tuned model, or of a checkpoint (ft:...:ckpt-step-N), of the caller's
    project, still there: a job on it continues training from them (OpenAI's fine-tuning of an ft:
    model; jobs.worker)."""
    row = own_model(db, caller, model)
    if row is not None:
        return Path(row.path) if Path(row.path).exists() else None
    ckpt = own_checkpoint(db, caller, model)  # (one whose weights folder is still there)
    return Path(ckpt.path) if ckpt is not None else None


def _source_run(weights: Path):
    """The settings (train.config's TrainConfig) of the run whose weights a job continues from, or None
    when they cannot be read (the worker says what is wrong when it loads them)."""
    from ..models.load import run_folder
    from ..train.config import TrainConfig

    try:
        return TrainConfig.load(run_folder(weights))
    except (OSError, ValueError):
        return None


def _check_same_shape(name: str, run, metadata: dict | None) -> None:
    """A job on an ft: model trains with that model's method and quantisation (train.config's
    continued_from): a different one asked for in metadata would be dropped unread - the job said
    "full" and trained LoRA - so it is refused by name, as `train --init-from` refuses --method."""
    for key, theirs in ((METHOD_KEY, run.method), (QUANTIZE_KEY, run.quantize)):
        if (asked := (metadata or {}).get(key, theirs)) != theirs:
            raise bad_request(f"metadata['{key}'] is {asked!r}, but {name} was trained with {theirs!r}: a job on "
                              f"it trains on the same way (leave {key} out)", param="metadata", code="invalid_metadata")


def _with_shape(metadata: dict | None, run) -> dict | None:
    """A continued job's metadata with the method (and quantisation) it trains with, its source's. The
    job object and its page show the method from there: one given none showed "lora" (a job on a base
    model's default), on a full model too. (What it trains with is the source's all the same: the
    loop takes it from the source's config, and from its own run's config when it resumes.)"""
    if run is None:
        return metadata
    return (metadata or {}) | {METHOD_KEY: run.method} | ({QUANTIZE_KEY: run.quantize} if run.quantize else {})


def _hyperparameters(req: JobCreate) -> tuple[str, dict]:
    """(method type, hyperparameters) of a job request, each checked against its limits."""
    hp = req.hyperparameters.model_dump(exclude_none=True) if req.hyperparameters else {}
    prefix, kind = "hyperparameters", "supervised"
    if req.method is not None:
        kind = req.method.type
        if kind not in ("supervised", "dpo"):
            raise bad_request(f"method.type '{kind}' is not supported by this server; use 'supervised' or 'dpo'",
                              param="method.type", code="unsupported_method")
        for other in ("supervised", "dpo", "reinforcement"):
            # settings under another method's key would be dropped unread (n_epochs in method.supervised
            # of a DPO job trained with 'auto' epochs)
            if other != kind and getattr(req.method, other) is not None:
                raise bad_request(f"method.{other} is given but method.type is '{kind}'; give its settings in "
                                  f"method.{kind}", param=f"method.{other}", code="invalid_value")
        inner = getattr(req.method, kind)
        if inner is not None and inner.hyperparameters is not None:
            prefix = f"method.{kind}.hyperparameters"
            given = inner.hyperparameters.model_dump(exclude_none=True)
            for name in hp.keys() & given.keys():  # the deprecated place and the new one, saying different things
                if hp[name] != given[name]:
                    raise bad_request(f"hyperparameters.{name} ({hp[name]}) and {prefix}.{name} ({given[name]}) "
                                      "disagree; hyperparameters is deprecated: give them in method only",
                                      param=f"hyperparameters.{name}", code="invalid_hyperparameter")
            hp |= given
    limits = LIMITS | ({"beta": BETA_LIMITS} if kind == "dpo" else {})
    out = {}
    for name, (lo, hi) in limits.items():
        value = hp.get(name, "auto")
        if value != "auto" and not lo <= value <= hi:
            raise bad_request(f"{name} must be 'auto' or between {lo:g} and {hi:g}, got {value}",
                              param=f"{prefix}.{name}", code="invalid_hyperparameter")
        out[name] = value
    return kind, out


def create_job(db: Session, caller: Principal, settings: Settings, req: JobCreate) -> FineTuningJob:
    bases = available()
    source = None if req.model in bases else _tuned(db, caller, req.model)
    if req.model not in bases and source is None:
        raise bad_request(f"Model {req.model!r} is not available for fine-tuning; choose one of {bases} or a "
                          "fine-tuned model of this project (ft:...) or a checkpoint of one (ft:...:ckpt-step-N), which "
                          "the job trains on",
                          param="model", code="model_not_available")
    _check_file(db, caller, req.training_file, "training_file")
    if req.validation_file:
        _check_file(db, caller, req.validation_file, "validation_file")
    kind, hp = _hyperparameters(req)
    if req.seed is not None and not 0 <= req.seed < 2**31:
        raise bad_request(f"seed must be from 0 to {2**31 - 1}, got {req.seed}", param="seed", code="invalid_value")
    if req.suffix is not None and not SUFFIX_RE.match(req.suffix):
        raise bad_request(SUFFIX_RULE, param="suffix", code="invalid_suffix")
    check_metadata(req.metadata)
    run = _source_run(source) if source is not None else None
    method = (req.metadata or {}).get(METHOD_KEY, run.method if run else "lora")
    if method not in ("lora", "full"):
        raise bad_request(f"metadata['{METHOD_KEY}'] must be 'lora' or 'full'", param="metadata",
                          code="invalid_metadata")
    if (quantize := (req.metadata or {}).get(QUANTIZE_KEY)) is not None:
        try:
            check_quantize(quantize, method)
            require_bitsandbytes()
        except ValueError as e:
            raise bad_request(f"metadata['{QUANTIZE_KEY}']: {e}", param="metadata", code="invalid_metadata") from None
    if run is not None:
        _check_same_shape(req.model, run, req.metadata)
    if req.integrations:
        raise bad_request("integrations are not supported by this server", param="integrations",
                          code="unsupported_integration")
    row = JobRow(
        id=new_id("ftjob-"), project=caller.project, model=req.model, training_file=req.training_file,
        validation_file=req.validation_file, status="validating_files", method=kind, hyperparameters=hp,
        suffix=req.suffix,
        seed=req.seed if req.seed is not None else random.randrange(2**31),
        meta=_with_shape(req.metadata, run),
    )
    db.add(row)
    db.flush()  # the job row must exist before its first event (foreign key)
    queue.add_event(db, row.id, f"Created fine-tuning job: {row.id}")
    db.commit()
    return job_object(row, settings)


# --- read -------------------------------------------------------------------------------------------


def list_jobs(db: Session, caller: Principal, settings: Settings, after: str | None, limit: int,
              metadata: dict[str, str]) -> JobList:
    check_limit(limit, 100)
    rows = db.scalars(select(JobRow).where(JobRow.project == caller.project).order_by(JobRow.seq.desc())).all()
    rows = [r for r in rows if metadata_matches(r.meta, metadata)]
    rows, more = page_list(rows, after, limit)
    return JobList(data=[job_object(r, settings) for r in rows], has_more=more)


def list_events(db: Session, caller: Principal, job_id: str, after: str | None, limit: int) -> EventList:
    get_job(db, caller, job_id)
    check_limit(limit, 1000)
    rows, more = page(db, select(EventRow).where(EventRow.job_id == job_id), EventRow, after, limit)
    return EventList(data=[JobEvent(id=r.id, created_at=int(r.created_at), level=r.level, message=r.message,
                                    data=r.data, type=r.type) for r in rows], has_more=more)


def list_checkpoints(db: Session, caller: Principal, job_id: str, after: str | None, limit: int) -> CheckpointList:
    get_job(db, caller, job_id)
    check_limit(limit, 100)
    rows, more = page(db, select(CheckpointRow).where(CheckpointRow.job_id == job_id), CheckpointRow, after, limit)
    data = [Checkpoint(id=r.id, created_at=int(r.created_at), fine_tuned_model_checkpoint=r.name,
                       fine_tuning_job_id=r.job_id, step_number=r.step,
                       metrics=_checkpoint_metrics(r.metrics, r.step)) for r in rows]
    return CheckpointList.of(data, more)


def _checkpoint_metrics(metrics: dict, step: int) -> CheckpointMetrics:
    """A checkpoint's metrics as OpenAI names them. A checkpoint is written at the end of an epoch,
    whose validation pass covers the whole validation set: that is OpenAI's `full_valid_*` (its
    `valid_*` are of one batch), so both carry the same numbers here."""
    full = {f"full_{k}": metrics[k] for k in ("valid_loss", "valid_mean_token_accuracy") if k in metrics}
    return CheckpointMetrics(**(metrics | full | {"step": step}))


def control(db: Session, caller: Principal, settings: Settings, job_id: str, action) -> FineTuningJob:
    row = get_job(db, caller, job_id)
    try:
        action(db, row)
    except queue.InvalidTransition as err:
        raise bad_request(str(err), param="fine_tuning_job_id", code="invalid_job_state") from err
    db.commit()
    return job_object(row, settings)


# --- routes -----------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])


@router.post("/jobs", response_model=FineTuningJob)
def create_route(request: Request, req: JobCreate, db: DB, caller: Caller, settings: SettingsDep):
    job = create_job(db, caller, settings, req)
    request.app.state.validator.submit(job.id)  # after the commit: the validator's session must see the row
    return job


@router.get("/jobs", response_model=JobList)
def list_route(request: Request, db: DB, caller: Caller, settings: SettingsDep, after: str | None = None,
               limit: Annotated[int, Query()] = 20):
    return list_jobs(db, caller, settings, after, limit, metadata_filter(request))


@router.get("/jobs/{fine_tuning_job_id}", response_model=FineTuningJob)
def retrieve_route(fine_tuning_job_id: str, db: DB, caller: Caller, settings: SettingsDep):
    return job_object(get_job(db, caller, fine_tuning_job_id), settings)


@router.post("/jobs/{fine_tuning_job_id}/cancel", response_model=FineTuningJob)
def cancel_route(fine_tuning_job_id: str, db: DB, caller: Caller, settings: SettingsDep):
    return control(db, caller, settings, fine_tuning_job_id, queue.cancel)


@router.post("/jobs/{fine_tuning_job_id}/pause", response_model=FineTuningJob)
def pause_route(fine_tuning_job_id: str, db: DB, caller: Caller, settings: SettingsDep):
    return control(db, caller, settings, fine_tuning_job_id, queue.pause)


@router.post("/jobs/{fine_tuning_job_id}/resume", response_model=FineTuningJob)
def resume_route(fine_tuning_job_id: str, db: DB, caller: Caller, settings: SettingsDep):
    return control(db, caller, settings, fine_tuning_job_id, queue.resume)


@router.get("/jobs/{fine_tuning_job_id}/events", response_model=EventList)
def events_route(fine_tuning_job_id: str, db: DB, caller: Caller, after: str | None = None,
                 limit: Annotated[int, Query()] = 20):
    return list_events(db, caller, fine_tuning_job_id, after, limit)


@router.get("/jobs/{fine_tuning_job_id}/checkpoints", response_model=CheckpointList)
def checkpoints_route(fine_tuning_job_id: str, db: DB, caller: Caller, after: str | None = None,
                      limit: Annotated[int, Query()] = 10):
    return list_checkpoints(db, caller, fine_tuning_job_id, after, limit)
