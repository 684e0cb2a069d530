"""Fine-tuned models are the base with their adapter folded in: the same answers as PEFT's adapter
layers, the base's untouched tensors shared, the base itself never changed, an LRU of loaded models."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tuneforge.models.generate import Delta, Sampling
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


def test_fine_tuned_models_are_merged_copies_sharing_the_base(tmp_path):
    one, two = make_adapter(tmp_path / "one", 1), make_adapter(tmp_path / "two", 2)
    engine = Engine(max_models=1)
    base = answer(engine, Target("tiny-llama"))
    base_model = engine._bases["tiny-llama"][0]
    state = {k: v.clone() for k, v in base_model.state_dict().items()}

    first = answer(engine, Target("tiny-llama", one))
    expected, _ = tiny_model()
    with torch.no_grad():
        ids = torch.tensor([engine._bases["tiny-llama"][1]("hello there")["input_ids"]])
        peft = PeftModel.from_pretrained(expected.to(base_model.dtype), one).eval()
        unmerged = peft(input_ids=ids).logits[0, -1]
    # as PEFT's adapter layers answer, up to the rounding of the merged weights (bf16 where served in it)
    assert (first - unmerged).abs().max() < 0.1 * (first - base).abs().max()

    merged = engine._tuned[str(one.resolve())]
    assert type(merged) is type(base_model)  # a plain model, no adapter layers left
    shared = merged.get_input_embeddings().weight
    assert shared.data_ptr() == base_model.get_input_embeddings().weight.data_ptr()  # not copied
    q_merged = merged.model.layers[0].self_attn.q_proj.weight
    assert q_merged.data_ptr() != base_model.model.layers[0].self_attn.q_proj.weight.data_ptr()

    second = answer(engine, Target("tiny-llama", two))
    assert list(engine._tuned) == [str(two.resolve())]  # the first one evicted
    assert torch.equal(answer(engine, Target("tiny-llama", one)), first)  # made again, same model
    assert torch.equal(answer(engine, Target("tiny-llama")), base)
    assert all(torch.equal(v, state[k]) for k, v in base_model.state_dict().items())  # the base is untouched
    assert type(base_model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # and has no adapter layers
    assert not torch.allclose(base, first) and not torch.allclose(first, second)

    engine.forget(one)
    assert list(engine._tuned) == []


def test_an_adapter_too_big_to_merge_is_served_as_peft_layers_beside_the_untouched_base(tmp_path):
    one = make_adapter(tmp_path / "one", 1)
    engine = Engine(merge_fraction=0.0)  # no room for a merged copy
    base = answer(engine, Target("tiny-llama"))
    base_model = engine._bases["tiny-llama"][0]
    tuned = answer(engine, Target("tiny-llama", one))
    served = engine._tuned[str(one.resolve())]
    assert isinstance(served, PeftModel)  # unmerged: the adapter's own layers
    # sharing the base's tensors, not copies, and leaving its modules as they were
    assert served.get_input_embeddings().weight is base_model.get_input_embeddings().weight
    q = base_model.model.layers[0].self_attn.q_proj
    assert type(q) is torch.nn.Linear and served.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight is q.weight
    expected, _ = tiny_model()
    with torch.no_grad():
        ids = torch.tensor([engine._bases["tiny-llama"][1]("hello there")["input_ids"]])
        peft = PeftModel.from_pretrained(expected.to(base_model.dtype), one).eval()
        assert torch.equal(tuned, peft(input_ids=ids).logits[0, -1])
    assert torch.equal(answer(engine, Target("tiny-llama")), base) and not torch.allclose(tuned, base)


def test_streamed_deltas_add_up_to_the_plain_answer(tmp_path):
    engine = Engine()
    target = Target("tiny-llama", make_adapter(tmp_path / "a", 3))
    scored = replace(GREEDY, logprobs=2)
    work = [(MESSAGES, GREEDY), ("raw prompt", GREEDY), (MESSAGES, scored)]
    plain = engine.complete(target, work)
    q = engine.stream(target, work)
    texts, logprobs, finals = ["", "", ""], [[], [], []], [None, None, None]
    while (item := q.get(timeout=60)) is not None:
        i, piece = item
        if isinstance(piece, Delta):
            texts[i] += piece.text
            logprobs[i] += piece.logprobs or []
        else:
            finals[i] = piece
    assert texts == [p.text for p in plain] == [f.text for f in finals]
    assert [f.completion_tokens for f in finals] == [p.completion_tokens for p in plain]
    # log-probabilities streamed with their tokens are those of the whole answer, to float precision
    assert plain[0].logprobs is None and logprobs[0] == []
    assert [t.token for t in logprobs[2]] == [t.token for t in plain[2].logprobs] == [t.token for t in finals[2].logprobs]
    for a, b in zip(logprobs[2], plain[2].logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and [x.token for x in a.top] == [x.token for x in b.top]


def test_every_forward_pass_runs_on_the_engines_one_torch_thread(tmp_path):
    """Loading, merging and generating for requests from many threads all run on one thread: a second
    thread running torch ops slows each op of decoding (models.generate.TorchThread)."""
    import threading

    engine = Engine()
    target = Target("tiny-llama", make_adapter(tmp_path / "a", 3))
    ran_on: set[str] = set()
    with engine.use(target) as (model, _):  # the merged copy, as generation will use it
        model.register_forward_pre_hook(lambda module, args: ran_on.add(threading.current_thread().name))

    def ask():
        engine.prompt_length(target, MESSAGES)
        engine.complete(target, [(MESSAGES, GREEDY)])
        q = engine.stream(target, [(MESSAGES, GREEDY)])
        while q.get(timeout=60) is not None:
            pass

    askers = [threading.Thread(target=ask) for _ in range(3)]
    for t in askers:
        t.start()
    for t in askers:
        t.join(timeout=120)
    assert ran_on == {"tuneforge-torch"}


def test_an_engine_dropped_ends_its_torch_thread():
    """A server app that goes away (tests make many) must not leave its engine's thread behind: an
    idle thread keeps its OpenMP team, which slows every other thread's parallel ops."""
    import gc

    engine = Engine()
    engine.complete(Target("tiny-llama"), [(MESSAGES, GREEDY)])
    thread = engine._torch._thread
    assert thread.is_alive()
    del engine
    gc.collect()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_process_whose_engines_are_still_unfreed_at_exit_exits_cleanly(tmp_path):
    """Ending a torch thread while the interpreter shuts down aborted the process ("terminate called
    without an active exception", status 134) - as at the end of a test run, where engines in
    reference cycles are not yet collected: only an engine dropped while the process runs ends its
    thread."""
    import subprocess
    import sys

    code = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_engine import answer, make_adapter
from tuneforge.serve.engine import Engine, Target

def serve(i):  # an engine left to the garbage collector: loaded, merged, run on both threads
    engine = Engine(max_models=1)
    answer(engine, Target("tiny-llama"))
    answer(engine, Target("tiny-llama", make_adapter(Path({str(tmp_path)!r}) / f"a{{i}}", i)))

for i in range(3):
    serve(i)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_gpu_answers_when_there_is_one(tmp_path):
    engine = Engine()
    target = Target("tiny-llama", make_adapter(tmp_path / "a", 4))
    (done,) = engine.complete(target, [(MESSAGES, GREEDY)])
    assert done.completion_tokens >= 1
    assert next(engine._tuned[str(target.weights.resolve())].parameters()).device.type == "cuda"
    assert next(engine._bases["tiny-llama"][0].parameters()).device.type == "cuda"
