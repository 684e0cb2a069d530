"""Chat Completions and legacy Completions, plain and streamed (SSE), for base and fine-tuned models.

Streaming follows OpenAI's wire format: `data: <chunk JSON>` lines, the first chunk of a choice
carrying the role, the last its finish_reason, an optional usage-only chunk (`choices: []`) when
`stream_options.include_usage` is set, and `data: [DONE]`. A failure after the response has
started can no longer change the status, so it is sent as an `error` event, which the SDK raises.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from ..data.formats import chat_role
from ..models.generate import Completion, Delta, Sampling, TokenLogprob
from ..monitor.usage import CLIENT_CLOSED
from ..store.database import new_id
from ..store.keys import Principal
from . import stored
from .deps import DB, Caller
from .engine import Engine, Target
from .errors import APIError, bad_request, failed_midstream, json_type, unsupported
from .metadata import check_metadata
from .models import resolve_model
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatRequest,
    CompletionChoice,
    CompletionRequest,
    SamplingParams,
    TextCompletion,
    Usage,
)

FINGERPRINT = "tuneforge"
MAX_N = 16
DEFAULT_CHAT_MAX_TOKENS = 1024  # OpenAI's default is "up to the context"; a bound keeps CPUs answering
DEFAULT_COMPLETION_MAX_TOKENS = 16  # the legacy endpoint's documented default


def samplings(req: SamplingParams, max_tokens: int | None, default_max: int, prompt_tokens: int,
               context: int, copies: int = 1, names: tuple[str, str] = ("max_tokens", "messages"),
               vocab_size: int | None = None) -> list[Sampling]:
    """Check the sampling parameters (400 with the parameter named, as OpenAI answers) and build
    one Sampling per choice; choice i of a seeded request uses seed+i, so choices differ but repeat.
    `names`: what the request calls its token limit and its prompt (the Responses API:
    max_output_tokens, input); `vocab_size`: the model's, which logit_bias's token ids must be below."""
    max_name, prompt_name = names
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N}, got {n}", param="n", code="invalid_value")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0 <= temperature <= 2:
        raise bad_request(f"temperature must be between 0 and 2, got {temperature}", param="temperature",
                          code="invalid_value")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise bad_request(f"top_p must be greater than 0 and at most 1, got {top_p}", param="top_p",
                          code="invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise bad_request("stop takes at most 4 sequences", param="stop", code="invalid_value")
    penalties = {}
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(req, name) or 0.0
        if not -2 <= value <= 2:
            raise bad_request(f"{name} must be between -2 and 2, got {value}", param=name, code="invalid_value")
        penalties[name] = value
    if req.seed is not None and not -2**63 <= req.seed < 2**63:
        # OpenAI's seed is an int64; torch's generator takes no more (a larger one was a 500)
        raise bad_request(f"seed must be a 64-bit integer (from {-2**63} to {2**63 - 1}), got {req.seed}",
                          param="seed", code="invalid_value")
    bias = _logit_bias(req.logit_bias, vocab_size)
    top = _logprobs(req)
    room = context - prompt_tokens
    if room < 1:
        raise bad_request(f"This model's maximum context length is {context} tokens; the prompt has "
                          f"{prompt_tokens}.", param=prompt_name, code="context_length_exceeded")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{max_name} must be at least 1, got {max_tokens}", param=max_name, code="invalid_value")
    if max_tokens is not None and max_tokens > room:
        raise bad_request(f"This model's maximum context length is {context} tokens. You requested "
                          f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for "
                          "the completion).", param=max_name, code="context_length_exceeded")
    limit = max_tokens if max_tokens is not None else min(default_max, room)
    seeds = [None if req.seed is None else req.seed + i for i in range(n * copies)]
    return [Sampling(max_tokens=limit, temperature=temperature, top_p=top_p, stop=stop or None, seed=sd,
                     logit_bias=bias, logprobs=top, **penalties) for sd in seeds]


def _logprobs(req: SamplingParams) -> int | None:
    """How many alternatives each answer token's log-probability comes with; None: no log-probabilities.
    Chat: logprobs true, top_logprobs 0-20; legacy completions: logprobs 0-5 (OpenAI's limits)."""
    if isinstance(req, ChatRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true", param="top_logprobs", code="invalid_value")
        top, limit, name = (req.top_logprobs or 0) if req.logprobs else None, 20, "top_logprobs"
    else:
        top, limit, name = (None if req.logprobs is None else int(req.logprobs)), 5, "logprobs"
    return checked_top(top, limit, name)


def checked_top(top: int | None, limit: int, name: str) -> int | None:
    """A number of alternatives per answer token within OpenAI's limit for parameter `name` (chat and
    the Responses API 20, legacy completions 5); a 400 naming it otherwise."""
    if top is not None and not 0 <= top <= limit:
        raise bad_request(f"{name} must be between 0 and {limit}, got {top}", param=name, code="invalid_value")
    return top


def chat_logprobs(tokens: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's choice.logprobs of a chat answer (or of a streamed chunk's tokens)."""
    if tokens is None:
        return None
    entry = lambda t: {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}  # noqa: E731
    return {"content": [entry(t) | {"top_logprobs": [entry(a) for a in t.top]} for t in tokens], "refusal": None}


def _completion_logprobs(tokens: list[TokenLogprob] | None, offset: int) -> dict | None:
    """The legacy completions' choice.logprobs: parallel lists, text offsets from the choice's start."""
    if tokens is None:
        return None
    offsets, before = [], b""
    for t in tokens:  # where each token starts in the text: the characters its predecessors complete
        offsets.append(offset + len(before.decode("utf-8", errors="ignore")))
        before += t.bytes
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{a.token: a.logprob for a in t.top} for t in tokens], "text_offset": offsets}


def _logit_bias(bias: dict[str, float] | None, vocab_size: int | None) -> dict[int, float] | None:
    """OpenAI's logit_bias - token id (a string, as JSON keys are) -> a bias from -100 to 100 - checked
    against the model's vocabulary."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not key.isdigit() or (vocab_size is not None and int(key) >= vocab_size):
            raise bad_request(f"Invalid key in 'logit_bias': {key}. Keys are token ids from 0 to {(vocab_size or 1) - 1}.",
                              param="logit_bias", code="invalid_value")
        if not -100 <= value <= 100:
            raise bad_request(f"Invalid value in 'logit_bias' for token {key}: {value}. Biases are from -100 to 100.",
                              param="logit_bias", code="invalid_value")
        out[int(key)] = float(value)
    return out


def refuse_unsupported(req: ChatRequest | CompletionRequest) -> None:
    """OpenAI parameters this server does not implement, refused by name unless they ask for what it
    does anyway (plain text, no tool forced, one candidate): ignoring them would change the answer."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          param="stream_options", code="invalid_value")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise unsupported("suffix (insertion) is", "suffix")
        if req.best_of not in (None, 1):
            raise unsupported("best_of other than 1 is", "best_of")
        return
    if (req.response_format or {}).get("type", "text") != "text":
        raise unsupported("response_format other than 'text' (JSON mode, structured output) is", "response_format")
    check_tool_choice(req.tool_choice, req.tools)
    if req.tool_choice not in (None, "auto", "none"):
        raise unsupported("tool_choice other than 'auto' or 'none' is", "tool_choice")
    if req.functions or req.function_call not in (None, "auto", "none"):
        raise unsupported("functions and function_call (deprecated; use tools) are",
                          "functions" if req.functions else "function_call")
    if req.modalities not in (None, ["text"]):
        raise unsupported("modalities other than ['text'] are", "modalities")
    for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"):
        if getattr(req, name) is not None:
            raise unsupported(f"{name} is", name)


def check_tool_choice(tool_choice, tools: list | None) -> None:
    """OpenAI refuses a tool_choice - even "auto" or "none" - where the request gives no tools."""
    if tool_choice is not None and not tools:
        raise bad_request("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                          param="tool_choice", code="invalid_value")


def empty_array(where: str) -> APIError:
    """OpenAI's 400 for an array that must hold something (content parts, tool calls)."""
    return bad_request(f"Invalid '{where}': empty array. Expected an array with minimum length 1, but got an empty "
                       "array instead.", param=where, code="empty_array")


def _chat_messages(req: ChatRequest) -> list[dict[str, Any]]:
    if not req.messages:
        raise bad_request("messages must contain at least one message", param="messages", code="invalid_value")
    out, calls = [], set()  # the ids of the tool calls made so far, which a tool message answers
    for i, m in enumerate(req.messages):
        _check_message(m, f"messages[{i}]", calls)
        calls |= {c.get("id") for c in m.tool_calls or []}
        out.append({"role": chat_role(m.role), "content": m.content, **({"tool_calls": m.tool_calls} if m.tool_calls else {})})
    return out


TEXT_PARTS = {"text", "refusal"}  # what a text model reads; images, audio and files it cannot


def _check_message(m, where: str, calls: set) -> None:
    """OpenAI's rules for one message, 400 with the field named: content is required (an assistant
    message may instead call tools) and is no empty list of parts, tool calls are well-formed, a tool
    message answers a tool call made before it, and content parts are text - an image or audio part
    is refused, not dropped from the prompt unseen."""
    if m.content == []:
        raise empty_array(f"{where}.content")
    if m.tool_calls is not None:
        _check_tool_calls(m.tool_calls, f"{where}.tool_calls")
    if m.content is None and not (m.role == "assistant" and (m.tool_calls or m.model_extra.get("function_call"))):
        raise bad_request(f"Missing required parameter: '{where}.content'.", param=f"{where}.content",
                          code="missing_required_parameter")
    for j, part in enumerate(m.content if isinstance(m.content, list) else []):
        kind = part.get("type")
        if kind not in TEXT_PARTS or not isinstance(part.get(kind), str):
            what = f"{kind!r} content parts are" if kind not in TEXT_PARTS else f"a {kind!r} part without its {kind!r} string is"
            raise APIError(400, f"{what} not supported: this model reads text only", param=f"{where}.content[{j}]",
                           code="unsupported_content" if kind not in TEXT_PARTS else "invalid_value")
    if m.role == "tool":
        if not m.tool_call_id:
            raise bad_request(f"Missing required parameter: '{where}.tool_call_id'.", param=f"{where}.tool_call_id",
                              code="missing_required_parameter")
        if m.tool_call_id not in calls:
            raise bad_request(f"Invalid parameter: messages with role 'tool' must be a response to a preceding message "
                              f"with 'tool_calls' (no tool call with id {m.tool_call_id!r} before {where}).",
                              param=f"{where}.tool_call_id", code="invalid_value")


def _check_tool_calls(calls: list[dict], where: str) -> None:
    """An assistant message's tool calls as OpenAI requires them, a 400 naming the field otherwise:
    each an id, type "function" and a function with a name and its arguments as a JSON string - what
    a tool message answers (by the id) and what the chat template is given."""
    if not calls:
        raise empty_array(where)
    for k, call in enumerate(calls):
        at = f"{where}[{k}]"
        _need(call, "id", f"{at}.id", str)
        _need(call, "type", f"{at}.type", str)
        if call["type"] != "function":
            raise bad_request(f"Invalid value for '{at}.type': only 'function' tool calls are supported, got "
                              f"{call['type']!r}.", param=f"{at}.type", code="invalid_value")
        _need(call, "function", f"{at}.function", dict)
        for name in ("name", "arguments"):
            _need(call["function"], name, f"{at}.function.{name}", str)


def _need(holder: dict, key: str, where: str, kind: type) -> None:
    """holder[key] is there and a `kind` (str or dict), or a 400 naming `where`."""
    value = holder.get(key)
    if value is None:
        raise bad_request(f"Missing required parameter: '{where}'.", param=where, code="missing_required_parameter")
    if not isinstance(value, kind):
        raise bad_request(f"Invalid type for '{where}': expected {json_type(kind())}, but got {json_type(value)} "
                          "instead.", param=where, code="invalid_type")


def _check_tools(tools: list[dict] | None) -> None:
    """Each tool as OpenAI requires it, a 400 naming the field otherwise: a function with a name (what
    the chat template is given, and what a call in the answer must name)."""
    for i, tool in enumerate(tools or []):
        if tool.get("type") != "function":
            raise bad_request(f"Invalid value for 'tools[{i}].type': only 'function' tools are supported.",
                              param=f"tools[{i}].type", code="invalid_value")
        fn = tool.get("function")
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise bad_request(f"Missing required parameter: 'tools[{i}].function.name'.",
                              param=f"tools[{i}].function.name", code="missing_required_parameter")


def tool_calls_in(text: str, tools: list[dict] | None, ids: str) -> list[dict] | None:
    """The answer as OpenAI tool calls, when it is one: a JSON list of calls of declared tools, the
    form tuneforge trains an assistant's tool calls in (data.render gives them to the chat template as
    that JSON text). The calls are named `{ids}_0`, `{ids}_1`, ... - not the model's own ids, which
    repeat its training data's; made from the completion's id and the choice, so that the answer sent
    and the one kept (store: true, built again from the same completion) name the same calls."""
    if not tools or not text.lstrip().startswith("["):
        return None
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    names = {t["function"]["name"] for t in tools}  # (_check_tools)
    if not (isinstance(calls, list) and calls and all(_is_call(c, names) for c in calls)):
        return None
    return [{"id": f"{ids}_{k}", "type": "function", "function": {
        "name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments", "{}"))}}
        for k, c in enumerate(calls)]


