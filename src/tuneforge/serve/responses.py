"""OpenAI's Responses API: `POST /v1/responses` (plain and streamed), GET (plain, or a kept response's
events streamed again) and DELETE by id, and the input items - the API OpenAI's own guides now call a fine-tuned model with
(`client.responses.create(model="ft:...", input="...")`), answered by the same engine as chat.

What it covers is text: `input` as a string or a list of messages (content a string or
input_text / output_text parts), `instructions` as the system message ahead of them,
`previous_response_id` to continue a kept conversation (whose instructions are not carried over, as
at OpenAI), `truncation: "auto"` (the oldest turns dropped to fit the context), temperature, top_p,
max_output_tokens and metadata. Responses are kept unless the request
says `store: false` - OpenAI's default. Tools, images, files, reasoning, structured output and
background mode are refused with the parameter named rather than silently ignored.

A stream is OpenAI's typed events (`event: <type>` and `data: <json>`, numbered by sequence_number):
response.created, response.in_progress, response.output_item.added, response.content_part.added, one
response.output_text.delta per piece, then .output_text.done, .content_part.done, .output_item.done
and response.completed - or response.incomplete when max_output_tokens cut the answer, or
response.failed when generation fails after the response started.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..data.formats import chat_role
from ..models.generate import Completion, Sampling
from ..monitor.stored import response_conversation
from ..monitor.usage import CLIENT_CLOSED
from ..store.database import ResponseRow, new_id
from ..store.keys import Principal
from .chat import (
    DEFAULT_CHAT_MAX_TOKENS,
    chat_logprobs,
    check_tool_choice,
    checked_top,
    complete_while_connected,
    empty_array,
    generated,
    in_own_session,
    measure_prompt,
    note_usage,
    samplings,
    sse_response,
)
from .deps import DB, Caller
from .engine import Engine, Target
from .errors import bad_request, failed_midstream, not_found, unsupported
from .metadata import check_metadata
from .models import resolve_model
from .paging import check_limit, page_list
from .protocol import (
    InputItem,
    InputItemList,
    OutputMessage,
    OutputText,
    ResponseDeleted,
    ResponseObject,
    ResponseRequest,
    ResponseUsage,
    SamplingParams,
    Usage,
)

ROLES = ("user", "assistant", "system", "developer")
MIN_OUTPUT_TOKENS = 16  # the least max_output_tokens OpenAI takes
LOGPROBS = "message.output_text.logprobs"  # the include that asks for the answer's log-probabilities


def _logprobs(req: ResponseRequest) -> int | None:
    """How many alternatives each answer token comes with, when log-probabilities were asked for
    (include, or top_logprobs); None otherwise."""
    if LOGPROBS in (req.include or []) or req.top_logprobs is not None:
        return req.top_logprobs or 0
    return None


# --- the request ------------------------------------------------------------------------------------


def _refuse_unsupported(req: ResponseRequest) -> None:
    if req.tools:
        raise unsupported("tools are", "tools")
    check_tool_choice(req.tool_choice, req.tools)  # (so any tool_choice is refused: there are no tools)
    if req.reasoning:
        raise unsupported("reasoning is", "reasoning")
    if req.background:
        raise unsupported("background mode is", "background")
    if ((req.text or {}).get("format") or {}).get("type", "text") != "text":
        raise unsupported("text.format other than 'text' (structured output) is", "text.format")
    if (req.text or {}).get("verbosity") is not None:  # refused as chat's top-level verbosity is
        raise unsupported("text.verbosity is", "text.verbosity")
    if set(req.include or []) - {LOGPROBS}:
        raise unsupported(f"include other than {LOGPROBS!r} is", "include")
    checked_top(req.top_logprobs, 20, "top_logprobs")
    if req.conversation:
        raise unsupported("conversation (the Conversations API) is", "conversation")  # previous_response_id is
    if req.prompt:
        raise unsupported("prompt (stored prompt templates) is", "prompt")


def _check_max_output_tokens(limit: int | None) -> None:
    if limit is not None and limit < MIN_OUTPUT_TOKENS:
        raise bad_request(f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
                          f"{MIN_OUTPUT_TOKENS}, but got {limit} instead.", param="max_output_tokens",
                          code="integer_below_min_value")


def _text(content: Any, where: str) -> str:
    """A message's content as text: a string, or input_text / output_text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts", param=where, code="invalid_value")
    if not content:
        raise empty_array(where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}[{j}]: only text parts (input_text, output_text) are supported by this "
                              f"server, got {kind!r}", param=f"{where}[{j}]", code="unsupported_content")
        texts.append(part["text"])
    return "".join(texts)


