"""Where training runs and in which precision: the only place that knows about CPU vs CUDA."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os

import torch

from ..data.pack import FP32_ROW_MULTIPLE, ROW_MULTIPLE


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices or UUIDs): that
    variable's list when it is set, else every device CUDA sees; none without CUDA."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and not g.strip().startswith("-")]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


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


def describe(device: torch.device, dtype: torch.dtype | None, precision: str) -> str:
    """Where and in what a run trains, for its log: on a CPU without native bf16 a run is about half
    as fast as on one with it, and the user should see why."""
    where = f"GPU ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    if dtype is not None:
        slow = " (no native bf16 on this CPU: slower than fp32)" if device.type == "cpu" and not cpu_has_bf16() else ""
        return f"Training on the {where} in bf16 autocast, fp32 master weights{slow}"
    return f"Training on the {where} in fp32" + (" (no native bf16 here)" if precision == "auto" else "")


CPU = torch.device("cpu")


def inference_dtype(device: torch.device = CPU) -> torch.dtype:
    """The dtype a model answering prompts on `device` is loaded in (chat and the server answer on
    pick_device(): the GPU when there is one): bf16 where the hardware multiplies in it natively, fp32
    elsewhere. Decoding reads every weight once per token, so half the bytes is ~1.4x the tokens/s
    (the embedded model on 2 Zen 4 cores: 16 -> 23) and half the memory per loaded model. Evaluation
    and export keep fp32."""
    return autocast_dtype("auto", device) or torch.float32


def row_multiple(device: torch.device, dtype: torch.dtype | None) -> int:
    """What packed rows' lengths are rounded to (data.pack): 64 where a new length would cost oneDNN
    kernel compiles (bf16 on a CPU), 8 where it costs nothing but the padding (fp32, GPUs)."""
    return ROW_MULTIPLE if device.type == "cpu" and dtype is not None else FP32_ROW_MULTIPLE


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in here: the autocast dtype inside autocast, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def physical_cores() -> int:
    """Cores this process may run on, hyperthread siblings counted once (matmuls gain nothing from SMT)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


# oneDNN keeps a compiled kernel, with its own work buffers, for every matmul shape it has seen (1,024
# by default, ~0.5 MB each). Packed rows are rounded to a multiple of 64 tokens (data.pack), so a run
# sees a few row lengths of ~40 shapes each: 64 kernels hold the recent ones. Measured on 2 Zen 4
# cores, whole LoRA runs of the embedded model (benchmarks/README.md): 32 costs 16% of the speed on
# 440-755-token conversations (kernels made again within each step); 64 is as fast as 128 on those
# and on the seed data, at 30-130 MB less peak RSS; the default lets a long run grow by hundreds of MB.
ONEDNN_CACHE = "64"


