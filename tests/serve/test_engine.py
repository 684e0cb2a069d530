"""One base model, many adapters: switching never reloads the base, and each adapter is its own model."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from tuneforge.models.generate import Sampling
from tuneforge.models.tiny import tiny_model
from tuneforge.serve.engine import Engine, Target

MESSAGES = [{"role": "user", "content": "hello"}]
GREEDY = Sampling(max_tokens=6, temperature=0)


def make_adapter(path, seed: int):
    model, _ = tiny_model()  # the same weights load_base("tiny-llama") gives
    torch.manual_seed(seed)
    # init_lora_weights=False: random B as well, so the adapter visibly changes the output.
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(path)
    return path


def answer(engine: Engine, target: Target) -> torch.Tensor:
    """The next-token logits (generated text of a random tiny model is too degenerate to compare)."""
    with engine.use(target) as (model, tokenizer), torch.no_grad():
        ids = torch.tensor([tokenizer("hello there")["input_ids"]])
        return model(input_ids=ids).logits[0, -1]


def test_adapters_share_one_base_and_are_evicted_lru(tmp_path):
    one, two = make_adapter(tmp_path / "one", 1), make_adapter(tmp_path / "two", 2)
    engine = Engine(max_adapters=1)
    base = answer(engine, Target("tiny-llama"))
    base_weights = engine._bases["tiny-llama"][0].get_input_embeddings().weight

    first = answer(engine, Target("tiny-llama", one))
    model = engine._bases["tiny-llama"][0]
    assert model.get_input_embeddings().weight is base_weights  # wrapped, not reloaded
    second = answer(engine, Target("tiny-llama", two))
    assert set(model.peft_config) == {next(iter(engine._adapters["tiny-llama"].values()))}  # one evicted
    assert torch.equal(answer(engine, Target("tiny-llama", one)), first)  # loaded again, same model
    assert torch.equal(answer(engine, Target("tiny-llama")), base)  # adapters disabled for the base model
    assert not torch.allclose(base, first) and not torch.allclose(first, second)
    assert engine._bases["tiny-llama"][0].get_input_embeddings().weight is base_weights


def test_streamed_deltas_add_up_to_the_plain_answer(tmp_path):
    engine = Engine()
    target = Target("tiny-llama", make_adapter(tmp_path / "a", 3))
    plain = engine.complete(target, [(MESSAGES, GREEDY), ("raw prompt", GREEDY)])
    q = engine.stream(target, [(MESSAGES, GREEDY), ("raw prompt", GREEDY)])
    texts, finals = ["", ""], [None, None]
    while (item := q.get(timeout=60)) is not None:
        i, piece = item
        if isinstance(piece, str):
            texts[i] += piece
        else:
            finals[i] = piece
    assert texts == [p.text for p in plain] == [f.text for f in finals]
    assert [f.completion_tokens for f in finals] == [p.completion_tokens for p in plain]