def _turns(req: ResponseRequest) -> list[dict[str, str]]:
    """The request's input as [{role, content}] messages."""
    if isinstance(req.input, str):
        if not req.input:
            raise bad_request("input must not be empty", param="input", code="invalid_value")
        return [{"role": "user", "content": req.input}]
    if not req.input:
        raise bad_request("input must contain at least one message", param="input", code="invalid_value")
    turns = []
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        if kind != "message" or item.get("role") not in ROLES:
            raise bad_request(f"input[{i}]: only messages with role user, assistant, system or developer are "
                              f"supported by this server, got type {kind!r} role {item.get('role')!r}",
                              param=f"input[{i}]", code="unsupported_input")
        turns.append({"role": item["role"], "content": _text(item.get("content"), f"input[{i}].content")})
    return turns


def _input_items(turns: list[dict[str, str]]) -> list[dict]:
    kind = {"assistant": "output_text"}
    return [InputItem(id=new_id("msg_", 40), role=t["role"],
                      content=[{"type": kind.get(t["role"], "input_text"), "text": t["content"]}
                               | ({"annotations": []} if t["role"] == "assistant" else {})]).model_dump()
            for t in turns]


def _find(db: Session, caller: Principal, response_id: str) -> ResponseRow | None:
    # only kept responses exist here (and only the caller's project's)
    return db.scalar(select(ResponseRow).where(ResponseRow.id == response_id, ResponseRow.project == caller.project))


def _get(db: Session, caller: Principal, response_id: str) -> ResponseRow:
    row = _find(db, caller, response_id)
    if row is None:
        raise not_found("response", response_id, param="response_id")
    return row


def _earlier_turns(db: Session, caller: Principal, previous_id: str | None) -> list[dict[str, str]]:
    """The conversation before this request: the previous response's own context and input, and its
    answer."""
    if previous_id is None:
        return []
    row = _find(db, caller, previous_id)
    if row is None:
        raise bad_request(f"Previous response with id '{previous_id}' not found (only kept responses can be "
                          "continued: store must not be false).", param="previous_response_id",
                          code="previous_response_not_found")
    turns, answer = response_conversation(row)
    return [*turns, {"role": "assistant", "content": answer}]


def _fitted(engine: Engine, target: Target, system: list[dict], turns: list[dict], req: ResponseRequest):
    """(messages, prompt tokens, context length). With `truncation: "auto"`, the oldest turns are
    dropped, as at OpenAI, until the prompt leaves room for max_output_tokens (or one token); the
    instructions and the last turn always stay."""
    while True:
        messages = system + [{"role": chat_role(t["role"]), "content": t["content"]} for t in turns]
        prompt_tokens, room = measure_prompt(engine, target, messages, param="input")
        if req.truncation != "auto" or len(turns) == 1 or prompt_tokens + (req.max_output_tokens or 1) <= room:
            return messages, prompt_tokens, room
        turns = turns[1:]


# --- the response -----------------------------------------------------------------------------------


class _Answer:
    """One response's ids and settings, and the object at each stage: started, finished, failed."""

    def __init__(self, req: ResponseRequest, prompt_tokens: int):
        self.req, self.prompt_tokens = req, prompt_tokens
        self.id, self.message_id, self.created = new_id("resp_", 40), new_id("msg_", 40), int(time.time())

    def started(self) -> ResponseObject:
        req = self.req
        return ResponseObject(
            id=self.id, created_at=self.created, status="in_progress", instructions=req.instructions,
            max_output_tokens=req.max_output_tokens, model=req.model, output=[],
            previous_response_id=req.previous_response_id, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, store=req.store is not False,
            truncation=req.truncation or "disabled", tool_choice=req.tool_choice or "auto",
            parallel_tool_calls=req.parallel_tool_calls is not False,  # echoed as sent, as OpenAI's object does
            metadata=req.metadata or {}, user=req.user,
        )

    def finished(self, result: Completion) -> ResponseObject:
        cut = result.finish_reason == "length"
        message = OutputMessage(id=self.message_id, status="incomplete" if cut else "completed",
                                content=[OutputText(text=result.text, logprobs=_entries(result.logprobs))])
        return self.started().model_copy(update={
            "status": "incomplete" if cut else "completed", "completed_at": int(time.time()),
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None, "output": [message],
            "usage": ResponseUsage(input_tokens=self.prompt_tokens, output_tokens=result.completion_tokens,
                                   total_tokens=self.prompt_tokens + result.completion_tokens),
        })

    def failed(self, error: dict) -> ResponseObject:
        """`error`: errors.failed_midstream's body; the Responses API's error object has its message."""
        return self.started().model_copy(update={
            "status": "failed", "error": {"code": "server_error", "message": error["error"]["message"]}})


