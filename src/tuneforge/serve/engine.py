"""Inference for the server: base models loaded once, fine-tuned models answered at the base's speed.

A LoRA fine-tune is an adapter of a few MB on top of a base model of hundreds. Applied as PEFT's
separate low-rank layers, it costs a 135M model a third of its decoding speed on a CPU (26.7 -> 18.1
tokens/s: decoding one token at a time is ~200 small extra ops per token), and wrapping the base in
PEFT slows the base's own answers by 13%. So each fine-tuned model that is asked is made once as a
copy of its base with the adapter folded into the weights (PEFT's merge, always from the untouched
base, so nothing drifts): it answers exactly as fast as the base, and shares every tensor the adapter
does not change (embeddings, norms) with it. The base model itself is never modified. Recently asked
fine-tuned models stay loaded (an LRU of `max_models`, full fine-tunes included); the cost of a
merged copy is the size of the layers the adapter targets (~210 MB in bf16 for SmolLM2-135M), paid
again only when a model evicted from the LRU is asked for.

A lock serialises generation (one model answers at a time on these cores): a request holds it from
choosing its model until its last token. Streaming generation runs in its own thread (which holds the
lock) and hands deltas to the HTTP response through a queue, so a client that disconnects cannot
leave the lock held.
"""

from __future__ import annotations

import copy
import logging
import queue as queue_mod
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from ..models.adapters import ADAPTER_FILE
from ..models.generate import Completion, Sampling, complete, input_ids, stream
from ..models.load import load_base
from ..train.device import inference_dtype, pick_device

log = logging.getLogger("tuneforge.serve")


@dataclass(frozen=True)
class Target:
    """What a model name resolves to: a base model, optionally with a fine-tuned weights folder."""

    base: str
    weights: Path | None = None


class Engine:
    def __init__(self, max_models: int = 2):
        self.max_models = max_models
        self.device = pick_device()  # the GPU when there is one (training workers are other processes)
        self.dtype = inference_dtype(self.device)
        self._bases: dict[str, tuple[object, object]] = {}  # base name -> (model, tokenizer)
        self._tuned: OrderedDict[str, object] = OrderedDict()  # weights folder -> model (LRU)
        self._lock = threading.Lock()

    # --- model selection (call with the lock held) ---------------------------------------------------

    def _base(self, name: str):
        if name not in self._bases:
            model, tokenizer = load_base(name, self.dtype)
            model.to(self.device).eval()
            self._bases[name] = (model, tokenizer)
        return self._bases[name]

    def _fine_tuned(self, base: str, weights: Path):
        _, tokenizer = self._base(base)
        key = str(weights.resolve())
        if key not in self._tuned:
            if (weights / ADAPTER_FILE).exists():
                self._tuned[key] = self._merged(base, weights)
            else:
                from transformers import AutoModelForCausalLM

                full = AutoModelForCausalLM.from_pretrained(weights, dtype=self.dtype)
                self._tuned[key] = full.to(self.device).eval()
            while len(self._tuned) > self.max_models:
                self._tuned.popitem(last=False)
        self._tuned.move_to_end(key)
        return self._tuned[key], tokenizer

    @torch.no_grad()
    def _merged(self, base: str, weights: Path):
        """A copy of the base with the adapter at `weights` folded in; the tensors the adapter leaves
        alone are the base's own, not copies."""
        model, _ = self._base(base)
        adapted = PeftModel.from_pretrained(copy.deepcopy(model), str(weights), torch_device=str(self.device))
        targeted = set(adapted.base_model.targeted_module_names)
        merged = adapted.merge_and_unload().eval()
        originals = dict(model.named_parameters())
        for name, p in merged.named_parameters():  # (an adapter's modules_to_save are changed, and kept)
            if name.rpartition(".")[0] not in targeted and torch.equal(p, originals[name]):
                p.data = originals[name].data
        return merged

    @contextmanager
    def use(self, target: Target):
        """(model, tokenizer) for `target`, exclusively, for the duration of the block."""
        with self._lock:
            if target.weights is None:
                yield self._base(target.base)
            else:
                yield self._fine_tuned(target.base, target.weights)

    def forget(self, weights: Path) -> None:
        """Unload a deleted model."""
        with self._lock:
            self._tuned.pop(str(Path(weights).resolve()), None)

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

