"""Shared fixtures: an isolated tuneforge home per test and small chat datasets."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tuneforge.settings import get_settings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Set (e.g. postgresql+psycopg://tuneforge@127.0.0.1:55432) to run every test against a fresh
# PostgreSQL database of its own instead of SQLite; scripts/test.sh does so for the server's tests.
POSTGRES = os.environ.get("TUNEFORGE_TEST_POSTGRES")


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES.replace("postgresql+psycopg", "postgresql") + "/postgres",
                         autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture(scope="session")
def shared_models_dir(tmp_path_factory) -> Path:
    """One cache of converted base models per test session: the GGUF conversion runs at most once."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def tuneforge_home(tmp_path_factory, shared_models_dir, monkeypatch):
    """Every test gets its own TUNEFORGE_HOME (database, files, runs), never the user's."""
    home = tmp_path_factory.mktemp("home")
    (home / "models").symlink_to(shared_models_dir, target_is_directory=True)
    monkeypatch.setenv("TUNEFORGE_HOME", str(home))
    database = None
    if POSTGRES:
        database = "tf_" + uuid.uuid4().hex[:12]
        _admin(f"CREATE DATABASE {database}")
        monkeypatch.setenv("TUNEFORGE_DATABASE_URL", f"{POSTGRES}/{database}")
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()
    if database:
        _admin(f"DROP DATABASE {database} WITH (FORCE)")


def write_chat(path: Path, n: int, *, system: str | None = "Answer briefly.") -> Path:
    """n distinct, learnable chat examples: the answer is always the question's number doubled."""
    with open(path, "w") as f:
        for i in range(n):
            messages = [{"role": "system", "content": system}] if system else []
            messages += [
                {"role": "user", "content": f"What is twice {i}?"},
                {"role": "assistant", "content": f"Twice {i} is {2 * i}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_chat(tmp_path / "train.jsonl", 24)


PARIS_AND_OSLO = [{"role": "user", "content": "Weather in Paris and Oslo?"}]
TWO_CALLS = json.dumps([{"function": {"name": "get_weather", "arguments": {"city": city}}} for city in ("Paris", "Oslo")])


def tiny_model_calling_two_tools():
    """The tiny model trained to answer PARIS_AND_OSLO with TWO_CALLS - two tool calls in the form
    tuneforge trains them (data.render), which the random model never writes - until its loss on that
    one answer is near 0 (seconds on 2 cores)."""
    import torch

    from tuneforge.data.render import IGNORE, prompt_ids
    from tuneforge.models.tiny import tiny_model

    model, tokenizer = tiny_model()
    prompt = prompt_ids(tokenizer, PARIS_AND_OSLO)
    answer = tokenizer(TWO_CALLS, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids, labels = torch.tensor([prompt + answer]), torch.tensor([[IGNORE] * len(prompt) + answer])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(400):
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 1e-3:  # well below: the server answers in bf16 where the CPU has it
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1e-3, "the tiny model did not learn its answer"
    return model


def tiny_ends_by_itself() -> dict:
    """Chat request fields that make the random tiny model end its answer by itself (finish_reason
    "stop"), which it never does unaided: greedy, "A" biased above every token and its end-of-turn
    token just below; once "A" is said, the penalties take it under the end. Its own logits lie within
    about 1.3 of each other, inside both margins of 2. (Only answers that end are training data.)"""
    from tuneforge.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    bias = {str(tok.convert_tokens_to_ids("A")): 12, str(tok.eos_token_id): 10}
    return {"temperature": 0, "frequency_penalty": 2, "presence_penalty": 2, "logit_bias": bias}


def write_pairs(path: Path, n: int) -> Path:
    """n preference pairs: greet person i (preferred) rather than say goodbye to them."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({
                "input": {"messages": [{"role": "user", "content": f"Say hello to person {i}."}]},
                "preferred_output": [{"role": "assistant", "content": f"Hello, person {i}!"}],
                "non_preferred_output": [{"role": "assistant", "content": f"Goodbye, person {i}."}],
            }) + "\n")
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_pairs(tmp_path / "pairs.jsonl", 24)


def assert_no_further_from(truth, reference, candidate):
    """(loss, grads) of `candidate` stray from `truth`'s no further than twice `reference`'s do.

    For bf16 runs of an optimised layer against the layer it replaces: both round at other points, so
    neither equals the other, but the optimised one may not be less accurate (fp32 is the truth)."""
    (truth_loss, truth_grads), (ref_loss, ref_grads), (loss, grads) = truth, reference, candidate
    assert abs(loss - truth_loss) <= max(2 * abs(ref_loss - truth_loss), 1e-3 * truth_loss)
    for name, g in truth_grads.items():
        ref_err = ((ref_grads[name] - g).norm() / g.norm()).item()
        err = ((grads[name] - g).norm() / g.norm()).item()
        assert err <= max(2 * ref_err, 0.02), (name, err, ref_err)
