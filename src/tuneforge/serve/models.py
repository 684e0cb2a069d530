"""Models API: the base models of the catalogue plus the project's fine-tuned models.

A name resolves to a base model (catalogue), a fine-tuned model (`ft:...`, the job's adapter) or a
checkpoint (`ft:...:ckpt-step-N`, that epoch's adapter); chat and completions use the same lookup.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..models.catalogue import available
from ..store.database import CheckpointRow, JobRow, ModelRow
from ..store.keys import Principal
from .deps import DB, Caller
from .engine import Target
from .errors import APIError
from .protocol import Model, ModelDeleted, ModelList

_STARTED = int(time.time())  # base models have no creation time of their own; the server's start


def model_missing(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def own_model(db: Session, caller: Principal, name: str) -> ModelRow | None:
    """The caller's project's fine-tuned model called `name` (its row), if there is one."""
    return db.scalar(select(ModelRow).where(ModelRow.id == name, ModelRow.project == caller.project))


def resolve_model(db: Session, caller: Principal, name: str) -> Target:
    if name in available():
        return Target(name)
    row = own_model(db, caller, name)
    if row is not None:
        if not Path(row.path).exists():  # (loading it was a 500: "The server had an error")
            raise APIError(404, f"The model `{name}` has no weights on this server's disk any more (its folder was "
                                "moved or deleted): ask the server's operator", param="model", code="model_not_found")
        return Target(row.base, Path(row.path))
    ckpt = own_checkpoint(db, caller, name)
    if ckpt is not None:
        return Target(checkpoint_base(ckpt.model, ckpt.path), Path(ckpt.path))
    raise model_missing(name)


def checkpoint_base(job_model: str, path: str) -> str:
    """The base model a job's checkpoint (weights at RUN/checkpoints/step-N/weights) is served on: the
    job's model, or for a job that continued an ft: model, the base its run started from (its config)."""
    if not job_model.startswith("ft:"):
        return job_model
    from ..models.load import run_folder
    from ..train.config import TrainConfig

    return TrainConfig.load(run_folder(path)).base


def own_checkpoint(db: Session, caller: Principal, name: str):
    """The caller's checkpoint model `name` (path, base model, created_at) whose weights are still on disk."""
    ckpt = db.execute(
        select(CheckpointRow.path, CheckpointRow.created_at, JobRow.model)
        .join(JobRow, JobRow.id == CheckpointRow.job_id)
        .where(CheckpointRow.name == name, JobRow.project == caller.project)
    ).first()
    return ckpt if ckpt is not None and Path(ckpt.path).is_dir() else None


def list_models(db: Session, caller: Principal) -> ModelList:
    data = [Model(id=n, created=_STARTED, owned_by="tuneforge") for n in available()]
    rows = db.scalars(select(ModelRow).where(ModelRow.project == caller.project).order_by(ModelRow.seq)).all()
    data += [Model(id=r.id, created=int(r.created_at), owned_by=r.owned_by) for r in rows]
    return ModelList(data=data)


def retrieve_model(db: Session, caller: Principal, name: str) -> Model:
    if name in available():
        return Model(id=name, created=_STARTED, owned_by="tuneforge")
    row = own_model(db, caller, name)
    if row is not None:
        return Model(id=row.id, created=int(row.created_at), owned_by=row.owned_by)
    ckpt = own_checkpoint(db, caller, name)  # callable like a model, so it can be looked up like one
    if ckpt is None:
        raise model_missing(name)
    return Model(id=name, created=int(ckpt.created_at), owned_by="tuneforge")


def delete_model(db: Session, caller: Principal, name: str, engine) -> ModelDeleted:
    if name in available():
        raise APIError(403, f"You cannot delete the base model `{name}`; only fine-tuned models can be deleted.",
                       param="model", code="model_not_deletable")
    row = own_model(db, caller, name)
    if row is None and own_checkpoint(db, caller, name) is not None:
        raise APIError(403, f"`{name}` is a checkpoint of a fine-tuning job: it is kept with the job's run and "
                       "cannot be deleted on its own.", param="model", code="model_not_deletable")
    if row is None:
        raise model_missing(name)
    db.delete(row)
    db.commit()
    # The run folder stays on disk (its checkpoints are still callable); only the name goes away.
    engine.forget(Path(row.path))
    return ModelDeleted(id=name)


router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
def list_route(db: DB, caller: Caller):
    return list_models(db, caller)


# `:path` because fine-tuned model names contain ':' and a client may send them percent-decoded.
@router.get("/models/{model:path}", response_model=Model)
def retrieve_route(model: str, db: DB, caller: Caller):
    return retrieve_model(db, caller, model)


@router.delete("/models/{model:path}", response_model=ModelDeleted)
def delete_route(model: str, request: Request, db: DB, caller: Caller):
    return delete_model(db, caller, model, request.app.state.engine)