def _answer_calls(text: str, tools: list[dict] | None, cid: str, index: int, parallel: bool) -> list[dict] | None:
    """Choice `index`'s answer as tool calls (tool_calls_in), at most one of them when the request said
    `parallel_tool_calls: false` - OpenAI's function-calling guide: false "ensures exactly zero or one
    tool is called". The first is kept, in the model's own order: nothing here can stop a model that
    writes several, only cut; a client asking for one call at a time asks again with its result."""
    calls = tool_calls_in(text, tools, _call_ids(cid, index))
    return calls[:1] if calls and not parallel else calls


def _call_ids(cid: str, index: int) -> str:
    """What a chat completion's choice names its tool calls after (tool_calls_in)."""
    return f"call_{cid.removeprefix('chatcmpl-')}_{index}"


def _is_call(call, names: set) -> bool:
    fn = call.get("function") if isinstance(call, dict) else None
    return isinstance(fn, dict) and call.get("type", "function") == "function" and fn.get("name") in names


def _arguments(arguments) -> str:
    """A call's arguments as OpenAI sends them: a JSON string (a model may write the object itself)."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _choice(cid: str, index: int, r: Completion, tools: list[dict] | None, parallel: bool) -> ChatChoice:
    calls = _answer_calls(r.text, tools, cid, index, parallel)
    if calls:
        return ChatChoice(index=index, message=AssistantMessage(content=None, tool_calls=calls),
                          finish_reason="tool_calls", logprobs=chat_logprobs(r.logprobs))
    return ChatChoice(index=index, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason,
                      logprobs=chat_logprobs(r.logprobs))


def _usage(prompt_tokens: int, results: list[Completion]) -> Usage:
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def note_usage(request: Request, model: str, usage: Usage | None) -> None:
    request.state.model = model
    if usage is not None:
        request.state.prompt_tokens = usage.prompt_tokens
        request.state.completion_tokens = usage.completion_tokens


def measure_prompt(engine: Engine, target: Target, prompt: list[dict] | str, param: str = "messages",
                   tools=None) -> tuple[int, int]:
    """(prompt tokens, the model's context length); `param`: what the request calls its prompt."""
    try:
        return engine.prompt_length(target, prompt, tools)
    except APIError:
        raise
    except Exception as err:  # e.g. a chat template that rejects this sequence of roles
        raise bad_request(f"The model's chat template cannot render these messages: {err}", param=param,
                          code="invalid_messages") from err


POLL_SECONDS = 0.25  # how often a non-streamed answer checks that its client is still connected


def complete_while_connected(engine: Engine, target: Target, work, request: Request, prompt_tokens: int,
                             tools=None) -> list[Completion] | None:
    """engine.complete, cancelled if the client hangs up before the answers are done (then None, and
    the request's usage is the prompt and the tokens made so far, as for a dropped stream).

    A client that gives up - the SDK's timeout, a closed connection - would otherwise keep the engine,
    and every request queued behind its lock, busy up to max_tokens for an answer nobody reads (QA:
    669 s for an abandoned 5,000-token answer; with the SDK's retries, several times over). The
    request's worker thread waits here for the engine (which generates on its own torch thread),
    while a watcher thread asks the event loop every POLL_SECONDS whether the client is still there."""
    cancel, done = threading.Event(), threading.Event()
    token = anyio.from_thread.run_sync(anyio.lowlevel.current_token)  # the watcher's way back to the loop

    def watch() -> None:
        while not done.wait(POLL_SECONDS):
            try:
                gone = anyio.from_thread.run(request.is_disconnected, token=token)
            except Exception:  # the event loop has ended (the server stops): nothing left to watch
                return
            if gone:
                cancel.set()  # the answer in progress ends after its current token, the lock is let go
                return

    threading.Thread(target=watch, daemon=True, name="tuneforge-client-watch").start()
    try:
        results = engine.complete(target, work, cancel, tools)
    finally:
        done.set()
    if cancel.is_set():
        note_usage(request, request.state.model, _usage(prompt_tokens, results))
        return None
    return results


# --- handlers ---------------------------------------------------------------------------------------


def chat_completion(request: Request, db: Session, caller: Principal, req: ChatRequest):
    engine: Engine = request.app.state.engine
    request.state.model = req.model
    target = resolve_model(db, caller, req.model)
    refuse_unsupported(req)
    messages = _chat_messages(req)
    _check_tools(req.tools)
    prompt_tokens, context = measure_prompt(engine, target, messages, tools=req.tools)
    calls_wanted = req.tools if req.tool_choice != "none" else None  # answers that may be tool calls
    parallel = req.parallel_tool_calls is not False  # (OpenAI's default: true)
    # max_completion_tokens (max_tokens' successor) wins when given - 0 included, which is an error, not
    # "no limit" - and a refusal names the one the request used
    limit_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    choices = samplings(req, getattr(req, limit_name), DEFAULT_CHAT_MAX_TOKENS, prompt_tokens, context,
                        names=(limit_name, "messages"),
                        vocab_size=engine.vocab_size(target) if req.logit_bias else None)
    work = [(messages, s) for s in choices]
    check_metadata(req.metadata)
    cid, created = "chatcmpl-" + new_id("", 29), int(time.time())

    def completion(results: list[Completion]) -> ChatCompletion:
        return ChatCompletion(
            id=cid, created=created, model=req.model, system_fingerprint=FINGERPRINT,
            usage=_usage(prompt_tokens, results),
            choices=[_choice(cid, i, r, calls_wanted, parallel) for i, r in enumerate(results)],
        )

    def keep(results: list[Completion], db: Session) -> None:
        stored.keep(db, caller.project, req, completion(results))

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        finished = (lambda results: in_own_session(request, keep, results)) if req.store else None
        return _sse(request, _chat_chunks(engine, target, work, cid, created, req.model, prompt_tokens,
                                          include_usage, request, finished, req.tools, calls_wanted, parallel))
    results = complete_while_connected(engine, target, work, request, prompt_tokens, req.tools)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    done = completion(results)
    note_usage(request, req.model, done.usage)
    if req.store:
        keep(results, db)
    return done


def in_own_session(request: Request, fn, *args) -> None:
    # a streamed response outlives the request's database session
    with request.app.state.sessions() as db:
        fn(*args, db)


def text_completion(request: Request, db: Session, caller: Principal, req: CompletionRequest):
    engine: Engine = request.app.state.engine
    request.state.model = req.model
    target = resolve_model(db, caller, req.model)
    prompts = _prompts(req.prompt, engine.vocab_size(target))
    refuse_unsupported(req)
    lengths = [measure_prompt(engine, target, p) for p in prompts]
    prompt_tokens, context = max(n for n, _ in lengths), lengths[0][1]
    per_prompt = samplings(req, req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, prompt_tokens, context,
                           vocab_size=engine.vocab_size(target) if req.logit_bias else None)
    work = [(p, s) for p in prompts for s in per_prompt]
    # what each choice starts with under echo: its prompt's text (token ids decoded)
    echoes = [p if isinstance(p, str) else engine.decode(target, p) for p, _ in work] if req.echo else None
    total_prompt = sum(n for n, _ in lengths)
    cid, created = "cmpl-" + new_id("", 29), int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(request, _text_chunks(engine, target, work, cid, created, req.model, total_prompt,
                                          include_usage, echoes, request))
    results = complete_while_connected(engine, target, work, request, total_prompt)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    usage = _usage(total_prompt, results)
    note_usage(request, req.model, usage)
    return TextCompletion(
        id=cid, created=created, model=req.model, system_fingerprint=FINGERPRINT, usage=usage,
        choices=[CompletionChoice(index=i, text=(echoes[i] if echoes else "") + r.text, finish_reason=r.finish_reason,
                                  logprobs=_completion_logprobs(r.logprobs, len(echoes[i]) if echoes else 0))
                 for i, r in enumerate(results)],
    )


def _prompts(prompt, vocab_size: int) -> list[str | list[int]]:
    """A legacy prompt as OpenAI takes it - a string, strings, token ids, or lists of token ids - as
    one item per prompt."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts or any(not p for p in prompts):
        raise bad_request("prompt must be a non-empty string or list of token ids, or a list of them", param="prompt",
                          code="invalid_value")
    nested = not (isinstance(prompt, list) and prompt and isinstance(prompt[0], int))
    for i, p in enumerate(prompts):
        for j, t in enumerate(p if isinstance(p, list) else []):
            if not 0 <= t < vocab_size:
                where = f"prompt[{i}][{j}]" if nested else f"prompt[{j}]"
                raise bad_request(f"{where} is token id {t}, outside this model's vocabulary (0 to {vocab_size - 1})",
                                  param="prompt", code="invalid_value")
    return prompts


# --- streaming --------------------------------------------------------------------------------------


class _EventStream(StreamingResponse):
    """A StreamingResponse that closes its body however it ends. When the client hangs up, Starlette
    stops reading the body mid-way; closed here at once (each layer closing the one it reads, down
    to `generated`), the generation behind it is cancelled instead of running on to max_tokens."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def sse_response(body: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events, unbuffered by proxies (nginx's X-Accel-Buffering) and never cached."""
    return _EventStream(body, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(request: Request, chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async with aclosing(chunks):
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return sse_response(body())


async def generated(engine: Engine, target: Target, work, request: Request, prompt_tokens: int,
                    tools=None) -> AsyncIterator[tuple[int, Delta | Completion]]:
    """(choice index, Delta | Completion) as the engine makes them. Closed before the end (the client
    hung up), it cancels the generation, and the request's usage is the prompt and the answer tokens
    made so far - what the cores spent."""
    cancel = threading.Event()
    q = engine.stream(target, work, cancel, tools)
    streamed: dict[int, int] = {}  # answer tokens by choice
    ended = failed = False
    try:
        while True:
            item = await anyio.to_thread.run_sync(q.get)
            if item is None:
                ended = True
                return
            if isinstance(item, Exception):
                failed = True  # not abandoned: the caller reports it (failed_midstream)
                raise item
            i, piece = item
            streamed[i] = piece.completion_tokens if isinstance(piece, Completion) else streamed.get(i, 0) + piece.tokens
            yield item
    finally:
        cancel.set()
        if not (ended or failed):  # closed before its end: the client hung up (logged as a whole answer's is)
            request.state.status = CLIENT_CLOSED
        if not ended:
            note_usage(request, request.state.model, Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(
                streamed.values()), total_tokens=prompt_tokens + sum(streamed.values())))


async def _chat_chunks(engine, target, work, cid, created, model, prompt_tokens, include_usage, request, finished,
                       tools=None, calls_wanted=None, parallel=True):
    """The chat answer's chunks. An answer that may be a tool call (`calls_wanted`: tools were given
    and tool_choice is not "none") is sent whole at its end, as text or as tool calls (one at most
    unless `parallel`, _answer_calls): streamed as it came, the JSON of a call would reach the client
    as text first."""
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": FINGERPRINT}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return base | {"choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]} | extra

    results: dict[int, Completion] = {}  # by choice index
    started: set[int] = set()
    try:
        async with aclosing(generated(engine, target, work, request, prompt_tokens, tools)) as pieces:
            async for i, item in pieces:
                if i not in started:
                    started.add(i)
                    yield chunk(i, {"role": "assistant", "content": "", "refusal": None})
                if isinstance(item, Completion):
                    results[i] = item
                    if calls_wanted:
                        calls = _answer_calls(item.text, calls_wanted, cid, i, parallel)
                        if calls:
                            yield chunk(i, {"tool_calls": [{"index": k} | c for k, c in enumerate(calls)]})
                            yield chunk(i, {}, "tool_calls")
                            continue
                        yield chunk(i, {"content": item.text}, logprobs=chat_logprobs(item.logprobs))
                    yield chunk(i, {}, item.finish_reason)
                elif item.text and not calls_wanted:
                    yield chunk(i, {"content": item.text}, logprobs=chat_logprobs(item.logprobs))
    except Exception as err:
        yield failed_midstream(request, err)
        return
    done = [results[i] for i in sorted(results)]
    usage = _usage(prompt_tokens, done)
    note_usage(request, model, usage)
    if finished is not None:  # the caller keeps it (store=true)
        await anyio.to_thread.run_sync(finished, done)
    if include_usage:
        yield base | {"choices": [], "usage": usage.model_dump()}


