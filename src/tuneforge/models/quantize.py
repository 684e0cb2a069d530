"""A frozen base model in 4 bits, for QLoRA: what makes a model too big for this machine trainable.

LoRA leaves the base weights frozen, so they need not be kept in the precision they are trained in -
only multiplied in it. With quantize="nf4" every linear layer of the base keeps its weights as 4-bit
NormalFloat (bitsandbytes; the data type and the quantised block scales - "double quantisation" - of
the QLoRA paper), about 0.55 bytes per parameter instead of 2 in bf16; each product de-quantises
its weight to the compute dtype on the fly. Embeddings, norms and the output layer stay as they
are, and the adapters train in fp32 as ever. The saved adapter is an ordinary PEFT adapter: it is
served (and exported, and evaluated by `tuneforge eval`) on the unquantised base, as QLoRA adapters are.

bitsandbytes is an optional dependency (`pip install 'tuneforge[qlora]'`); it runs on CUDA and, since
0.50, on CPUs.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

Quantize = Literal["nf4"]


def check_quantize(quantize: str | None, method: str) -> None:
    """A ValueError saying what is wrong with asking for `quantize` with training `method`."""
    if quantize is None:
        return
    if quantize != "nf4":
        raise ValueError(f"quantize must be nf4, not {quantize!r}")
    if method != "lora":
        raise ValueError(f"quantize=nf4 keeps the base frozen in 4 bits: it trains LoRA adapters (method lora), "
                         f"not method {method}")


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("quantize=nf4 needs bitsandbytes, which is not installed: pip install 'tuneforge[qlora]'")


def to_nf4(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Store every linear layer of `model` but its output layer in NF4, in place (on the CPU).

    Layer by layer: each fp32 weight, a view of the memory-mapped weights file, is quantised and its
    file pages handed back at once (train.device.drop_file_pages), so loading never holds more than
    one layer's fp32 weight besides the 4-bit ones. transformers' own bitsandbytes loading keeps the
    whole fp32 file resident until it is done - 6.2 GB of peak RSS for a 1B model, where LoRA on its
    bf16 copy peaks at 3.3 GB.
    """
    require_bitsandbytes()
    import bitsandbytes as bnb

    from ..train.device import drop_file_pages, release_free_memory, weights_file_maps

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    mapped = weights_file_maps()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or isinstance(child, bnb.nn.Linear4bit) or child is head:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
            # quantised from the compute dtype, so that is what de-quantising gives back (no cast after)
            layer.weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4", module=layer).to("cpu")
            layer.bias = child.bias
            # Run in eval mode without gradients (a validation pass), a CPU Linear4bit re-lays its weight
            # out for a faster kernel, for good - and from then on every product takes that kernel,
            # which has no backward pass: training after its first validation would lose the gradient
            # through every frozen layer, with no error (PyTorch only warns). So that stays off.
            layer.support_avx512bf16_for_cpu = False
            layer.requires_grad_(False)
            drop_file_pages(child.weight.data, mapped)
            setattr(parent, name, layer)
    model.is_loaded_in_4bit = True  # as transformers' quantizer marks it: PEFT then wraps these layers
    release_free_memory()  # quantising's temporaries, ~0.5 GB for a 1B model, would stay in the heap


class Nf4Weights:
    """Frozen 4-bit weights as train.lora's fused products take them, in place of a weight tensor: one
    layer's, or several stacked (q/k/v, gate/up, which share their input). Each product de-quantises
    one layer's weight at a time into a temporary, and the backward pass de-quantises again rather
    than keep it, so a step never holds more than one layer's weight at full width."""

    def __init__(self, params: list):
        self.params = params  # bitsandbytes Params4bit, each [out_i, in]
        self.rows = [p.quant_state.shape[0] for p in params]
        self.shape = (sum(self.rows), params[0].quant_state.shape[1])

    def _layers(self, dtype: torch.dtype):
        import bitsandbytes.functional as bnb_f

        start = 0
        for p, rows in zip(self.params, self.rows):
            yield slice(start, start + rows), bnb_f.dequantize_4bit(p.data, p.quant_state).to(dtype)
            start += rows

    def mm_t(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T ([tokens, in] -> [tokens, out]) for the stacked W, in x's dtype."""
        if len(self.params) == 1:
            return x @ next(self._layers(x.dtype))[1].T
        out = torch.empty(x.shape[0], self.shape[0], dtype=x.dtype, device=x.device)
        for rows, w in self._layers(x.dtype):
            out[:, rows] = x @ w.T
        return out

    def mm(self, g: torch.Tensor) -> torch.Tensor:
        """g @ W ([tokens, out] -> [tokens, in]), in g's dtype."""
        out = None
        for rows, w in self._layers(g.dtype):
            part = g[:, rows] @ w
            out = part if out is None else out.add_(part)
        return out
