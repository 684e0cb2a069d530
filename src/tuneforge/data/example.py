"""The one representation of a training example, whatever file format it came from.

Chat JSONL, prompt/completion, ###Human/###Assistant text and classification rows all become chat
`messages` (OpenAI's shape: dicts with role/content and, for assistant turns, an optional weight), so
one renderer and one loss mask serve them all. Raw text for continued pre-training stays text; DPO
pairs keep their prompt and the two candidate answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["chat", "text", "preference"]


@dataclass
class Example:
    kind: Kind
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat; for preference: the prompt
    tools: list[dict[str, Any]] | None = None
    text: str | None = None  # kind == "text"
    chosen: list[dict[str, Any]] | None = None  # kind == "preference": preferred assistant turn(s)
    rejected: list[dict[str, Any]] | None = None  # kind == "preference": non-preferred turn(s)
    line: int | None = None  # 1-based line in the source file, for messages that point at it

    def assistant_messages(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("role") == "assistant"]
