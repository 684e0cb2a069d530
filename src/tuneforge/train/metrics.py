"""Per-step metrics: appended to metrics.jsonl as they happen, and drawn as a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def append(run_dir: Path, row: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


def read(run_dir: Path) -> list[dict]:
    """The rows logged so far. A last line without its newline is a write that a kill cut short: it
    is left out (the resumed run rewrites the file, truncate_after), so eval and --resume still read
    the run; a damaged line elsewhere is an error naming the file and line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")  # the last item is "" when the file ends with its newline
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # the cut-short last write
                break
            raise ValueError(f"{path}: line {number} is not a JSON metrics row ({err.msg})") from None
    return rows


def truncate_after(run_dir: Path, step: int) -> None:
    """On resume, forget steps the interrupted attempt logged after its last checkpoint."""
    rows = [r for r in read(run_dir) if r["step"] <= step]
    (Path(run_dir) / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot(run_dir: Path, out_name: str = PLOT_FILE) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read(run_dir)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", ax_loss), ("mean_token_accuracy", ax_acc)):
        train = [(r["step"], r[f"train_{key}"]) for r in rows if r.get(f"train_{key}") is not None]
        valid = [(r["step"], r[f"valid_{key}"]) for r in rows if r.get(f"valid_{key}") is not None]
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1)
        if valid:
            ax.plot(*zip(*valid), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(run_dir) / out_name
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
