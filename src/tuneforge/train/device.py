"""Where training runs and in which precision: the only place that knows about CPU vs CUDA."""

from __future__ import annotations

import contextlib
import os

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_bf16() -> bool:
    # AVX-512 BF16 / AMX give native bf16 matmuls; without them bf16 autocast is slower than fp32.
    flags = ""
    with contextlib.suppress(OSError):
        flags = open("/proc/cpuinfo").read()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def set_threads(threads: int = 0) -> None:
    """One intra-op thread per core; tokenizers must not spawn their own pool on top of it."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads or os.cpu_count() or 1)
