"""The model catalogue: names and paths resolve; anything else is a clear error."""

from __future__ import annotations

import pytest

from tuneforge.models.catalogue import EMBEDDED, TINY, ModelNotFound, available, resolve
from tuneforge.models.load import load_base, load_tuned


def test_catalogue_names():
    assert resolve(TINY).source == "tiny"
    spec = resolve(EMBEDDED)
    assert spec.source == "gguf" and spec.path.suffix == ".gguf" and spec.path.exists()
    assert available() == [EMBEDDED, TINY]


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFound, match="unknown base model 'gpt-9'"):
        resolve("gpt-9")
    with pytest.raises(ModelNotFound):
        resolve(str(tmp_path))  # a folder without config.json


def test_local_hf_folder_loads(tmp_path):
    model, tok = load_base(TINY)
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    again, tok2 = load_base(str(tmp_path / "hf"))
    assert resolve(str(tmp_path / "hf")).source == "hf"
    assert tok2.chat_template == tok.chat_template
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert a.equal(b), n


def test_not_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tuneforge run folder"):
        load_tuned(tmp_path)


@pytest.mark.slow
def test_embedded_gguf_converts_once_to_a_safetensors_cache(tuneforge_home):
    import time

    model, tok = load_base(EMBEDDED)
    cached = list((tuneforge_home / "models").glob("smollm2-135m-instruct-*/model.safetensors"))
    assert len(cached) == 1
    assert model.config.num_hidden_layers == 30 and tok.eos_token == "<|im_end|>"
    assert getattr(model, "hf_quantizer", None) is None
    started = time.perf_counter()
    again, _ = load_base(EMBEDDED)  # from the cache: no de-quantisation
    assert time.perf_counter() - started < 15
    name, weight = next(iter(model.state_dict().items()))
    assert again.state_dict()[name].equal(weight)
