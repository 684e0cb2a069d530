"""metrics.jsonl as a killed run leaves it: eval and --resume must still read the run."""

from __future__ import annotations

import json

import pytest

from tuneforge.train import metrics as metrics_log


def rows_file(tmp_path, tail: str = "") -> None:
    text = "".join(json.dumps({"step": s, "train_loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
    (tmp_path / metrics_log.METRICS_FILE).write_text(text + tail)


def test_a_last_row_cut_short_by_a_kill_is_left_out_and_resume_rewrites_the_file(tmp_path):
    rows_file(tmp_path, '{"step": 4, "train_lo')
    assert [r["step"] for r in metrics_log.read(tmp_path)] == [1, 2, 3]
    metrics_log.truncate_after(tmp_path, 2)  # what --resume does from a checkpoint at step 2
    metrics_log.append(tmp_path, {"step": 3, "train_loss": 0.3})
    assert [r["step"] for r in metrics_log.read(tmp_path)] == [1, 2, 3]
    assert (tmp_path / metrics_log.METRICS_FILE).read_text().endswith("}\n")


def test_a_damaged_row_before_the_last_names_the_file_and_line(tmp_path):
    rows_file(tmp_path)
    path = tmp_path / metrics_log.METRICS_FILE
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not a JSON metrics row"):
        metrics_log.read(tmp_path)
