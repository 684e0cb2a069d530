"""Example -> token ids + labels, with the loss only where the model should learn.

The base model's own chat template renders the conversation. To know which tokens belong to the
assistant, we render growing prefixes of the conversation: the text a template adds between "prompt
up to this assistant turn, with the generation prompt" and "conversation including this turn" is
what the model must produce at inference time - the answer and its end-of-turn token, which is what
teaches the tuned model to stop - followed by the template's separator before the next turn (ChatML's
"\n"), which generation never reaches and so is context, not learned. Each piece is tokenised on its own, which is also how
inference sees it (the prompt is tokenised, then tokens are generated after it).

Text from the data is text: a message that quotes a special token ("<|im_end|>" in a question about
ChatML, or a user's "hi<|im_end|><|im_start|>system..." at the server) is tokenised as the plain
characters, as OpenAI does, never as the control token; only the template's own control tokens are
control tokens (_Conversation).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import threading
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


# transformers applies split_special_tokens by setting it on the tokenizer's shared Rust object and then
# encoding: two threads on one tokenizer (the server's upload reports share theirs) could otherwise
# swap each other's setting in between and turn quoted text into control tokens after all.
_ENCODING = threading.Lock()


def encode(tokenizer, text: str, split_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`; with split_special_tokens, special-token strings in it are plain text.
    Every caller that tokenises in a process with threads goes through here (see _ENCODING)."""
    if not text:
        return []
    with _ENCODING:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]


def _control_tokens(tokenizer) -> tuple[tuple[str, bool, bool], ...]:
    """(text, lstrip, rstrip) of the added tokens a tokenizer makes out of their text wherever it occurs:
    the special ones, which are what split_special_tokens leaves as text (it still makes non-special ones).

    A non-special added token quoted in a message stays that token: the tokenizer declares it vocabulary,
    not control, no tokenizer call spells it as plain text, and a template may read it in content (Qwen3's
    splits an answer at "</think>"), which a sentinel would hide from it. No turn can be forged with one
    where the template's turn markers are special (ChatML's, SmolLM2's and Llama 3's are); what a message
    can still carry is a marker such as Qwen2.5's non-special "<tool_call>"."""
    return tuple((t.content, t.lstrip, t.rstrip) for t in tokenizer.added_tokens_decoder.values() if t.special)


@functools.lru_cache(maxsize=8)
def _patterns(controls: tuple[tuple[str, bool, bool], ...]) -> tuple[re.Pattern, re.Pattern]:
    """(their text anywhere, where the tokenizer finds them in a rendered text). Longest first, as the
    tokenizer matches; the second takes in the whitespace a token set to lstrip/rstrip absorbs, and
    captures the token itself."""
    controls = sorted(controls, key=lambda t: len(t[0]), reverse=True)
    quoted = "|".join(re.escape(text) for text, _, _ in controls)
    found = "|".join(r"\s*" * lstrip + f"({re.escape(text)})" + r"\s*" * rstrip for text, lstrip, rstrip in controls)
    return re.compile(quoted or "(?!)"), re.compile(found or "(?!)")


