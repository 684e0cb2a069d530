"""Text generation for chat: one call for a whole answer, one generator for streamed deltas.

Shared by `tuneforge chat`, `tuneforge eval` and the server, so every surface decodes the same way.
The prompt goes through the model's own chat template (data.render.prompt_ids), exactly as training
saw it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import TextIteratorStreamer

from ..data.render import prompt_ids


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


def _generate_kwargs(model, tokenizer, ids: list[int], s: Sampling) -> dict:
    if s.seed is not None:
        torch.manual_seed(s.seed)
    kwargs = dict(
        input_ids=torch.tensor([ids], device=next(model.parameters()).device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=next(model.parameters()).device),
        max_new_tokens=s.max_tokens,
        do_sample=s.temperature > 0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if s.temperature > 0:
        kwargs |= {"temperature": s.temperature, "top_p": s.top_p, "top_k": 0}
    if s.stop:
        kwargs |= {"stop_strings": s.stop, "tokenizer": tokenizer}
    return kwargs


def input_ids(tokenizer, prompt: list[dict] | str, tools=None) -> list[int]:
    """Chat messages go through the chat template; a plain string (legacy completions) is used as is."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt_ids(tokenizer, prompt, tools)


def _finish_reason(tokenizer, out: list[int], s: Sampling) -> str:
    ended = bool(out) and out[-1] == tokenizer.eos_token_id
    _, stopped = _cut_at_stop(tokenizer.decode(out, skip_special_tokens=True), s.stop)
    return "stop" if ended or stopped or len(out) < s.max_tokens else "length"


def _cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    for s in stop or []:
        if s and s in text:
            return text[: text.index(s)], True
    return text, False


@torch.no_grad()
def complete(model, tokenizer, prompt: list[dict] | str, sampling: Sampling | None = None, tools=None) -> Completion:
    """The whole answer to chat messages (or to a raw prompt string)."""
    s = sampling or Sampling()
    ids = input_ids(tokenizer, prompt, tools)
    out = model.generate(**_generate_kwargs(model, tokenizer, ids, s))[0][len(ids) :].tolist()
    text, _ = _cut_at_stop(tokenizer.decode(out, skip_special_tokens=True), s.stop)
    return Completion(text, _finish_reason(tokenizer, out, s), len(ids), len(out))


def stream(model, tokenizer, prompt: list[dict] | str, sampling: Sampling | None = None, tools=None) -> Iterator[str]:
    """Yield text deltas as they are generated; the final item is a Completion with the totals."""
    s = sampling or Sampling()
    ids = input_ids(tokenizer, prompt, tools)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict = {}

    def run():
        with torch.no_grad():
            result["ids"] = model.generate(**_generate_kwargs(model, tokenizer, ids, s), streamer=streamer)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    sent = ""
    for piece in streamer:
        text, stopped = _cut_at_stop(sent + piece, s.stop)
        if len(text) > len(sent):
            yield text[len(sent) :]
            sent = text
        if stopped:
            break
    worker.join()
    out = result["ids"][0][len(ids) :].tolist()
    yield Completion(sent, _finish_reason(tokenizer, out, s), len(ids), len(out))
