"""Example -> token ids + labels, with the loss only where the model should learn.

The base model's own chat template renders the conversation. To know which tokens belong to the
assistant, we render growing prefixes of the conversation: the text a template adds between "prompt
up to this assistant turn, with the generation prompt" and "conversation including this turn" is
exactly what the model must produce at inference time - the answer and its end-of-turn token, which
is what teaches the tuned model to stop. Each piece is tokenised on its own, which is also how
inference sees it (the prompt is tokenised, then tokens are generated after it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .example import Example

IGNORE = -100  # label value that cross-entropy skips
MAX_LENGTH = 1024  # tokens per sequence unless a run says otherwise; longer chats are truncated, longer
# texts split into windows (render_sequences)


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    truncated: bool = False

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def message_text(message: dict[str, Any]) -> str:
    """A message's content as the chat template sees it: OpenAI content parts joined into their text,
    tool calls (with no content) as their JSON."""
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None and message.get("tool_calls"):
        content = json.dumps(message["tool_calls"], ensure_ascii=False)
    return content or ""


def _template_ready(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat templates want plain string content."""
    return [{"role": m["role"], "content": message_text(m)} for m in messages]


def _chat_text(tokenizer, messages, tools, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def prompt_ids(tokenizer, messages: list[dict[str, Any]], tools=None) -> list[int]:
    """Token ids of a conversation followed by the assistant generation prompt (for inference)."""
    return _encode(tokenizer, _chat_text(tokenizer, _template_ready(messages), tools, True))


def render_chat(example: Example, tokenizer) -> Rendered:
    messages = _template_ready(example.messages)
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # template text already turned into tokens
    for i, raw in enumerate(example.messages):
        if raw["role"] != "assistant":
            continue
        prefix = _chat_text(tokenizer, messages[:i], example.tools, True)
        full = _chat_text(tokenizer, messages[: i + 1], example.tools, False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ValueError("chat template does not render conversations as growing prefixes")
        context = _encode(tokenizer, prefix[len(done) :])
        answer = _encode(tokenizer, full[len(prefix) :])
        learn = raw.get("weight", 1) != 0
        ids += context + answer
        labels += [IGNORE] * len(context) + (answer if learn else [IGNORE] * len(answer))
        done = full
    tail = _encode(tokenizer, _chat_text(tokenizer, messages, example.tools, False)[len(done) :])
    ids += tail
    labels += [IGNORE] * len(tail)
    return Rendered(ids, labels)


def render_text(example: Example, tokenizer) -> Rendered:
    ids = _encode(tokenizer, example.text or "") + [tokenizer.eos_token_id]
    return Rendered(ids, list(ids))


def _truncate(r: Rendered, max_length: int | None) -> Rendered:
    if max_length is not None and len(r.input_ids) > max_length:
        return Rendered(r.input_ids[:max_length], r.labels[:max_length], truncated=True)
    return r


def _context(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A preference pair's prompt: its assistant turns are context, not answers to learn."""
    return [dict(m, weight=0) if m.get("role") == "assistant" else m for m in messages]


def render_preference(example: Example, tokenizer, max_length: int | None = None) -> tuple[Rendered, Rendered]:
    """A preference pair as (prompt + preferred answer, prompt + non-preferred answer), for DPO: the
    labels mark only the answer's tokens, so a sequence's summed label log-probability is the
    probability of that answer given the prompt."""
    prompt = _context(example.messages)
    return tuple(
        _truncate(render_chat(Example("chat", prompt + (answer or []), example.tools), tokenizer), max_length)
        for answer in (example.chosen, example.rejected)
    )


def render_example(example: Example, tokenizer, max_length: int | None = None) -> Rendered:
    """Token ids and labels for one example as one sequence; truncated (and flagged) past max_length.
    Training reads render_sequences, which splits a long text instead.

    Preference pairs train on their chosen answer here (supervised fine-tuning); the DPO objective
    (train.dpo) reads both answers through render_preference.
    """
    if example.kind == "text":
        r = render_text(example, tokenizer)
    elif example.kind == "preference":
        r = render_chat(Example("chat", _context(example.messages) + (example.chosen or []), example.tools), tokenizer)
    else:
        r = render_chat(example, tokenizer)
    return _truncate(r, max_length)


def render_sequences(example: Example, tokenizer, max_length: int | None = None) -> list[Rendered]:
    """The training sequences of one example. A text (continued pre-training) longer than max_length
    becomes consecutive windows of at most max_length tokens, so every token of a long document is
    trained on once, as HF's run_clm and litgpt do; cutting it would drop most of it. Any other
    example is one sequence, truncated as render_example does: a chat cut into pieces would leave
    answers without their prompt."""
    if example.kind != "text" or max_length is None:
        return [render_example(example, tokenizer, max_length)]
    return windows(render_text(example, tokenizer), max_length)


def windows(r: Rendered, max_length: int) -> list[Rendered]:
    """`r` as consecutive, non-overlapping pieces of at most max_length tokens. A piece starts a
    sequence of its own with no BOS added, as a whole text does (render_text adds none either)."""
    return [Rendered(r.input_ids[i : i + max_length], r.labels[i : i + max_length])
            for i in range(0, len(r.input_ids), max_length)]
