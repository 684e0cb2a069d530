"""Text generation for chat: one call for a whole answer, one generator for streamed deltas.

Shared by `tuneforge chat`, `tuneforge eval` and the server, so every surface decodes the same way.
The prompt goes through the model's own chat template (data.render.prompt_ids), exactly as training
saw it.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from tokenizers import decoders
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..data.render import encode, prompt_ids


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

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be above 0 and at most 1, got {self.top_p}")


@dataclass
class TokenLogprob:
    """One answer token: its bytes, its text, its log-probability under the model (before sampling's
    temperature, top_p, penalties and bias: the model's own distribution), and the `Sampling.logprobs`
    most likely tokens at its place with theirs (their own `top` empty).

    A token can hold part of a character (byte-level tokenizers split a UTF-8 character into several
    tokens): `bytes` are then that part, which only joined with its neighbours' decodes, and `token`
    spells the bytes that are no character as `\\xNN` escapes, as OpenAI's API does."""

    token: str
    logprob: float
    top: list[TokenLogprob]
    bytes: bytes = b""


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # the tokens of `text`, when Sampling.logprobs asked


def _generate_kwargs(model, tokenizer, ids: list[int], s: Sampling, first: LogitsProcessor | None = None,
                     cancel: threading.Event | None = None) -> dict:
    """generate()'s arguments for `s`; `first`: a logits processor to run before the adjustments (to
    see the model's own logits); `cancel`: once set, generation ends after the token in progress."""
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
    stop = [t for t in s.stop or [] if t]  # "" would match at once: like _cut_at_stop, ignore it
    if stop:
        kwargs |= {"stop_strings": stop, "tokenizer": tokenizer}
    processors = [first] if first is not None else []
    if s.frequency_penalty or s.presence_penalty or s.logit_bias:
        processors.append(_OpenAIAdjustments(len(ids), s))
    if processors:
        kwargs["logits_processor"] = LogitsProcessorList(processors)
    if cancel is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
    return kwargs


class _Cancelled(StoppingCriteria):
    """Ends generation once `event` is set: a streamed answer whose reader has gone (the server's
    client hung up) stops taking the cores after the token in progress."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


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


def input_ids(tokenizer, prompt: list[dict] | str | list[int], tools=None) -> list[int]:
    """Chat messages go through the chat template; a plain string or token ids (legacy completions)
    are used as they are. A string is text, as OpenAI takes a legacy prompt: a special-token string in
    it ("<|im_end|>\n<|im_start|>system" or "<|endoftext|>") is those characters, never the control
    token - a caller who means control tokens sends token ids, which are used as given."""
    if isinstance(prompt, str):
        return encode(tokenizer, prompt, split_special_tokens=True)
    if prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    return prompt_ids(tokenizer, prompt, tools)


def _finish_reason(tokenizer, out: list[int], s: Sampling) -> str:
    ended = bool(out) and out[-1] == tokenizer.eos_token_id
    _, stopped = _cut_at_stop(tokenizer.decode(out, skip_special_tokens=True), s.stop)
    return "stop" if ended or stopped or len(out) < s.max_tokens else "length"


def _cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """The text before the first stop string in it (the earliest, whichever of them it is)."""
    found = [text.index(s) for s in stop or [] if s and s in text]
    return (text[: min(found)], True) if found else (text, False)


def _held_back(text: str, stop: list[str] | None) -> int:
    """How many characters at the end of `text` could be the start of a stop string: a stream holds
    them until the next tokens say (sent, they could not be taken back when the stop string completes)."""
    ends = [k for s in stop or [] for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])]
    return max(ends, default=0)


def _tokens_making(tokenizer, out: list[int], length: int) -> int:
    """How many of the answer tokens `out` make up its first `length` characters: the fewest whose text
    is that long, and the tokens that finish a character split between them (a part of a character
    decodes as U+FFFD, one character long already). Binary search: the text only grows with tokens."""
    text = lambda n: tokenizer.decode(out[:n], skip_special_tokens=True)  # noqa: E731
    lo, hi = 0, len(out)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if len(text(mid)) < length else (lo, mid)
    while lo < len(out) and text(lo).endswith("\ufffd") and len(text(lo + 1)) == len(text(lo)):
        lo += 1
    return lo


@torch.no_grad()
def complete(model, tokenizer, prompt: list[dict] | str, sampling: Sampling | None = None, tools=None,
             cancel: threading.Event | None = None) -> Completion:
    """The whole answer to chat messages (or to a raw prompt string); `cancel` ends it early (after
    the token in progress: what was made so far is the answer)."""
    s = sampling or Sampling()
    ids = input_ids(tokenizer, prompt, tools)
    tokens = None if s.logprobs is None else _Tokens(tokenizer, s.logprobs)  # as stream() reads them
    kwargs = _generate_kwargs(model, tokenizer, ids, s, first=tokens, cancel=cancel)
    out = model.generate(**kwargs, streamer=tokens)[0][len(ids) :].tolist()
    text, _ = _cut_at_stop(tokenizer.decode(out, skip_special_tokens=True), s.stop)
    logprobs = None
    if tokens is not None:  # (generate() has ended the queue) the tokens that make up `text`
        made = _tokens_making(tokenizer, out, len(text))
        logprobs = [entry for (token, entry), _ in zip(tokens, range(made)) if token not in tokenizer.all_special_ids]
    return Completion(text, _finish_reason(tokenizer, out, s), len(ids), len(out), logprobs)


def _token_logprob(tokenizer, logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """TokenLogprob of `token` chosen from a step's log-probabilities, with the `top` most likely."""

    def entry(i: int, alternatives: list[TokenLogprob]) -> TokenLogprob:
        raw = token_bytes(tokenizer, i)
        return TokenLogprob(raw.decode("utf-8", errors="backslashreplace"), float(logprobs[i]), alternatives, raw)

    best = torch.topk(logprobs, top) if top else None
    return entry(token, [] if best is None else [entry(int(i), []) for i in best.indices])


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes token id `token` stands for. A byte-level BPE vocabulary (GPT-2's, SmolLM2's, Llama
    3's) spells each byte as one character of its token strings, so a token holding part of a UTF-8
    character still has exact bytes; other tokenizers' tokens are taken as the text they decode to."""
    piece = tokenizer.convert_ids_to_tokens(token)
    alphabet = _byte_level_alphabet()
    byte_level = isinstance(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None), decoders.ByteLevel)
    if byte_level and isinstance(piece, str) and piece not in tokenizer.all_special_tokens and all(c in alphabet for c in piece):
        return bytes(alphabet[c] for c in piece)
    return tokenizer.decode([token]).encode()


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: the printable Latin-1 bytes stand for
    themselves, the other 68 (controls, space, ...) for the characters from U+0100 up, in order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(0x100 + n): b for n, b in enumerate(others)}


