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
again only when a model evicted from the LRU is asked for. Where that copy would take more than half
the free memory (a large base on a small GPU), the adapter is served as PEFT's layers instead: slower,
but a few MB.

A lock serialises generation (one model answers at a time on these cores): a request holds it from
choosing its model until its last token. All torch work - loading, merging, generating - runs on one
thread of the engine's (models.generate.TorchThread: with a second thread running torch ops, every
op of a decoding step pays a thread wake-up, ~1.6x the time of an answer on 2 cores); the lock
holder hands it over and waits, so the torch thread never waits on the lock. Either kind of answer
can be cancelled (serve.chat does when the client hangs up), so a client that disconnects cannot
leave the lock held: a streamed answer is read, under the lock, by a thread of its own, which hands
its deltas to the HTTP response through a queue.
"""

from __future__ import annotations

import copy
import logging
import queue as queue_mod
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from ..models.adapters import ADAPTER_FILE
from ..models.generate import Completion, Sampling, TorchThread, complete, input_ids, stream
from ..models.load import load_base
from ..train.device import inference_dtype, pick_device

log = logging.getLogger("tuneforge.serve")


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's, or the machine's available memory (/proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62  # not Linux: no figure to go by, merge


@dataclass(frozen=True)
class Target:
    """What a model name resolves to: a base model, optionally with a fine-tuned weights folder."""

    base: str
    weights: Path | None = None


class Engine:
    def __init__(self, max_models: int = 2, merge_fraction: float = 0.5):
        self.max_models = max_models
        self.merge_fraction = merge_fraction  # of the free memory a merged copy may take
        self.device = pick_device()  # the GPU when there is one (training workers are other processes)
        self.dtype = inference_dtype(self.device)
        self._bases: dict[str, tuple[object, object]] = {}  # base name -> (model, tokenizer)
        self._tuned: OrderedDict[str, object] = OrderedDict()  # weights folder -> model (LRU)
        self._lock = threading.Lock()
        self._torch = TorchThread()  # every torch call of the engine (see the module's docstring)
        # An engine dropped (a server app gone, as tests make many) takes its thread along: an idle
        # thread keeps its OpenMP team, and the teams of idle threads slow every other one's ops.
        # Not at exit: a torch thread ending while the interpreter shuts down aborts the process
        # ("terminate called without an active exception"); a daemon thread left waiting does not.
        weakref.finalize(self, self._torch.close).atexit = False

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
            while len(self._tuned) >= self.max_models:  # room first: a merged copy is large
                self._tuned.popitem(last=False)
            if (weights / ADAPTER_FILE).exists():
                self._tuned[key] = self._adapted(base, weights)
            else:
                from transformers import AutoModelForCausalLM

                full = AutoModelForCausalLM.from_pretrained(weights, dtype=self.dtype)
                self._tuned[key] = full.to(self.device).eval()
        self._tuned.move_to_end(key)
        return self._tuned[key], tokenizer

    @torch.no_grad()
    def _adapted(self, base: str, weights: Path):
        """The base with the adapter at `weights`: merged into copies of the layers it targets when
        they fit in `merge_fraction` of the free memory, else as PEFT's adapter layers (slower to
        decode, a few MB). Either way the base's own modules and tensors are left as they are: the
        adapter goes into a copy of the module tree whose tensors are the base's."""
        model, _ = self._base(base)
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        adapted = PeftModel.from_pretrained(copy.deepcopy(model, shared), str(weights), torch_device=str(self.device))
        tuner = adapted.base_model
        layers = [tuner.model.get_submodule(name).base_layer for name in tuner.targeted_module_names]
        size = sum(layer.weight.nbytes for layer in layers)
        if size > self.merge_fraction * free_memory(self.device):
            log.info("serving %s unmerged: merging would copy %d MB", weights, size >> 20)
            return adapted.eval()
        for layer in layers:  # merging writes into the weights: into copies, not the base's
            layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        return adapted.merge_and_unload().eval()

    @contextmanager
    def use(self, target: Target):
        """(model, tokenizer) for `target`, exclusively, for the duration of the block."""
        with self._lock:
            yield self._torch.run(self._resolve, target)

    def _resolve(self, target: Target):
        if target.weights is None:
            return self._base(target.base)
        return self._fine_tuned(target.base, target.weights)

    def forget(self, weights: Path) -> None:
        """Unload a deleted model."""
        with self._lock:
            self._tuned.pop(str(Path(weights).resolve()), None)

    def prompt_length(self, target: Target, prompt: list[dict] | str, tools=None) -> tuple[int, int]:
        """(prompt tokens, model context length): lets a request be refused before any output."""
        with self._lock:
            model, tokenizer = self._torch.run(self._base, target.base)
            n = len(input_ids(tokenizer, prompt, tools))
            return n, int(getattr(model.config, "max_position_embeddings", 2048))

    def decode(self, target: Target, ids: list[int]) -> str:
        """The text of token ids (a legacy completion's echoed token prompt)."""
        with self._lock:
            return self._torch.run(self._base, target.base)[1].decode(ids)

    def vocab_size(self, target: Target) -> int:
        """How many token ids the model scores (what logit_bias may name)."""
        with self._lock:
            model, _ = self._torch.run(self._base, target.base)
            return int(model.config.vocab_size)

    def complete(self, target: Target, requests: list[tuple[list[dict] | str, Sampling]],
                 cancel: threading.Event | None = None, tools=None) -> list[Completion]:
        """One finished answer per (prompt, sampling): a chat (messages, with the request's `tools`) or
        a raw text prompt. Setting `cancel` ends the answer in progress after its current token; the
        rest are not begun."""
        with self.use(target) as (model, tokenizer):
            done = []
            for p, s in requests:
                if cancel is not None and cancel.is_set():
                    break
                done.append(self._torch.run(complete, model, tokenizer, p, s, tools=tools, cancel=cancel))
            return done

    def stream(self, target: Target, requests: list[tuple[list[dict] | str, Sampling]],
               cancel: threading.Event | None = None, tools=None) -> queue_mod.Queue:
        """Start generating in a thread. The queue yields (request index, Delta | Completion),
        then None at the end, or the exception that stopped it. Setting `cancel` (the reader has
        gone) ends the answer in progress after its current token, and the rest are not begun."""
        out: queue_mod.Queue = queue_mod.Queue()

        def produce():
            try:
                with self.use(target) as (model, tokenizer):
                    for i, (p, s) in enumerate(requests):
                        if cancel is not None and cancel.is_set():
                            break
                        # always drained: generation ends before the lock is released
                        for item in stream(model, tokenizer, p, s, tools=tools, cancel=cancel, start=self._torch.submit):
                            out.put((i, item))
                out.put(None)
            except Exception as err:  # handed to the response, which reports it in the stream
                out.put(err)

        threading.Thread(target=produce, daemon=True, name="tuneforge-generate").start()
        return out

