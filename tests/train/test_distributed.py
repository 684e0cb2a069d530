"""Data-parallel training (train.distributed): two torchrun processes on the CPU (gloo over loopback)
train the same model a single process trains, from the same batches."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tuneforge.train import metrics as metrics_log
from tuneforge.train.config import DPO_LEARNING_RATE, TrainConfig
from tuneforge.train.distributed import Group, share
from tuneforge.train.loop import train


def test_share_gives_every_example_to_one_process_and_balances_tokens():
    lengths = [90, 10, 40, 40, 30, 75, 5, 60, 20]
    parts = [share(lengths, Group(rank=r, world=3)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(lengths) // 2, loads
    assert share(lengths, Group()) == list(range(len(lengths)))
    # fewer examples than processes: the last one gets none (and contributes zero gradients)
    assert [share([7, 3], Group(rank=r, world=3)) for r in range(3)] == [[0], [1], []]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full", "dpo"])  # dpo: LoRA with the DPO objective
def test_two_processes_train_the_model_one_process_trains(tmp_path, chat_file, pairs_file, method):
    # batch 3 of 22 training examples: every 8th step has one example, so one process sits it out
    objective, data = ("dpo", pairs_file) if method == "dpo" else ("supervised", chat_file)
    method = "lora" if method == "dpo" else method
    common = dict(base="tiny-llama", method=method, n_epochs=2, batch_size=3, precision="fp32", seed=3,
                  objective=objective)
    single = train(TrainConfig(data=str(data), out=str(tmp_path / "one"), **common))

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "tuneforge", "train", "--data", str(data), "--out", str(tmp_path / "two"),
           "--base", "tiny-llama", "--n-epochs", "2", "--batch-size", "3", "--precision", "fp32",
           "--seed", "3", "--method", method, "--objective", objective, "--quiet", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads(proc.stdout)["steps"] == single.steps == 16  # one report: rank 0's

    one, two = metrics_log.read(tmp_path / "one"), metrics_log.read(tmp_path / "two")
    assert [r["trained_tokens"] for r in two] == [r["trained_tokens"] for r in one]
    keys = ("train_loss", "train_mean_token_accuracy") + (("train_reward_margin",) if objective == "dpo" else ())
    for key in keys:
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4, abs=1e-6), key
    assert [r["valid_loss"] for r in two if "valid_loss" in r] == pytest.approx(
        [r["valid_loss"] for r in one if "valid_loss" in r], rel=1e-4)
    weights = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    a, b = load_file(tmp_path / "one" / weights), load_file(tmp_path / "two" / weights)
    assert a.keys() == b.keys()
    # DPO's smaller learning rate leaves weights near zero where Adam turns float noise in vanishing
    # gradients into steps of up to the learning rate: a tolerance of a twentieth of one step there
    slack = 0.05 * DPO_LEARNING_RATE["lora"] if objective == "dpo" else 1e-6
    for name in a:
        assert (b[name] - a[name]).abs().max() <= 1e-4 * a[name].abs().max() + slack, name
    # the weights did move: equal weights are not equal by standing still
    assert one[-1]["train_loss"] < one[0]["train_loss"]


def test_bad_input_is_reported_once_not_by_every_process(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "tuneforge", "train", "--data", str(bad),
           "--out", str(tmp_path / "run"), "--base", "tiny-llama"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "line 1, field messages[0].role" in errors[0], proc.stderr[-3000:]
