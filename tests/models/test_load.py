"""Models answer prompts in bf16 where the hardware computes in it natively, fp32 elsewhere; export
and evaluation keep the trained fp32 weights."""

from __future__ import annotations

import pytest
import torch

from tuneforge.models.load import load_any, load_tuned
from tuneforge.serve.engine import Engine, Target
from tuneforge.train import device
from tuneforge.train.config import TrainConfig
from tuneforge.train.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.conftest import write_chat

    folder = tmp_path_factory.mktemp("run")
    train(TrainConfig(data=str(write_chat(folder / "t.jsonl", 12)), out=str(folder / "run"), base="tiny-llama",
                      n_epochs=1, precision="fp32"))
    return folder / "run"


@pytest.mark.parametrize("native", [True, False])
def test_prompts_are_answered_in_bf16_where_the_cpu_multiplies_in_it(run, monkeypatch, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: native)
    expected = torch.bfloat16 if native else torch.float32
    assert device.inference_dtype() == expected
    tuned, tok = load_tuned(run)
    assert tuned.dtype == expected
    assert load_any(str(run))[0].dtype == expected and load_any("tiny-llama")[0].dtype == expected
    with Engine().use(Target("tiny-llama")) as (model, _):
        assert model.dtype == expected
    # the same model either way: bf16 answers what fp32 answers, to bf16's precision
    exact, _ = load_tuned(run, dtype=torch.float32)
    assert exact.dtype == torch.float32
    ids = torch.tensor([tok("What is twice 3?")["input_ids"]])
    with torch.no_grad():
        a, b = exact(input_ids=ids).logits[0].float(), tuned(input_ids=ids).logits[0].float()
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99


def test_a_gguf_is_converted_once_when_two_ask_at_the_same_time(tmp_path, monkeypatch):
    """The server's first chat and a worker's first job may both need the cached copy: one converts
    (under a file lock), the other waits and reads it."""
    import threading
    import time

    from tuneforge.models import load
    from tuneforge.models.catalogue import ModelSpec

    gguf = tmp_path / f"m{time.time_ns()}.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def slow_convert(spec, out):  # stands in for the real 20 s conversion: the same rename at the end
        calls.append(out)
        time.sleep(0.5)
        partial = out.with_name(out.name + ".partial")
        partial.mkdir()
        (partial / "config.json").write_text("{}")
        partial.rename(out)

    monkeypatch.setattr(load, "_convert_gguf", slow_convert)
    spec = ModelSpec(str(gguf), "gguf", gguf)
    got = []
    threads = [threading.Thread(target=lambda: got.append(load.model_folder(spec))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 2 and got[0] == got[1] and (got[0] / "config.json").is_file()


def test_the_cache_of_a_gguf_is_named_by_its_content(tmp_path):
    """Two fine-tunes of one architecture in one quantisation have the same file name and size: each
    must get its own converted copy (a LoRA run multiplies by the file's blocks, the server by the
    copy). The hash is read once per version of a file."""
    import json
    import os

    from tuneforge.models import load
    from tuneforge.models.catalogue import ModelSpec

    a, b = tmp_path / "a" / "model.Q4_1.gguf", tmp_path / "b" / "model.Q4_1.gguf"
    for path, byte in ((a, b"\x01"), (b, b"\x02")):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + byte * 1000)
    dirs = [load._gguf_cache_dir(ModelSpec(str(p), "gguf", p)) for p in (a, b)]
    assert dirs[0] != dirs[1] and dirs[0].parent == dirs[1].parent
    assert dirs[0].name.startswith("model.q4_1-")
    (tmp_path / "c").mkdir()
    copy = tmp_path / "c" / "other-name.gguf"
    copy.write_bytes(a.read_bytes())
    assert load._gguf_cache_dir(ModelSpec(str(copy), "gguf", copy)).name.split("-")[-1] == dirs[0].name.split("-")[-1]
    memo = json.loads((dirs[0].parent / load.FINGERPRINTS).read_text())  # (the session's shared models folder)
    assert len([k for k in memo if k.startswith(str(tmp_path))]) == 3
    # rewritten in place with the same size: a new modification time, so read again
    a.write_bytes(b"GGUF" + b"\x03" * 1000)
    os.utime(a, ns=(0, 10**9))
    assert load._gguf_cache_dir(ModelSpec(str(a), "gguf", a)) != dirs[0]


def test_a_gguf_without_a_field_transformers_needs_is_refused_by_name(tmp_path, monkeypatch):
    """transformers reads a GGUF tokenizer's fields by name: one missing was a bare KeyError ('scores')."""
    from gguf import GGUFWriter

    from tests.models.test_gguf import write_gguf
    from tuneforge.models import load
    from tuneforge.models.catalogue import ModelSpec
    from tuneforge.models.tiny import tiny_model

    path = tmp_path / "no-scores.gguf"
    monkeypatch.setattr(GGUFWriter, "add_token_scores", lambda self, scores: None)
    write_gguf(path, *tiny_model())
    with pytest.raises(ValueError, match=r"no-scores\.gguf: the GGUF file lacks .*'scores'"):
        load.model_folder(ModelSpec(str(path), "gguf", path))