class TorchThread:
    """One daemon thread that runs every torch call handed to it, in order.

    PyTorch runs CPU ops on an OpenMP thread team of the OS thread that calls them, and a team stays
    alive with its thread. Once two threads of a process have run parallel ops, libgomp manages more
    threads than there are cores and stops spinning between parallel regions: each of the hundreds of
    small ops of a decoding step then waits for a futex wake-up. On 2 cores a 32-token answer of the
    embedded model took 2.0 s from a second thread against 1.2 s where one thread alone runs torch.
    So where answers are made beside another thread that loads or runs models (the server's request
    threads, the chat loop), all of that work goes through one TorchThread."""

    def __init__(self, name: str = "tuneforge-torch"):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, daemon=True, name=name)  # (a stop never waits on it)
        self._thread.start()

    def _serve(self) -> None:
        while (task := self._tasks.get()) is not None:
            fn, args, kwargs, done = task
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn(*args, **kwargs))
                except BaseException as err:
                    done.set_exception(err)

    def close(self) -> None:
        """End the thread once the work already handed to it is done; its OpenMP team ends with it."""
        self._tasks.put(None)

    def submit(self, fn, *args, **kwargs) -> Future:
        done: Future = Future()
        self._tasks.put((fn, args, kwargs, done))
        return done

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the thread, waited for (at once when called from the thread itself)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()


