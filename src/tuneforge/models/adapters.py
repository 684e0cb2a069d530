"""Turn a base model into the thing we train (LoRA adapters or all weights) and back again.

The saved form is always a standard one: a PEFT adapter folder for LoRA, a Hugging Face model folder
for full fine-tuning. Checkpoints, the final run output and the server all read those same folders.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

ADAPTER_FILE = "adapter_model.safetensors"
FULL_FILE = "model.safetensors"


def prepare_for_training(model, method: str, *, rank: int, alpha: int, dropout: float, targets):
    if method == "full":
        model.requires_grad_(True)
        return model
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_weights(model, folder: Path) -> None:
    """Adapter folder for a PEFT model, HF model folder otherwise."""
    model.save_pretrained(folder)


def load_weights_into(model, folder: Path) -> None:
    """Restore trained weights saved by save_weights into the same architecture (for resume)."""
    if (folder / ADAPTER_FILE).exists():
        set_peft_model_state_dict(model, load_file(folder / ADAPTER_FILE))
        return
    state = load_file(folder / FULL_FILE)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder}: weights do not match the model (missing {missing[:3]})")


def attach(base_model, weights: Path):
    """A model ready for inference: base + adapter, or the full fine-tuned weights."""
    if (weights / ADAPTER_FILE).exists():
        return PeftModel.from_pretrained(base_model, weights)
    load_weights_into(base_model, weights)
    return base_model


@torch.no_grad()
def merged(model):
    """Plain transformers model with LoRA folded into the weights (for export, and to answer at the
    base model's speed)."""
    return model.merge_and_unload() if isinstance(model, PeftModel) else model
