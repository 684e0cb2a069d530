"""Read the train/validation curves and say whether the run over- or underfit.

The rules are the ones a practitioner applies by eye: validation loss turning back up while training
loss keeps falling is overfitting; a training loss that barely moved, or a validation loss still
dropping fast at the end, is underfitting (more epochs or a higher learning rate would help). A loss
that became NaN or infinite is divergence, whatever the curves did before it.
"""

from __future__ import annotations

import math
from statistics import mean


def _epoch_train_means(rows: list[dict]) -> list[float]:
    by_epoch: dict[int, list[float]] = {}
    for r in rows:
        by_epoch.setdefault(r.get("epoch", 1), []).append(r["train_loss"])
    return [mean(v) for _, v in sorted(by_epoch.items())]


def _first_non_finite(rows: list[dict]) -> tuple[str, float, int | None] | None:
    """(which loss, its value, step) of the first loss that is NaN or infinite; None if none is."""
    for r in rows:
        for key, name in (("train_loss", "training"), ("valid_loss", "validation")):
            value = r.get(key)
            if value is not None and not math.isfinite(value):
                return name, value, r.get("step")
    return None


def diagnose(rows: list[dict]) -> dict:
    """{"verdict": good_fit|overfitting|underfitting|diverged|unknown, "reason": str, ...numbers}."""
    if not rows:
        return {"verdict": "unknown", "reason": "no training metrics"}
    train = _epoch_train_means(rows)
    valid = [r["valid_loss"] for r in rows if r.get("valid_loss") is not None]
    out = {"train_loss_by_epoch": train, "valid_losses": valid}
    # (every comparison with NaN is false: the rules below would call a diverged run a good fit)
    if broken := _first_non_finite(rows):
        which, value, step = broken
        return out | {"verdict": "diverged",
                      "reason": f"{which} loss became {value} at step {step}: try a lower learning rate"}
    if len(train) >= 2 and train[-1] > 0.9 * train[0]:
        return out | {"verdict": "underfitting",
                      "reason": "training loss fell less than 10%: try more epochs or a higher learning rate"}
    if len(valid) < 2:
        return out | {"verdict": "unknown", "reason": "fewer than two validation passes"}
    best = min(valid)
    if valid[-1] > best * 1.05 and train[-1] < train[0]:
        return out | {"verdict": "overfitting",
                      "reason": f"validation loss rose from its best {best:.3f} to {valid[-1]:.3f} "
                                "while training loss kept falling: fewer epochs or more data"}
    if valid[-1] < valid[-2] * 0.95:
        return out | {"verdict": "underfitting",
                      "reason": "validation loss was still falling fast at the end: more epochs may help"}
    return out | {"verdict": "good_fit", "reason": "validation loss flattened near its best"}