def _entries(tokens) -> list[dict] | None:
    """The Responses API's logprobs of some answer tokens: chat's entries (token, logprob, bytes,
    top_logprobs), or None when none were asked for."""
    return None if tokens is None else chat_logprobs(tokens)["content"]


def _keep(db: Session, caller: Principal, context: list[dict], items: list[dict], done: ResponseObject) -> None:
    db.add(ResponseRow(id=done.id, project=caller.project, model=done.model, context=context, input=items,
                       response=done.model_dump()))
    db.commit()


def _usage(done: ResponseObject) -> Usage:
    u = done.usage
    return Usage(prompt_tokens=u.input_tokens, completion_tokens=u.output_tokens, total_tokens=u.total_tokens)


def create_response(request: Request, db: Session, caller: Principal, req: ResponseRequest):
    engine: Engine = request.app.state.engine
    request.state.model = req.model
    target = resolve_model(db, caller, req.model)
    _refuse_unsupported(req)
    _check_max_output_tokens(req.max_output_tokens)
    check_metadata(req.metadata)
    context = _earlier_turns(db, caller, req.previous_response_id)
    turns = _turns(req)
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    messages, prompt_tokens, room = _fitted(engine, target, system, context + turns, req)
    (sampling,) = samplings(SamplingParams(model=req.model, temperature=req.temperature, top_p=req.top_p),
                            req.max_output_tokens, DEFAULT_CHAT_MAX_TOKENS, prompt_tokens, room,
                            names=("max_output_tokens", "input"))
    sampling = replace(sampling, logprobs=_logprobs(req))
    answer, items = _Answer(req, prompt_tokens), _input_items(turns)

    store = req.store is not False

    def keep(done: ResponseObject, db: Session) -> None:
        _keep(db, caller, context, items, done)

    if req.stream:
        kept = (lambda done: in_own_session(request, keep, done)) if store else None  # after the request's session
        events = _events(engine, target, messages, sampling, answer, kept, request)
        return sse_response(_sse(events))
    results = complete_while_connected(engine, target, [(messages, sampling)], request, prompt_tokens)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    done = answer.finished(results[0])
    note_usage(request, req.model, _usage(done))
    if store:
        keep(done, db)
    return done


