"""Inference for the server: one loaded base model shared by many LoRA adapters.

A fine-tuned model here is a LoRA adapter of a few MB on top of a base model of hundreds. Loading
the base once and switching adapters (peft's multi-adapter `load_adapter`/`set_adapter`) makes every
`ft:` model callable at once and cheap: a request for an adapter never reloads the base. Recently
used adapters stay loaded (an LRU, `max_adapters`); the base model itself is answered with the
adapters disabled.

One model object serves every request, and which adapter is active is state on that object, so a
lock serialises generation: a request holds it from choosing its adapter until its last token.
Streaming generation runs in its own thread (which holds the lock) and hands deltas to the HTTP
response through a queue, so a client that disconnects cannot leave the lock held.
"""

from __future__ import annotations

import hashlib
import logging
import queue as queue_mod
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel

from ..models.adapters import ADAPTER_FILE
from ..models.generate import Completion, Sampling, complete, input_ids, stream
from ..models.load import load_base
from ..train.device import inference_dtype

log = logging.getLogger("tuneforge.serve")


@dataclass(frozen=True)
class Target:
    """What a model name resolves to: a base model, optionally with a fine-tuned weights folder."""

    base: str
    weights: Path | None = None


class Engine:
    def __init__(self, max_adapters: int = 8, max_full_models: int = 1):
        self.max_adapters = max_adapters
        self.max_full_models = max_full_models
        self._bases: dict[str, tuple[object, object]] = {}  # base name -> (model or PeftModel, tokenizer)
        self._adapters: dict[str, OrderedDict[str, str]] = {}  # base -> weights path -> adapter name (LRU)
        self._full: OrderedDict[str, object] = OrderedDict()  # full fine-tunes are whole models
        self._lock = threading.Lock()

    # --- model selection (call with the lock held) ---------------------------------------------------

    def _base(self, name: str):
        if name not in self._bases:
            model, tokenizer = load_base(name, inference_dtype())
            model.eval()
            self._bases[name] = (model, tokenizer)
        return self._bases[name]

    def _with_adapter(self, base: str, weights: Path):
        model, tokenizer = self._base(base)
        lru = self._adapters.setdefault(base, OrderedDict())
        key = str(weights.resolve())
        if key in lru:
            lru.move_to_end(key)
            model.set_adapter(lru[key])
            return model, tokenizer
        name = "a" + hashlib.sha1(key.encode()).hexdigest()[:12]  # adapter names become module keys
        if isinstance(model, PeftModel):
            model.load_adapter(str(weights), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(weights), adapter_name=name)
            model.eval()
            self._bases[base] = (model, tokenizer)
        model.set_adapter(name)
        lru[key] = name
        while len(lru) > self.max_adapters:
            _, old = lru.popitem(last=False)
            model.delete_adapter(old)
        model.set_adapter(name)
        return model, tokenizer

    def _full_model(self, base: str, weights: Path):
        from transformers import AutoModelForCausalLM

        _, tokenizer = self._base(base)
        key = str(weights.resolve())
        if key not in self._full:
            self._full[key] = AutoModelForCausalLM.from_pretrained(weights, dtype=inference_dtype()).eval()
            while len(self._full) > self.max_full_models:
                self._full.popitem(last=False)
        self._full.move_to_end(key)
        return self._full[key], tokenizer

    @contextmanager
    def use(self, target: Target):
        """(model, tokenizer) for `target`, exclusively, for the duration of the block."""
        with self._lock:
            if target.weights is None:
                model, tokenizer = self._base(target.base)
                if isinstance(model, PeftModel):
                    with model.disable_adapter():
                        yield model, tokenizer
                else:
                    yield model, tokenizer
            elif (target.weights / ADAPTER_FILE).exists():
                yield self._with_adapter(target.base, target.weights)
            else:
                yield self._full_model(target.base, target.weights)

    def forget(self, weights: Path) -> None:
        """Unload a deleted model's adapter."""
        key = str(Path(weights).resolve())
        with self._lock:
            for base, lru in self._adapters.items():
                if key in lru:
                    name = lru.pop(key)
                    try:
                        self._bases[base][0].delete_adapter(name)
                    except Exception:  # only memory is at stake; the model is already gone from the API
                        log.warning("could not unload adapter %s", name, exc_info=True)
            self._full.pop(key, None)

    def prompt_length(self, target: Target, prompt: list[dict] | str) -> tuple[int, int]:
        """(prompt tokens, model context length): lets a request be refused before any output."""
        with self._lock:
            model, tokenizer = self._base(target.base)
            n = len(input_ids(tokenizer, prompt))
            return n, int(getattr(model.config, "max_position_embeddings", 2048))

    def complete(self, target: Target, requests: list[tuple[list[dict] | str, Sampling]]) -> list[Completion]:
        """One finished answer per (prompt, sampling): a chat (messages) or a raw text prompt."""
        with self.use(target) as (model, tokenizer):
            return [complete(model, tokenizer, p, s) for p, s in requests]

    def stream(self, target: Target, requests: list[tuple[list[dict] | str, Sampling]]) -> queue_mod.Queue:
        """Start generating in a thread. The queue yields (request index, str delta | Completion),
        then None at the end, or the exception that stopped it."""
        out: queue_mod.Queue = queue_mod.Queue()

        def produce():
            try:
                with self.use(target) as (model, tokenizer):
                    for i, (p, s) in enumerate(requests):
                        for item in stream(model, tokenizer, p, s):  # always drained: generation ends before the lock is released
                            out.put((i, item))
                out.put(None)
            except Exception as err:  # handed to the response, which reports it in the stream
                out.put(err)

        threading.Thread(target=produce, daemon=True, name="tuneforge-generate").start()
        return out

