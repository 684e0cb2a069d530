"""Stored chat completions: a request with `store: true` is kept, and can be listed, read, labelled
with metadata and deleted (OpenAI's `/v1/chat/completions` GET/POST/DELETE by id and `/messages`).

This is the loop from serving back to training: what a fine-tuned model answered in production,
filtered by model or metadata (say `{"rating": "good"}` set after review), becomes a chat JSONL file
for the next fine-tune (`tuneforge data stored`, monitor.stored). Nothing is kept unless asked.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..monitor.stored import find_stored
from ..store.database import StoredCompletionRow
from ..store.keys import Principal
from .deps import DB, Caller
from .errors import not_found
from .metadata import check_metadata, metadata_filter
from .paging import check_limit, page_list
from .protocol import (
    ChatCompletion,
    ChatRequest,
    StoredCompletion,
    StoredCompletionDeleted,
    StoredCompletionList,
    StoredCompletionUpdate,
    StoredMessage,
    StoredMessageList,
)


def keep(db: Session, project: str, req: ChatRequest, completion: ChatCompletion) -> None:
    """Keep the completion of a `store: true` request: its messages as sent, its metadata, and the
    stored completion object - the completion with the request's tools and tool_choice. Those two are
    kept in the completion's JSON, not in columns of their own: the schema is made by create_all, which
    adds no column to an existing table, so a database from before them keeps working (its rows read
    as having no tools)."""
    sent = [m.model_dump(exclude_none=True) for m in req.messages]
    kept = StoredCompletion(**completion.model_dump(), tools=req.tools, tool_choice=req.tool_choice)
    db.add(StoredCompletionRow(id=completion.id, project=project, model=completion.model, messages=sent,
                               completion=kept.model_dump(exclude={"metadata"}), meta=req.metadata))
    db.commit()


def _get(db: Session, caller: Principal, completion_id: str) -> StoredCompletionRow:
    row = db.scalar(select(StoredCompletionRow).where(StoredCompletionRow.id == completion_id,
                                                      StoredCompletionRow.project == caller.project))
    if row is None:  # only stored completions exist here (and only the caller's project's)
        raise not_found("chat completion", completion_id, param="completion_id")
    return row


def _object(row: StoredCompletionRow) -> StoredCompletion:
    return StoredCompletion(**row.completion, metadata=row.meta)


def list_stored(db: Session, caller: Principal, model: str | None, metadata: dict[str, str], after: str | None,
                limit: int, order: str) -> StoredCompletionList:
    check_limit(limit, 100)
    rows, more = page_list(find_stored(db, caller.project, model, metadata, newest_first=order == "desc"), after, limit)
    return StoredCompletionList.of([_object(r) for r in rows], more)


def list_messages(db: Session, caller: Principal, completion_id: str, after: str | None, limit: int,
                  order: str) -> StoredMessageList:
    check_limit(limit, 100)
    row = _get(db, caller, completion_id)
    messages = [StoredMessage(**(m | {"id": f"{row.id}-{i}"})) for i, m in enumerate(row.messages)]
    if order == "desc":
        messages.reverse()
    return StoredMessageList.of(*page_list(messages, after, limit))


def update(db: Session, caller: Principal, completion_id: str, req: StoredCompletionUpdate) -> StoredCompletion:
    check_metadata(req.metadata)
    row = _get(db, caller, completion_id)
    row.meta = req.metadata
    db.commit()
    return _object(row)


def delete(db: Session, caller: Principal, completion_id: str) -> StoredCompletionDeleted:
    db.delete(_get(db, caller, completion_id))
    db.commit()
    return StoredCompletionDeleted(id=completion_id)


# --- routes -----------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1/chat", tags=["chat"])
Order = Annotated[Literal["asc", "desc"], Query()]


@router.get("/completions", response_model=StoredCompletionList)
def list_route(request: Request, db: DB, caller: Caller, model: str | None = None, after: str | None = None,
               limit: Annotated[int, Query()] = 20, order: Order = "asc"):
    return list_stored(db, caller, model, metadata_filter(request), after, limit, order)


@router.get("/completions/{completion_id}", response_model=StoredCompletion)
def retrieve_route(completion_id: str, db: DB, caller: Caller):
    return _object(_get(db, caller, completion_id))


@router.post("/completions/{completion_id}", response_model=StoredCompletion)
def update_route(completion_id: str, req: StoredCompletionUpdate, db: DB, caller: Caller):
    return update(db, caller, completion_id, req)


@router.delete("/completions/{completion_id}", response_model=StoredCompletionDeleted)
def delete_route(completion_id: str, db: DB, caller: Caller):
    return delete(db, caller, completion_id)


@router.get("/completions/{completion_id}/messages", response_model=StoredMessageList)
def messages_route(completion_id: str, db: DB, caller: Caller, after: str | None = None,
                   limit: Annotated[int, Query()] = 20, order: Order = "asc"):
    return list_messages(db, caller, completion_id, after, limit, order)