def _strings(obj) -> list[str]:
    """Every string in messages or tools (nested dicts and lists; not the keys)."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [s for x in obj for s in _strings(x)]
    return []


def _swap(obj, pattern: re.Pattern, sentinels: dict[str, str]):
    """`obj` (nested dicts and lists) with each match of `pattern` in its strings replaced by its sentinel."""
    if isinstance(obj, str):
        return pattern.sub(lambda m: sentinels[m.group()], obj)
    if isinstance(obj, dict):
        return {k: _swap(v, pattern, sentinels) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_swap(v, pattern, sentinels) for v in obj]
    return obj


def _unused_characters(text: str, n: int) -> list[str]:
    """n private-use characters (plane 15) that `text` does not contain: sentinels the data cannot forge."""
    used = set(text)
    free = list(itertools.islice((c for c in map(chr, range(0xF0000, 0xFFFFE)) if c not in used), n))
    if len(free) < n:
        raise ValueError("the conversation uses every private-use character: no sentinel is left to keep its "
                         "special-token text as text")
    return free


class _Conversation:
    """A conversation as its chat template renders it, encoded so that text from the data stays text.

    Tokenising a rendered template makes every special-token string in it the control token, one a
    message quotes included. Where the messages or tools quote any, each occurrence is swapped for a
    sentinel (a private-use character absent from the conversation) before rendering, so the control
    tokens in the rendered text are the template's own: encode() cuts the text there and encodes the
    text between with split_special_tokens, the quotes put back, so they become plain text tokens in
    their context. Conversations that quote none (nearly all) render and encode exactly as before.
    """

    def __init__(self, tokenizer, messages: list[dict[str, Any]], tools=None):
        self.tokenizer, self.messages, self.tools = tokenizer, _template_ready(messages), tools
        self._controls = _control_tokens(tokenizer)
        quoted, _ = _patterns(self._controls)
        text = "\0".join(_strings([self.messages, tools]))
        found = sorted(set(quoted.findall(text)))
        sentinels = dict(zip(found, _unused_characters(text, len(found)))) if found else {}
        self._restore = {ord(c): token for token, c in sentinels.items()}  # for str.translate
        self._messages = _swap(self.messages, quoted, sentinels) if found else self.messages
        self._tools = _swap(tools, quoted, sentinels) if found else tools

    def text(self, n: int | None, add_generation_prompt: bool) -> str:
        """The rendering of the first n messages (all: None), sentinels where the data quotes a special token."""
        text = _chat_text(self.tokenizer, self._messages[:n], self._tools, add_generation_prompt)
        if self._restore and text.translate(self._restore) != _chat_text(
                self.tokenizer, self.messages[:n], self.tools, add_generation_prompt):
            raise ValueError("the chat template alters message text, so the special-token text quoted in it "
                             "cannot be kept as text")
        return text

    def learned_end(self, answer: str) -> int:
        """Where the part of an answer's rendering that the model writes ends: after its last control
        token (its end of turn) when only whitespace follows, the template's separator before the next
        turn (ChatML's "\n" after <|im_end|>). Generation stops at the end-of-turn token, so the tuned
        model never writes that separator, and training on it would only pad loss and accuracy with a
        token that is always right."""
        _, controls = _patterns(self._controls)
        ends = [m.end() for m in controls.finditer(answer)]
        return ends[-1] if ends and not answer[ends[-1] :].strip() else len(answer)

    def encode(self, text: str) -> list[int]:
        """Token ids of (a piece of) a rendering from text()."""
        if not self._restore:
            return encode(self.tokenizer, text)
        _, controls = _patterns(self._controls)
        ids, start = [], 0
        for m in controls.finditer(text):
            ids += encode(self.tokenizer, text[start : m.start()].translate(self._restore), split_special_tokens=True)
            ids.append(self.tokenizer.convert_tokens_to_ids(m.group(m.lastindex)))
            start = m.end()
        return ids + encode(self.tokenizer, text[start:].translate(self._restore), split_special_tokens=True)


def prompt_ids(tokenizer, messages: list[dict[str, Any]], tools=None) -> list[int]:
    """Token ids of a conversation followed by the assistant generation prompt (for inference)."""
    chat = _Conversation(tokenizer, messages, tools)
    return chat.encode(chat.text(None, True))


def render_chat(example: Example, tokenizer) -> Rendered:
    chat = _Conversation(tokenizer, example.messages, example.tools)
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # template text already turned into tokens
    for i, raw in enumerate(example.messages):
        if raw["role"] != "assistant":
            continue
        prefix = chat.text(i, True)
        full = chat.text(i + 1, False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ValueError("chat template does not render conversations as growing prefixes")
        context = chat.encode(prefix[len(done) :])
        answer_text = full[len(prefix) :]
        end = chat.learned_end(answer_text)
        answer, after = chat.encode(answer_text[:end]), chat.encode(answer_text[end:])
        learn = raw.get("weight", 1) != 0
        ids += context + answer + after
        labels += [IGNORE] * len(context) + (answer if learn else [IGNORE] * len(answer)) + [IGNORE] * len(after)
        done = full
    tail = chat.encode(chat.text(None, False)[len(done) :])
    ids += tail
    labels += [IGNORE] * len(tail)
    return Rendered(ids, labels)


def render_text(example: Example, tokenizer) -> Rendered:
    """A text for continued pre-training: all of it is data, so special-token text in it stays text."""
    ids = encode(tokenizer, example.text or "", split_special_tokens=True) + [tokenizer.eos_token_id]
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
    """`r` as consecutive, non-overlapping pieces of at most max_length tokens (`window_spans`). A
    piece starts a sequence of its own with no BOS added, as a whole text does (render_text adds none
    either)."""
    return [Rendered(r.input_ids[a:b], r.labels[a:b]) for a, b in window_spans(len(r.input_ids), max_length)]


def window_spans(n_tokens: int, max_length: int) -> list[tuple[int, int]]:
    """(start, end) of the windows a text of n_tokens trains as: consecutive, at most max_length
    tokens each. A last piece of a single token is left out: a window learns each token from the ones
    before it in the window, so alone it would be a sequence that trains nothing (and counts towards
    the 10-example minimum). data.stats counts from these spans too."""
    spans = [(a, min(a + max_length, n_tokens)) for a in range(0, n_tokens, max_length)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < 2:
        spans.pop()
    return spans
