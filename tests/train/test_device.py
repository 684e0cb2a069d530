"""Preparing a memory-mapped model for bf16 training keeps its numbers (file pages handed back); free
heap memory can be handed back too."""

from __future__ import annotations

import copy
import os
import platform

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.models.adapters import prepare_for_training
from tuneforge.models.tiny import tiny_model
from tuneforge.train import device
from tuneforge.train.device import configure_cpu, prepare_for_autocast, release_free_memory


def test_a_memory_mapped_model_prepares_to_the_same_weights(tmp_path, monkeypatch):
    model, _ = tiny_model(seed=0)
    model.save_pretrained(tmp_path / "m")
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert device.weights_file_maps()  # its weights are views of the mapped file: the path under test
    dropped = []
    monkeypatch.setattr(device, "drop_file_pages", lambda t, spans, real=device.drop_file_pages: (
        dropped.append(t.numel()), real(t, spans)))
    prepared = []
    for m in (copy.deepcopy(model), mapped):
        torch.manual_seed(0)  # LoRA A is drawn from the global generator
        m = prepare_for_training(m, "lora", rank=4, alpha=8, dropout=0.0, targets=["q_proj", "down_proj"])
        prepare_for_autocast(m, torch.bfloat16)
        prepared.append(dict(m.named_parameters()))
    in_memory, from_file = prepared
    assert sum(dropped) > 0
    for name, p in in_memory.items():
        q = from_file[name]
        assert q.dtype == p.dtype and torch.equal(q, p), name
        assert q.requires_grad == p.requires_grad


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or platform.libc_ver()[0] != "glibc",
                    reason="reads Linux's /proc and calls glibc's malloc_trim")
def test_free_heap_memory_goes_back_to_the_system():
    configure_cpu()  # blocks up to 256 MB come from the heap and stay there when freed
    blocks = [torch.ones(16 << 20) for _ in range(4)]  # 4 x 64 MB, paged in
    del blocks
    before = _rss_mb()
    release_free_memory()
    assert _rss_mb() < before - 128


def test_rows_round_to_64_only_where_new_lengths_compile_kernels():
    import torch

    from tuneforge.train.device import row_multiple

    assert row_multiple(torch.device("cpu"), torch.bfloat16) == 64  # oneDNN: a kernel per new shape
    assert row_multiple(torch.device("cpu"), None) == 8  # fp32 products compile nothing per shape
    assert row_multiple(torch.device("cuda"), torch.bfloat16) == 8
