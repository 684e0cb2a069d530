"""Turn a base model into the thing we train (LoRA adapters or all weights) and back again.

The saved form is always a standard one: a PEFT adapter folder for LoRA, a Hugging Face model folder
for full fine-tuning. Checkpoints, the final run output and the server all read those same folders.
Training writes them itself (train.model's modules carry transformers' and PEFT's parameter names);
PEFT is imported only to answer with an adapter (`attach`), not to train one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FULL_FILE = "model.safetensors"
PEFT_PREFIX = "base_model.model."  # where PEFT's wrapper puts the model in an adapter file's keys


def holds_weights(folder: Path) -> bool:
    """Whether `folder` holds trained weights: a LoRA adapter or a full model."""
    return any((Path(folder) / f).is_file() for f in (ADAPTER_FILE, FULL_FILE))


def prepare_for_training(model, method: str, *, rank: int, alpha: int, dropout: float, targets):
    """Full fine-tuning trains every weight; LoRA freezes them and adds adapters (train.lora)."""
    if method == "full":
        model.requires_grad_(True)
        return model
    from ..train.lora import add_lora

    add_lora(model, rank, alpha, dropout, targets)
    return model


def save_weights(model, folder: Path) -> None:
    """A PEFT adapter folder for a model with LoRA adapters, a Hugging Face model folder otherwise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from ..train.lora import lora_config

    lora = lora_config(model)
    if lora is not None:
        state = {PEFT_PREFIX + k: v for k, v in _trained(model).items()}
        save_file(state, folder / ADAPTER_FILE, metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "bias": "none",
                  "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, **lora}
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return
    state = _trained(model)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the embeddings' own tensor, saved once (as transformers does)
    save_file(state, folder / FULL_FILE, metadata={"format": "pt"})
    model.config.save_pretrained(folder)


def _trained(model) -> dict[str, torch.Tensor]:
    """The trained parameters by name, as contiguous tensors of their own (safetensors stores no views)."""
    return {k: p.detach().contiguous() for k, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def load_weights_into(model, folder: Path) -> None:
    """Restore trained weights saved by save_weights into the same architecture (for resume); full
    weights also into a transformers model of the base (`attach`)."""
    folder = Path(folder)
    adapter = (folder / ADAPTER_FILE).exists()
    if adapter:
        state = {k.removeprefix(PEFT_PREFIX): v for k, v in _read(folder / ADAPTER_FILE).items()}
    else:
        state = _read(folder / FULL_FILE)
    own = dict(model.named_parameters(remove_duplicate=False))
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    # an adapter holds what was trained; full weights, everything but a tied output layer
    missing = [k for k, p in own.items() if k not in state and k not in tied and (p.requires_grad or not adapter)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(state, strict=False)


def attach(base_model, weights: Path):
    """A transformers model ready for inference: base + adapter (PEFT), or the full fine-tuned weights."""
    if (weights / ADAPTER_FILE).exists():
        from peft import PeftModel

        try:
            return PeftModel.from_pretrained(base_model, weights)
        except SafetensorError as err:
            raise _unreadable(weights / ADAPTER_FILE, err) from None
    load_weights_into(base_model, weights)
    return base_model


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as err:
        raise _unreadable(path, err) from None


def _unreadable(path: Path, err: SafetensorError) -> ValueError:
    """A weights file safetensors cannot read (a copy or save that did not finish) as a user's error
    naming it, not safetensors' traceback."""
    return ValueError(f"{path}: not a readable weights file ({err}): damaged or cut short")


@torch.no_grad()
def merged(model):
    """Plain transformers model with LoRA folded into the weights (for export, and to answer at the
    base model's speed)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