async def _sse(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    async with aclosing(events):  # closed early (the client hung up): closes the generation too
        async for event in events:
            yield f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


Event = tuple[str, dict]  # an event's type and its fields, before it is numbered


def _opening(started: ResponseObject, message_id: str) -> list[Event]:
    """The events ahead of the answer's text: the response begun, its message and text part added."""
    response = started.model_dump()
    return [("response.created", {"response": response}), ("response.in_progress", {"response": response}),
            ("response.output_item.added", {"output_index": 0, "item": {
                "id": message_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}}),
            ("response.content_part.added", _where(message_id) | {"part": OutputText(text="").model_dump()})]


def _closing(done: ResponseObject) -> list[Event]:
    """The events after the answer's text: its part, its message and the response finished."""
    message = done.output[0]
    part, where = message.content[0], _where(message.id)
    kind = "response.completed" if done.status == "completed" else "response.incomplete"
    return [("response.output_text.done", where | {"text": part.text, "logprobs": part.logprobs or []}),
            ("response.content_part.done", where | {"part": part.model_dump()}),
            ("response.output_item.done", {"output_index": 0, "item": message.model_dump()}),
            (kind, {"response": done.model_dump()})]


def _where(message_id: str) -> dict:
    return {"item_id": message_id, "output_index": 0, "content_index": 0}


def _numbered(kind: str, fields: dict, number: int) -> dict:
    return {"type": kind, "sequence_number": number, **fields}


async def _events(engine: Engine, target: Target, messages: list[dict], sampling: Sampling, answer: _Answer,
                  keep, request: Request) -> AsyncIterator[dict]:
    numbers = itertools.count()
    for kind, fields in _opening(answer.started(), answer.message_id):
        yield _numbered(kind, fields, next(numbers))
    where, result = _where(answer.message_id), None
    try:
        async with aclosing(generated(engine, target, [(messages, sampling)], request, answer.prompt_tokens)) as pieces:
            async for _, piece in pieces:
                if isinstance(piece, Completion):
                    result = piece
                elif piece.text:
                    yield _numbered("response.output_text.delta", where | {
                        "delta": piece.text, "logprobs": _entries(piece.logprobs) or []}, next(numbers))
    except Exception as err:
        failed = answer.failed(failed_midstream(request, err)).model_dump()
        yield _numbered("response.failed", {"response": failed}, next(numbers))
        return
    done = answer.finished(result)
    note_usage(request, done.model, _usage(done))
    if keep is not None:  # kept before the client hears it is done: a retrieve that follows finds it
        await anyio.to_thread.run_sync(keep, done)
    for kind, fields in _closing(done):
        yield _numbered(kind, fields, next(numbers))


async def _replayed(done: ResponseObject, starting_after: int | None) -> AsyncIterator[dict]:
    """A kept response's events, as its streamed create sent them (the text in one delta), from
    after `starting_after` (a sequence number) when given - OpenAI's retrieve with stream=true,
    which the SDK reads as it reads a streamed create."""
    message = done.output[0]
    part = message.content[0]
    started = done.model_copy(update={"status": "in_progress", "output": [], "usage": None, "completed_at": None,
                                      "incomplete_details": None})  # (as _Answer.started made it)
    text = [("response.output_text.delta", _where(message.id) | {"delta": part.text, "logprobs": part.logprobs or []})]
    events = [*_opening(started, message.id), *(text if part.text else []), *_closing(done)]
    for number, (kind, fields) in enumerate(events):
        if starting_after is None or number > starting_after:
            yield _numbered(kind, fields, number)


def list_input_items(db: Session, caller: Principal, response_id: str, after: str | None, limit: int,
                     order: str) -> InputItemList:
    check_limit(limit, 100)
    items = [InputItem(**item) for item in _get(db, caller, response_id).input]
    if order == "desc":
        items.reverse()
    return InputItemList.of(*page_list(items, after, limit))


def delete_response(db: Session, caller: Principal, response_id: str) -> ResponseDeleted:
    db.delete(_get(db, caller, response_id))
    db.commit()
    return ResponseDeleted(id=response_id)


# --- routes -----------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", tags=["responses"])


@router.post("/responses", response_model=ResponseObject,
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}})
def create_route(req: ResponseRequest, request: Request, db: DB, caller: Caller):
    return create_response(request, db, caller, req)


@router.get("/responses/{response_id}", response_model=ResponseObject,
            responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}})
def retrieve_route(response_id: str, db: DB, caller: Caller, stream: bool = False, starting_after: int | None = None):
    done = ResponseObject(**_get(db, caller, response_id).response)
    if stream:
        return sse_response(_sse(_replayed(done, starting_after)))
    if starting_after is not None:  # a place in the events, which a JSON answer has none of
        raise bad_request("The 'starting_after' parameter is only allowed when 'stream' is true.",
                          param="starting_after", code="invalid_value")
    return done


@router.delete("/responses/{response_id}", response_model=ResponseDeleted)
def delete_route(response_id: str, db: DB, caller: Caller):
    return delete_response(db, caller, response_id)


@router.get("/responses/{response_id}/input_items", response_model=InputItemList)
def input_items_route(response_id: str, db: DB, caller: Caller, after: str | None = None,
                      limit: Annotated[int, Query()] = 20, order: Annotated[Literal["asc", "desc"], Query()] = "desc"):
    return list_input_items(db, caller, response_id, after, limit, order)
