"""Read the train/validation curves and say whether the run over- or underfit.

The rules are the ones a practitioner applies by eye: validation loss turning back up while training
loss keeps falling is overfitting; a training loss that barely moved, or a validation loss still
dropping fast at the end, is underfitting (more epochs or a higher learning rate would help). A loss
that became NaN or infinite is divergence, whatever the curves did before it.

The base model's validation loss (measured before step 1, baseline.json) is the curve's first point:
without it a one-epoch run, the commonest kind, has a single validation pass and no verdict at all.
"""

from __future__ import annotations

import math
from statistics import mean


def _epoch_train_means(rows: list[dict]) -> list[float]:
    by_epoch: dict[int, list[float]] = {}
    for r in rows:
        by_epoch.setdefault(r.get("epoch", 1), []).append(r["train_loss"])
    return [mean(v) for _, v in sorted(by_epoch.items())]


def _training_loss_fell(rows: list[dict]) -> bool:
    """The mean training loss of the run's last quarter of steps is below that of its first quarter
    (per step, not per epoch: a one-epoch run has a trend too)."""
    losses = [r["train_loss"] for r in rows]
    k = max(1, len(losses) // 4)
    return mean(losses[-k:]) < mean(losses[:k])


def _first_non_finite(rows: list[dict]) -> tuple[str, float, int | None] | None:
    """(which loss, its value, step) of the first loss that is NaN or infinite; None if none is."""
    for r in rows:
        for key, name in (("train_loss", "training"), ("valid_loss", "validation")):
            value = r.get(key)
            if value is not None and not math.isfinite(value):
                return name, value, r.get("step")
    return None


def diagnose(rows: list[dict], baseline: float | None = None, start: str = "the base model's") -> dict:
    """{"verdict": good_fit|overfitting|underfitting|diverged|unknown, "reason": str, ...numbers}.
    `baseline`: the untrained model's validation loss, when it was measured; `start` names that model
    in the reasons (a continued run's is the earlier run's)."""
    if not rows:
        return {"verdict": "unknown", "reason": "no training metrics"}
    train = _epoch_train_means(rows)
    passes = [r["valid_loss"] for r in rows if r.get("valid_loss") is not None]
    out = {"train_loss_by_epoch": train, "valid_losses": passes, "base_valid_loss": baseline}
    valid = ([baseline] if baseline is not None else []) + passes
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
    if valid[-1] > best * 1.05 and _training_loss_fell(rows):
        since = start if baseline is not None and valid.index(best) == 0 else "its best"
        return out | {"verdict": "overfitting",
                      "reason": f"validation loss rose from {since} {best:.3f} to {valid[-1]:.3f} "
                                "while training loss kept falling: fewer epochs or more data"}
    if baseline is not None and min(passes) > 0.97 * baseline:
        return out | {"verdict": "underfitting",
                      "reason": f"validation loss stayed within 3% of {start} {baseline:.3f}: "
                                "try more epochs or a higher learning rate"}
    if valid[-1] < valid[-2] * 0.95:
        return out | {"verdict": "underfitting",
                      "reason": "validation loss was still falling fast at the end: more epochs may help"}
    return out | {"verdict": "good_fit", "reason": "validation loss flattened near its best"}
