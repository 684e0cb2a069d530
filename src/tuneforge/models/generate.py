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
from transformers import LogitsProcessor, LogitsProcessorList, TextIteratorStreamer

from ..data.render import prompt_ids


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    frequency_penalty: float = 0.0  # OpenAI's: minus penalty x times a token was generated so far
    presence_penalty: float = 0.0  # minus penalty once a token has been generated at all
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (-100 bans, 100 forces)
    logprobs: int | None = None  # None: none; n: each answer token's log-probability and its n most likely


@dataclass
class TokenLogprob:
    """One answer token: its text, its log-probability under the model (before sampling's temperature,
    top_p, penalties and bias: the model's own distribution), the `Sampling.logprobs` most likely
    tokens at its place with theirs."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # the tokens of `text`, when Sampling.logprobs asked


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
    if s.frequency_penalty or s.presence_penalty or s.logit_bias:
        kwargs["logits_processor"] = LogitsProcessorList([_OpenAIAdjustments(len(ids), s)])
    return kwargs


class _OpenAIAdjustments(LogitsProcessor):
    """OpenAI's frequency and presence penalties and logit_bias, on the model's logits before any
    sampling: logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0), counting
    the tokens generated so far (not the prompt's), then + logit_bias[t]."""

    def __init__(self, prompt_length: int, s: Sampling):
        self.start, self.frequency, self.presence = prompt_length, s.frequency_penalty, s.presence_penalty
        self.bias = s.logit_bias or {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.start :]
        if (self.frequency or self.presence) and generated.shape[1]:
            counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            scores = scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
        if self.bias:
            ids = torch.tensor(list(self.bias), device=scores.device)
            scores = scores.index_add(1, ids, torch.tensor(list(self.bias.values()), dtype=scores.dtype,
                                                           device=scores.device).expand(scores.shape[0], -1))
        return scores


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
    kwargs = _generate_kwargs(model, tokenizer, ids, s)
    if s.logprobs is None:
        out = model.generate(**kwargs)[0][len(ids) :].tolist()
    else:  # the raw logits of every step come back with the tokens
        generated = model.generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        out = generated.sequences[0][len(ids) :].tolist()
    text, _ = _cut_at_stop(tokenizer.decode(out, skip_special_tokens=True), s.stop)
    logprobs = None if s.logprobs is None else _token_logprobs(tokenizer, out, generated.logits, s.logprobs, text)
    return Completion(text, _finish_reason(tokenizer, out, s), len(ids), len(out), logprobs)


def _token_logprobs(tokenizer, out: list[int], logits, top: int, text: str) -> list[TokenLogprob]:
    """TokenLogprob of each generated token that makes up `text` (what a stop string cut off and
    the end-of-turn token are not part of the answer)."""
    entries, shown = [], ""
    for token_id, step in zip(out, logits):
        if len(shown) >= len(text) or token_id in tokenizer.all_special_ids:
            break
        lp = torch.log_softmax(step[0].float(), dim=-1)
        piece = tokenizer.decode([token_id])
        best = torch.topk(lp, top) if top else None
        alternatives = [] if best is None else [
            (tokenizer.decode([int(i)]), float(v)) for v, i in zip(best.values, best.indices)]
        entries.append(TokenLogprob(piece, float(lp[token_id]), alternatives))
        shown += piece
    return entries


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
