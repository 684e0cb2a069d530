"""Activation checkpointing: keep each decoder layer's input, recompute the rest in the backward pass.

A training step keeps ~22 KB of activations per token per layer of the embedded model for its
backward pass (train.fused); with this on it keeps one fp32 hidden state (2.3 KB) per token per
layer and recomputes each layer's forward pass just before its backward pass: about a third more
compute for a fraction of the activation memory. Off by default (TrainConfig.activation_checkpointing):
it is the setting for a model or batch that does not fit, not for speed.

transformers' decoder layers already know how to be checkpointed; what they do not know is that the
recomputation runs after `batch_loss` has left its `packed` block, so it is handed a context that
re-enters the block with the same example boundaries (train.attention.replay).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import replay
from .loss import causal_lm


def _checkpointed(model, function, *args):
    # No dropout runs inside a layer here (LoRA dropout is PEFT's, outside the fused paths; attention
    # dropout is 0 in these models), so the RNG state need not be saved and restored per layer.
    return checkpoint(
        function, *args, use_reentrant=False, preserve_rng_state=False,
        context_fn=lambda: (contextlib.nullcontext(), replay(model)),
    )


def recompute_layers(model: torch.nn.Module) -> int:
    """Checkpoint every decoder layer of `model` (a transformers model, PEFT-wrapped or not); how many."""
    n = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = functools.partial(_checkpointed, causal_lm(model))
            n += 1
    return n
