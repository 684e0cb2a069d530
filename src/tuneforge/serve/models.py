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


def resolve_model(db: Session, caller: Principal, name: str) -> Target:
    if name in available():
        return Target(name)
    row = db.scalar(select(ModelRow).where(ModelRow.id == name, ModelRow.project == caller.project))
    if row is not None:
        return Target(row.base, Path(row.path))
    ckpt = db.execute(
        select(CheckpointRow.path, JobRow.model)
        .join(JobRow, JobRow.id == CheckpointRow.job_id)
        .where(CheckpointRow.name == name, JobRow.project == caller.project)
    ).first()
    if ckpt is not None and Path(ckpt.path).is_dir():
        return Target(ckpt.model, Path(ckpt.path))
    raise model_missing(name)


def list_models(db: Session, caller: Principal) -> ModelList:
    data = [Model(id=n, created=_STARTED, owned_by="tuneforge") for n in available()]
    rows = db.scalars(select(ModelRow).where(ModelRow.project == caller.project).order_by(ModelRow.seq)).all()
    data += [Model(id=r.id, created=int(r.created_at), owned_by=r.owned_by) for r in rows]
    return ModelList(data=data)


def retrieve_model(db: Session, caller: Principal, name: str) -> Model:
    if name in available():
        return Model(id=name, created=_STARTED, owned_by="tuneforge")
    row = db.scalar(select(ModelRow).where(ModelRow.id == name, ModelRow.project == caller.project))
    if row is None:
        raise model_missing(name)
    return Model(id=row.id, created=int(row.created_at), owned_by=row.owned_by)


def delete_model(db: Session, caller: Principal, name: str, engine) -> ModelDeleted:
    if name in available():
        raise APIError(403, f"You cannot delete the base model `{name}`; only fine-tuned models can be deleted.",
                       param="model", code="model_not_deletable")
    row = db.scalar(select(ModelRow).where(ModelRow.id == name, ModelRow.project == caller.project))
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
