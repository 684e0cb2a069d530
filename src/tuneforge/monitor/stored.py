"""Served traffic back into training data: stored chat completions, or kept responses, as chat JSONL.

A completion the server kept (`store: true`, serve.stored) holds the request's messages, its tools
and the answers. Each becomes one training example - the messages as sent, then the first answer as
the assistant turn, and the request's tools as the example's `tools` - in OpenAI's chat format, so
`tuneforge data validate` and a new fine-tuning job read it like any other file. Filter by model and
metadata to keep what was reviewed as good.
A kept response (the Responses API keeps them unless `store: false`, serve.responses) becomes its
whole conversation: instructions as the system message, earlier turns (previous_response_id), the
input, and the answer. Either way, only answers that ended by themselves (finish_reason "stop", a
completed response): a cut one would teach cutting off.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from ..data.formats import chat_role
from ..store.database import ResponseRow, StoredCompletionRow, metadata_matches


def _kept(s: Session, table, project: str, model: str | None, metadata: dict[str, str] | None, meta_of,
          newest_first: bool = False) -> list:
    """Rows of `table` (stored completions or kept responses) of `project`, of `model` and with every
    `metadata` pair (read from a row by `meta_of`) if given, in the order they were kept."""
    stmt = select(table).where(table.project == project)
    if model:
        stmt = stmt.where(table.model == model)
    by_seq = table.seq.desc() if newest_first else table.seq.asc()
    return [r for r in s.scalars(stmt.order_by(by_seq)).all() if metadata_matches(meta_of(r), metadata or {})]


def find_stored(s: Session, project: str, model: str | None = None, metadata: dict[str, str] | None = None,
                newest_first: bool = False) -> list[StoredCompletionRow]:
    """The stored completions of `project`, of `model` and with every `metadata` pair if given, in
    the order they were stored (the API's list and this module's export both read them so)."""
    return _kept(s, StoredCompletionRow, project, model, metadata, lambda r: r.meta, newest_first)


def training_examples(s: Session, project: str = "default", model: str | None = None,
                      metadata: dict[str, str] | None = None) -> list[dict]:
    """One {"messages": [...], "tools"?: [...]} per stored completion of `project` (oldest first) that
    matches and whose answer ended by itself."""
    out = []
    for row in find_stored(s, project, model, metadata):
        answer = _answer(row.completion["choices"][0])
        if answer is not None:
            out.append(_example(row, answer))
    return out


def _example(row: StoredCompletionRow, answer: dict) -> dict:
    """The training example of a stored completion: with the request's tools, which the chat template
    showed the model when it answered - without them an answer calling one would teach calling a tool
    the prompt never named. (Kept since serve.stored keeps them; an older row has none.)"""
    example = {"messages": [_training_message(m) for m in row.messages] + [answer]}
    tools = row.completion.get("tools")
    return (example | {"tools": tools}) if tools else example


def why_no_examples(s: Session, project: str, model: str | None = None, metadata: dict[str, str] | None = None) -> str:
    """Why training_examples() found nothing: no stored completion matches, or every one that does was
    cut at max_tokens (or is empty) - which a list of the matches does not show."""
    n = len(find_stored(s, project, model, metadata))
    if not n:
        return "No stored chat completion matches (store: true, with the model and metadata asked)"
    return (f"{n} stored chat completion(s) match, but none ended by itself: an answer cut at max_tokens (or an "
            "empty one) would teach the model to stop mid-answer. Ask again with a larger max_tokens")


def _answer(choice: dict) -> dict | None:
    """A stored choice as the assistant message to learn: its text, or its tool calls (which the
    server returns from answers in the form training gives them, serve.chat.tool_calls_in)."""
    message, finish = choice["message"], choice["finish_reason"]
    if finish == "tool_calls" and message.get("tool_calls"):
        return {"role": "assistant", "content": None, "tool_calls": message["tool_calls"]}
    if finish != "stop":
        return None  # cut off by max_tokens: it would teach cutting off
    if not (message.get("content") or "").strip():
        return None  # nothing to learn from (an empty or refused answer), and the validator agrees
    return {"role": "assistant", "content": message["content"]}


def quality(s: Session, project: str | None = None, since: float | None = None) -> list[dict]:
    """The quality signals of the kept answers, per project and model (of one project if given): how
    many completions were stored, how they were rated (their metadata `rating`: the dashboard writes
    good / bad, a client may write its own values) and how many were cut at max_tokens - an answer
    that runs out of room is a model, or a limit, to look at. In the order they were first kept.
    Counted by the database (the Monitor asks every 30 s; the completions' JSON stays there)."""
    row = StoredCompletionRow
    rating = row.meta["rating"].as_string()
    cut = case((row.completion[("choices", 0, "finish_reason")].as_string() == "length", 1), else_=0)
    stmt = select(row.project, row.model, rating, func.count(), func.sum(cut), func.min(row.seq))
    if project is not None:
        stmt = stmt.where(row.project == project)
    if since is not None:
        stmt = stmt.where(row.created_at >= since)
    groups: dict[tuple[str, str], dict] = {}
    for proj, model, rated, n, n_cut, _ in sorted(s.execute(stmt.group_by(row.project, row.model, rating)).all(),
                                                 key=lambda g: g[-1]):
        group = groups.setdefault((proj, model), {"project": proj, "model": model, "kept": 0, "ratings": {},
                                                  "cut_at_max_tokens": 0})
        group["kept"] += n
        group["cut_at_max_tokens"] += n_cut
        if rated is not None:
            group["ratings"][rated] = n
    return list(groups.values())


def find_responses(s: Session, project: str, model: str | None = None,
                   metadata: dict[str, str] | None = None) -> list[ResponseRow]:
    """The kept responses of `project`, of `model` and with every `metadata` pair if given, oldest first."""
    return _kept(s, ResponseRow, project, model, metadata, lambda r: r.response.get("metadata"))


def response_conversation(row: ResponseRow) -> tuple[list[dict], str]:
    """A kept response's turns before its answer (earlier turns, then its own input, roles as sent)
    and the answer's text; its instructions are not among them."""
    said = [{"role": item["role"], "content": "".join(part["text"] for part in item["content"])} for item in row.input]
    answer = "".join(part["text"] for message in row.response["output"] for part in message["content"])
    return [*row.context, *said], answer


def response_examples(s: Session, project: str = "default", model: str | None = None,
                      metadata: dict[str, str] | None = None) -> list[dict]:
    """One {"messages": [...]} per completed kept response of `project` (oldest first) that matches."""
    out = []
    for row in find_responses(s, project, model, metadata):
        turns, answer = response_conversation(row)
        if row.response["status"] != "completed" or not answer.strip():
            continue
        instructions = row.response.get("instructions")
        system = [{"role": "system", "content": instructions}] if instructions else []
        turns = [{"role": chat_role(m["role"]), "content": m["content"]} for m in turns]
        out.append({"messages": system + turns + [{"role": "assistant", "content": answer}]})
    return out


def _training_message(m: dict) -> dict:
    return {"role": chat_role(m["role"]), **{k: v for k, v in m.items() if k not in ("role", "id")}}


def jsonl_bytes(examples: list[dict]) -> bytes:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples).encode()


def write_jsonl(examples: list[dict], path: Path) -> None:
    path.write_bytes(jsonl_bytes(examples))