async def _text_chunks(engine, target, work, cid, created, model, prompt_tokens, include_usage, echoes, request):
    base = {"id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": FINGERPRINT}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return base | {"choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]} | extra

    results: list[Completion] = []
    started: set[int] = set()
    offsets: dict[int, int] = {}  # by choice: where its next piece starts (text_offset of logprobs)
    try:
        async with aclosing(generated(engine, target, work, request, prompt_tokens)) as pieces:
            async for i, item in pieces:
                if echoes and i not in started:
                    started.add(i)
                    yield chunk(i, echoes[i])
                if isinstance(item, Completion):
                    results.append(item)
                    yield chunk(i, "", item.finish_reason)
                elif item.text:
                    at = offsets.get(i, len(echoes[i]) if echoes else 0)
                    offsets[i] = at + len(item.text)
                    yield chunk(i, item.text, logprobs=_completion_logprobs(item.logprobs, at))
    except Exception as err:
        yield failed_midstream(request, err)
        return
    usage = _usage(prompt_tokens, results)
    note_usage(request, model, usage)
    if include_usage:
        yield base | {"choices": [], "usage": usage.model_dump()}


# --- routes -----------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", tags=["chat"])


@router.post("/chat/completions", response_model=ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}})
def chat_route(req: ChatRequest, request: Request, db: DB, caller: Caller):
    return chat_completion(request, db, caller, req)


@router.post("/completions", response_model=TextCompletion,
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}})
def completions_route(req: CompletionRequest, request: Request, db: DB, caller: Caller):
    return text_completion(request, db, caller, req)
