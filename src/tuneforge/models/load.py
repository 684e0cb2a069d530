"""Load a base model and its tokenizer, as fp32 weights ready to train.

GGUF files are de-quantised once by transformers (with the `gguf` package) and cached as safetensors
under the tuneforge home, so every later load reads plain safetensors in a second or two. The cache
of a file is named by its content (a SHA-256), not its name: two fine-tunes of one architecture in
the same quantisation, each "model.Q4_1.gguf", are the same size, and a LoRA run multiplies by the
file's own blocks (models.gguf) while the server answers with the cache - they must be one model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..settings import get_settings
from ..train.device import inference_dtype, pick_device
from .adapters import ADAPTER_FILE, FULL_FILE, attach, holds_weights, merged
from .catalogue import ModelSpec, resolve
from .quantize import Quantize, to_nf4


def _gguf_cache_dir(spec: ModelSpec):
    return get_settings().models_dir / f"{spec.slug}-{content_hash(spec.path)[:16]}"


FINGERPRINTS = "fingerprints.json"  # {"path|size|mtime_ns": sha256} in the models folder


def content_hash(path: Path) -> str:
    """The SHA-256 of a file, read once per version of it: remembered by path, size and modification
    time in the models folder (~0.2 s for the embedded model's 98 MB, seconds for a large model)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_file = get_settings().models_dir / FINGERPRINTS
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    memo[key] = digest.hexdigest()
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    # a temporary file of its own per writer (threads of one process too), renamed over the memo:
    # atomic; when two write at once one's entry may be lost, and is made again next time
    fd, tmp = tempfile.mkstemp(dir=memo_file.parent, prefix=FINGERPRINTS)
    with os.fdopen(fd, "w") as f:
        json.dump(memo, f, indent=1)
    os.replace(tmp, memo_file)
    return memo[key]


def _convert_gguf(spec: ModelSpec, out) -> None:
    folder, filename = spec.path.parent, spec.path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except ValueError as err:  # transformers' and numpy's words for a file cut short or damaged
        raise ValueError(f"{spec.path}: not a readable GGUF model (damaged, or cut short at "
                         f"{spec.path.stat().st_size:,} bytes?): {err}") from None
    except KeyError as err:  # a metadata field transformers needs, absent (a KeyError says only its name)
        raise ValueError(f"{spec.path}: the GGUF file lacks a field transformers needs to load it: "
                         f"{err.args[0]!r} (tokenizer.ggml.{err.args[0]} or similar)") from None
    # transformers marks a GGUF-loaded model as "quantized" and refuses save_pretrained on it. The
    # weights are already de-quantised to fp32, so the marker is stale: clear it deliberately so the
    # cached copy is an ordinary fp32 safetensors model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # what a conversion killed midway left
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a crash mid-write never leaves a half cache behind


def model_folder(spec: ModelSpec) -> Path:
    """The Hugging Face folder a (non-tiny) catalogue model loads from; a GGUF file is converted
    into the cache on first use - by one process at a time (the server answering a first chat and a
    worker starting a first job may both ask): the others wait for it, then read its copy."""
    if spec.source != "gguf":
        return Path(spec.path)
    folder = _gguf_cache_dir(spec)
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.with_name(folder.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            if not folder.exists():
                _convert_gguf(spec, folder)
    return folder


def load_base(name: str | ModelSpec, dtype: torch.dtype = torch.float32, quantize: Quantize | None = None,
              compute_dtype: torch.dtype | None = None):
    """(model, tokenizer) for a catalogue name or path, in train mode off, on the CPU.

    quantize="nf4": the linear layers' weights are stored in 4 bits (QLoRA's frozen base,
    models.quantize) and multiplied in `compute_dtype`; everything else is in `dtype`."""
    spec = name if isinstance(name, ModelSpec) else resolve(name)
    if spec.source == "tiny":
        from .tiny import tiny_model

        model, tokenizer = tiny_model()
        model = model.to(dtype)
    else:
        folder = model_folder(spec)
        tokenizer = tokenizer_from(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        with_pad(tokenizer)
    if quantize is not None:
        to_nf4(model, compute_dtype or dtype)
    return model, tokenizer


def with_pad(tokenizer):
    """Packing pads rows with the pad token; a tokenizer without one pads with its end-of-text token."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def run_folder(weights: str | Path) -> Path:
    """The run folder of a weights folder a model is served from (weights_dir's way back): RUN/adapter
    or RUN/model, or a checkpoint's RUN/checkpoints/step-N/weights."""
    weights = Path(weights)
    return weights.parents[2] if weights.name == "weights" else weights.parent


def weights_dir(run_or_weights: str | Path) -> Path:
    """The adapter/model folder of a run folder, or the folder itself if it already holds weights."""
    p = Path(run_or_weights)
    for name in ("adapter", "model", "weights"):
        if (p / name).is_dir():
            return p / name
    return p


def load_tuned(run_dir: str | Path, weights: str | Path | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer) of a finished run (or one of its checkpoints), ready for inference: in
    `dtype`, by default the one this machine answers prompts in (train.device.inference_dtype)."""
    from ..train.config import TrainConfig  # the run's saved config names its base model

    run_dir = Path(run_dir)
    cfg = TrainConfig.load(run_dir)  # says so when run_dir is not a run folder
    found = Path(weights) if weights else weights_dir(run_dir)
    if not holds_weights(found):
        from ..train.loop import RESULT_FILE

        if weights:
            raise FileNotFoundError(f"{found}: no {ADAPTER_FILE} or {FULL_FILE}")
        if (run_dir / RESULT_FILE).is_file():  # (--resume refuses a finished run: say what is wrong instead)
            raise FileNotFoundError(f"{run_dir}: the finished run's weights are missing (no adapter/ or model/ "
                                    f"folder holding {ADAPTER_FILE} or {FULL_FILE})")
        raise FileNotFoundError(f"{run_dir}: no trained weights yet (the run has not finished): continue it with "
                                f"tuneforge train --resume {run_dir}")
    model, _ = load_base(cfg.base, dtype or inference_dtype())
    tokenizer = tokenizer_from(run_dir / "tokenizer")
    model = attach(model, found)
    model.eval()
    return model, tokenizer


def load_tokenizer(name: str):
    """Just the tokenizer of a base model (for token counts), without loading weights when possible."""
    spec = resolve(name)
    if spec.source == "tiny":
        from .tiny import tiny_tokenizer

        return tiny_tokenizer()
    if spec.source == "gguf":
        cached = _gguf_cache_dir(spec)
        if cached.exists():
            return tokenizer_from(cached)
        return AutoTokenizer.from_pretrained(spec.path.parent, gguf_file=spec.path.name)
    return tokenizer_from(spec.path)


def tokenizer_from(folder: Path):
    """AutoTokenizer.from_pretrained(folder), but by the class its tokenizer_config.json names when it
    names one: AutoTokenizer reads the model's config first, with transformers' config classes, which
    import its modeling utilities (~90 MB a training process has no other use for: train.model)."""
    from transformers.models.auto.tokenization_auto import get_tokenizer_config, tokenizer_class_from_name

    name = get_tokenizer_config(str(folder)).get("tokenizer_class")
    found = tokenizer_class_from_name(name) if name else None
    return (found or AutoTokenizer).from_pretrained(folder)


def load_any(name_or_run: str):
    """A run folder (tuned model) or a base model name/path, ready for inference: on the GPU when
    there is one, in inference_dtype."""
    device = pick_device()
    path = Path(name_or_run)
    if (path / "config.json").is_file() and (path / "tokenizer").is_dir():
        model, tokenizer = load_tuned(path, dtype=inference_dtype(device))
        model = merged(model)  # LoRA folded in: decodes as fast as the base (serve.engine)
    else:
        model, tokenizer = load_base(name_or_run, inference_dtype(device))
    return model.to(device).eval(), tokenizer