def configure_cpu(threads: int = 0, quantized: bool = False) -> None:
    """One intra-op thread per physical core; tokenizers must not spawn their own pool on top of it;
    a small oneDNN kernel cache (read when the first matmul runs, so call this before any); freed
    large tensors kept for reuse (_reuse_large_allocations) - but for a 4-bit base (`quantized`), whose
    products each de-quantise a layer's weight into a temporary, blocks from QUANTIZED_MMAP_THRESHOLD
    up are mapped and unmapped again."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE)
    torch.set_num_threads(threads or physical_cores())
    _reuse_large_allocations(QUANTIZED_MMAP_THRESHOLD if quantized else MMAP_THRESHOLD)


# PyTorch has no caching allocator on the CPU: every tensor is malloc'd and freed. glibc serves blocks
# over 32 MB with a fresh mmap and unmaps them on free, so each such tensor is paid for again in page
# faults (zeroed 4 KB pages) the next time. Full fine-tuning makes ~8 of them a step (the 113 MB fp32
# embedding gradient, its bf16 cast, the optimizer's temporaries): 215,000 page faults a step,
# measured 234 -> 340 tokens/s with these settings (and the in-place head gradient of train.loss), no
# higher peak RSS. LoRA runs are unchanged.
MMAP_THRESHOLD = 256 << 20  # blocks up to this size come from the heap, and are reused
TRIM_THRESHOLD = 1 << 30  # free memory kept at the top of the heap before it is returned
# A 4-bit base's de-quantised weights (a layer's worth, twice a step per layer) are what a QLoRA step
# allocates most; kept in the heap, they leave it fragmented around the step's activations: a 1B
# model's step peaked at 3.4 GB of RSS, 1.3 GB of it free heap. Mapped afresh each time: 1.9 GB.
QUANTIZED_MMAP_THRESHOLD = 32 << 20


def _glibc():
    """glibc, for its allocator's settings; None elsewhere (macOS, musl: their allocators make their
    own choices)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _reuse_large_allocations(mmap_threshold: int) -> None:
    libc = _glibc()
    if libc is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
    libc.mallopt(m_mmap_threshold, mmap_threshold)
    libc.mallopt(m_trim_threshold, TRIM_THRESHOLD)


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc keeps up to TRIM_THRESHOLD of them for
    reuse within steps). Called at the end of each epoch (the last one too), where a few page faults
    cost nothing: without it, whatever runs next - writing the plot, evaluation in the same process -
    is stacked on top of the training steps' high-water mark."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def prepare_for_autocast(model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Make a model that will train under `autocast(dtype)` do the same arithmetic with fewer copies.

    - Frozen linear weights (a LoRA run's base model) are stored in `dtype`: autocast re-casts every
      fp32 weight that is not trained at every matmul, so this gives the same numbers without a copy
      per layer per step, at half the memory. Trained parameters (adapters, or everything in full
      fine-tuning) stay fp32 master weights.
    - A frozen output layer is stored in `dtype` too (the loss projects with it in `dtype` anyway).
      When it is tied to the input embeddings, as in SmolLM2, their rows are then bf16-rounded as
      well - the one change of numbers here - and the embedding output is widened back to fp32 so
      the residual stream stays fp32. Half the memory of the largest tensor, and no second copy.
    - The other frozen tensors are copied out of the memory-mapped weights file: otherwise the whole
      fp32 file, read once by the casts above, stays mapped and resident (~4 bytes per parameter).
    After this the model expects to run under autocast.
    """
    if dtype is None:
        return
    mapped = weights_file_maps()

    def replace(p: torch.nn.Parameter, data: torch.Tensor) -> None:
        old, p.data = p.data, data
        drop_file_pages(old, mapped)

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            own = list(module.parameters(recurse=False))
            if not any(p.requires_grad for p in own):
                for p in own:
                    if p.is_floating_point():  # not a 4-bit weight (models.quantize): that stays as it is
                        replace(p, p.data.to(dtype))
    if head is not None and not head.weight.requires_grad:
        replace(head.weight, head.weight.data.to(dtype))
        embed = model.get_input_embeddings()
        if embed.weight.dtype == dtype:
            embed.register_forward_hook(lambda module, args, out: out.float())
    for p in model.parameters():  # the rest in private memory, so the weights file can be unmapped
        if not p.requires_grad and p.dtype != dtype and p.is_floating_point():
            replace(p, p.data.clone())


# Weights loaded from safetensors are views of a memory-mapped file: reading them to make the bf16
# copies above pulls the whole fp32 file into this process's resident memory, and it stays there
# until the last view is gone - the run's peak RSS for a LoRA run with activation checkpointing
# (~500 MB above what training needs). So each fp32 source's pages are handed back once copied.
# That is safe because the mapping is of an unmodified file: a page read again later (a neighbour
# sharing it) is read back from the file with the same bytes.


def weights_file_maps() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of .safetensors files (none where /proc is absent)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            spans.append((start, end))
    return spans


def drop_file_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if not any(lo <= start and end <= hi for lo, hi in mapped):
        return
    first = start - start % mmap.PAGESIZE
    ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), mmap.MADV_DONTNEED)
