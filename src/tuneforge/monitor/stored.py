"""Served traffic back into training data: stored chat completions as chat JSONL.

A completion the server kept (`store: true`, serve.stored) holds the request's messages and the
answers. Each becomes one training example - the messages as sent, then the first answer as the
assistant turn - in OpenAI's chat format, so `tuneforge data validate` and a new fine-tuning job
read it like any other file. Filter by model and metadata to keep what was reviewed as good.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select

from ..store.database import StoredCompletionRow, metadata_matches, session


def training_examples(project: str = "default", model: str | None = None, metadata: dict[str, str] | None = None,
                      database_url: str | None = None) -> list[dict]:
    """One {"messages": [...]} per stored completion of `project` (oldest first) that matches."""
    stmt = select(StoredCompletionRow).where(StoredCompletionRow.project == project)
    if model:
        stmt = stmt.where(StoredCompletionRow.model == model)
    with session(database_url) as s:
        rows = s.scalars(stmt.order_by(StoredCompletionRow.seq)).all()
    out = []
    for row in rows:
        if not metadata_matches(row.meta, metadata or {}):
            continue
        answer = row.completion["choices"][0]["message"].get("content")
        if not (answer or "").strip():
            continue  # nothing to learn from (an empty or refused answer), and the validator agrees
        messages = [_training_message(m) for m in row.messages]
        out.append({"messages": messages + [{"role": "assistant", "content": answer}]})
    return out


def _training_message(m: dict) -> dict:
    # the fine-tuning format knows system/user/assistant/tool; OpenAI's `developer` is the system role
    role = "system" if m["role"] == "developer" else m["role"]
    return {"role": role, **{k: v for k, v in m.items() if k not in ("role", "id")}}


def write_jsonl(examples: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