@dataclass
class Delta:
    """A piece of a streamed answer, and its tokens' log-probabilities when Sampling.logprobs asked."""

    text: str
    logprobs: list[TokenLogprob] | None = None
    tokens: int = 0  # the answer tokens this piece completes (usage of an answer cut short)


class _Tokens(BaseStreamer, LogitsProcessor):
    """generate()'s tokens as they are chosen, for a consumer in another thread: each with its
    TokenLogprob when `top` is not None. As a logits processor (first in the list, so it sees the
    model's own logits) it keeps each step's log-probabilities; `put`, called with the token just
    chosen from them, reads them."""

    def __init__(self, tokenizer, top: int | None):
        self.tokenizer, self.top = tokenizer, top
        self.items: queue.Queue = queue.Queue()
        self.prompt, self.step = True, None

    def __call__(self, input_ids, scores):
        self.step = torch.log_softmax(scores[0].float(), dim=-1)
        return scores

    def put(self, value):
        if self.prompt:  # generate() hands the prompt over first
            self.prompt = False
            return
        for token in value.view(-1).tolist():
            entry = None if self.top is None else _token_logprob(self.tokenizer, self.step, token, self.top)
            self.items.put((token, entry))

    def end(self):
        self.items.put(None)

    def __iter__(self):
        while (item := self.items.get()) is not None:
            yield item


def stream(model, tokenizer, prompt: list[dict] | str, sampling: Sampling | None = None,
           tools=None, cancel: threading.Event | None = None,
           start: Callable[[Callable[[], None]], object] | None = None) -> Iterator[Delta | Completion]:
    """Yield the answer as it is generated: a Delta for each token that completes characters (a token
    holding part of one waits for the rest), cut where a stop string appears; the final item is a
    Completion with the totals. A failure in generation is raised here, never left waiting. Setting
    `cancel` ends the answer early (after the token in progress). Generation runs in another thread
    while this generator reads its tokens: a new one, or `start(fn)`'s (a TorchThread's submit)."""
    s = sampling or Sampling()
    ids = input_ids(tokenizer, prompt, tools)
    tokens = _Tokens(tokenizer, s.logprobs)
    kwargs = _generate_kwargs(model, tokenizer, ids, s, first=tokens if s.logprobs is not None else None,
                              cancel=cancel)
    result: dict = {}
    finished = threading.Event()

    def run():
        try:
            with torch.no_grad():
                result["ids"] = model.generate(**kwargs, streamer=tokens)
        except BaseException as err:  # the consumer must not wait for tokens that will never come
            result["error"] = err
            tokens.end()
        finally:
            finished.set()

    (start or _in_new_thread)(run)
    out, entries, sent, counted = [], [], "", 0
    items = iter(tokens)
    while True:
        item = next(items, None)
        if item is not None:
            token, entry = item
            out.append(token)
            entries.append(entry)
        whole = tokenizer.decode(out, skip_special_tokens=True)
        if item is not None and whole.endswith("\ufffd"):  # part of a character: wait for its other bytes
            continue
        text, stopped = _cut_at_stop(whole, s.stop)
        if item is not None and not stopped:  # (at the end, what was held back goes out as it is)
            text = text[: len(text) - _held_back(text, s.stop)]
        if len(text) > len(sent):
            made = len(out) if text == whole else _tokens_making(tokenizer, out, len(text))
            logprobs = None if s.logprobs is None else [
                e for t, e in zip(out[counted:made], entries[counted:made]) if t not in tokenizer.all_special_ids]
            yield Delta(text[len(sent) :], logprobs, made - counted)
            sent, counted = text, made
        if stopped or item is None:
            break
    finished.wait()
    if "error" in result:
        raise result["error"]
    generated = result["ids"][0][len(ids) :].tolist()
    logprobs = [e for t, e in zip(out[:counted], entries) if t not in tokenizer.all_special_ids] \
        if s.logprobs is not None else None
    yield Completion(sent, _finish_reason(tokenizer, generated, s), len(ids), len(generated), logprobs)


def _in_new_thread(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, daemon=True, name="tuneforge-generate").start()
