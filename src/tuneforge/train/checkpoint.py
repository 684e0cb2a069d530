"""Save and restore everything needed to continue a run exactly where it stopped.

A checkpoint folder holds the trained weights in their standard form (servable on its own), the
optimizer state (the learning-rate schedule's position included), the RNG state and the loop
position. Folders are written under a temporary name and renamed, so a kill mid-save never leaves a
checkpoint that looks complete.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..models.adapters import load_weights_into, save_weights
from .optim import AdamW

CHECKPOINTS = "checkpoints"


@dataclass
class LoopState:
    epoch: int = 0  # epochs fully done
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0
    trained_tokens: int = 0
    best_valid_loss: float | None = None
    bad_evals: int = 0  # validation passes since the best one (early stopping)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "state.json").exists())


class WriteFailed(OSError):
    """A file or folder of a run could not be written: the message names it and says why."""


def save_checkpoint(run_dir, model, optimizer: AdamW, state: LoopState, kind: str, metrics: dict):
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{state.global_step:06d}"
    if kind == "interrupt" and (final / "state.json").exists() and read_meta(final)["state"] == asdict(state):
        # a stop just after an epoch's checkpoint: nothing trained since, and written as an interrupt
        # it would replace the epoch's own, which the next checkpoint then prunes as superseded
        return final
    tmp = root / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_weights(model, tmp / "weights")
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "trainer.pt")
        meta = {"kind": kind, "state": asdict(state), "metrics": metrics}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
    except (OSError, RuntimeError) as err:  # torch.save says a full disk as a RuntimeError ("unexpected pos")
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written copy would hold the space a retry needs
        raise WriteFailed(_unwritten(final, err)) from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _prune(root, keep=final)
    return final


def _unwritten(ckpt: Path, err: Exception) -> str:
    """One line for a checkpoint that could not be written; the earlier checkpoints are untouched
    (a new one replaces nothing until it is complete), so the run can be resumed from the last one."""
    return (f"{ckpt}: the checkpoint could not be written ({_why(ckpt, err)}); the run's earlier checkpoints are "
            "kept: make room and resume it")


@contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Name the file or folder a failed write was for, and say whether the disk is full: an error at
    write or close time (a full disk, a quota) carries no file name ("[Errno 28] No space left on
    device"), and the run writes many files."""
    try:
        yield
    except OSError as err:
        raise WriteFailed(f"{path}: {what} could not be written ({_why(Path(path), err)})") from None


def _why(path: Path, err: Exception) -> str:
    folder = next(p for p in (path, *path.parents) if p.exists())  # (the target may not exist yet)
    free = shutil.disk_usage(folder).free
    code = getattr(err, "errno", None)
    if code == errno.ENOSPC or (code is None and free < 64 << 20):  # torch's errors carry no errno
        return f"no space left on the disk: {free >> 20} MB free"
    return str(err).splitlines()[0]


def _prune(root: Path, keep: Path) -> None:
    """Only the newest checkpoint needs optimizer state; interrupt checkpoints are superseded."""
    for p in checkpoint_dirs(root.parent):
        if p == keep:
            continue
        if json.loads((p / "state.json").read_text())["kind"] == "interrupt":
            shutil.rmtree(p)
        else:
            (p / "trainer.pt").unlink(missing_ok=True)


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def restore_checkpoint(ckpt: Path, model, optimizer: AdamW) -> LoopState:
    load_weights_into(model, ckpt / "weights")
    try:
        trainer = torch.load(ckpt / "trainer.pt", weights_only=False)
    except Exception as e:  # missing, truncated or overwritten: whatever torch.load says, the file is named
        raise ValueError(f"{ckpt / 'trainer.pt'}: the optimizer state of the newest checkpoint cannot be read "
                         f"({type(e).__name__}: {e}), so the run cannot be resumed exactly; its weights are in "
                         f"{ckpt / 'weights'}. Train again from the start (the command line: --overwrite)") from None
    optimizer.load_state_dict(trainer["optimizer"], trainer.get("scheduler"))  # torch.optim's, before train.optim
    torch.set_rng_state(trainer["rng"])
    return LoopState(**read_meta(ckpt)["state"])
