"""Data-parallel training over several processes: `torchrun --nproc_per_node N -m tuneforge train ...`.

torchrun starts N copies of the command and tells each its place (WORLD_SIZE, RANK, LOCAL_RANK).
Every process holds the whole model; each optimizer step's examples are shared out between them
(`share`), each packs and runs its own, and the trainable gradients are then summed across processes
(`sum_gradients`), so every process takes the same optimizer step from the same gradient. The loss
is divided by the step's loss tokens over *all* processes, so the sum is exactly the gradient a
single process would compute for the whole batch: a run on N processes is the one-process run with
the same batches, up to the order of floating-point additions.

Why not DistributedDataParallel: its gradient hooks are armed by its wrapper's forward, and the loss
(train.loss) runs the decoder body and the vocabulary projection itself, not the wrapped model's
forward. The summing here happens once after the backward pass, in ~32 MB buckets (DDP would overlap
it with the backward pass; for LoRA's few MB of gradients there is nothing to overlap). Why not
FSDP: it pays when the model does not fit one device; the models this trains do.

On GPUs each process drives the GPU of its LOCAL_RANK (NCCL); on a CPU the processes talk over
loopback (gloo) and share the cores (`threads`). One process - rank 0 - writes the run folder; the
others only train.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

BUCKET_BYTES = 32 << 20  # gradients summed per collective call: few calls, bounded extra memory


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        """The process that writes the run folder and reports events."""
        return self.rank == 0


def join() -> Group:
    """This process's place in a torchrun launch (a group of one when not launched by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Group()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # so the plain "cuda" device is this process's own GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Group(dist.get_rank(), dist.get_world_size(), local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def leave(group: Group) -> None:
    if group.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def threads(group: Group, cores: int) -> int:
    """Intra-op threads for one process when `cores` are shared by the processes on this machine."""
    return max(1, cores // group.local_world)


def barrier(group: Group) -> None:
    if group.world > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first(group: Group):
    """Rank 0 runs the block before the others do: a first load that fills a cache (the GGUF
    conversion) is done once, then read by the rest."""
    if not group.main:
        barrier(group)
    yield
    if group.main:
        barrier(group)


def share(lengths: list[int], group: Group) -> list[int]:
    """Positions (into `lengths`) of the examples this process trains on in one step: longest first,
    each to the process with the fewest tokens so far, so the processes finish their steps together.
    Every process computes the same split from the same lengths."""
    load = [0] * group.world
    mine = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(group.world), key=lambda r: (load[r], r))
        load[rank] += lengths[i]
        if rank == group.rank:
            mine.append(i)
    return sorted(mine)


def sum_values(values: list[float], group: Group, device: torch.device) -> list[float]:
    """Each value summed over the processes (fp64: token counts stay exact)."""
    if group.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sum_gradients(params: list[torch.nn.Parameter], group: Group) -> None:
    """Replace each parameter's gradient by its sum over the processes (a process that had no example
    this step contributes zeros)."""
    if group.world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= BUCKET_BYTES:
            _all_reduce(bucket)
            bucket, size = [], 0
    if bucket:
        _all_reduce(bucket)


def _all_reduce(grads: list[torch.Tensor]) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat)
        for g, part in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(part.view_as(g))


def broadcast_parameters(params: list[torch.nn.Parameter], group: Group) -> None:
    """Rank 0's values for `params` on every process (the trained weights must start identical)."""
    if group.world == 1:
        return
    for p in params:
        dist.broadcast(p.data, src=0)
