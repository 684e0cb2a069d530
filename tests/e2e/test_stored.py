"""Stored chat completions through the real `openai` SDK against a real `tuneforge serve`, and back
into a training file with `tuneforge data stored`: the loop from serving to the next fine-tune."""

from __future__ import annotations

import json
import subprocess

import openai
import pytest

from tests.conftest import tiny_ends_by_itself
from tests.e2e.test_sdk import BASE, Server

SYSTEM = {"role": "developer", "content": "Answer briefly."}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("stored-home"), workers=0).start()
    yield srv
    srv.stop()


def ask(client, question: str, **kw):
    # answers that end by themselves: the random tiny model's own are cut at max_tokens (no training data)
    return client.chat.completions.create(model=BASE, messages=[SYSTEM, {"role": "user", "content": question}],
                                          max_tokens=6, **tiny_ends_by_itself(), **kw)


def test_stored_completions_list_label_delete_and_become_training_data(server, tmp_path):
    c = server.client()
    first = ask(c, "What is twice 2?", store=True, metadata={"topic": "maths"})
    stream = ask(c, "What is twice 3?", store=True, metadata={"topic": "other"}, stream=True)
    chunks = list(stream)
    streamed_id, streamed_text = chunks[0].id, "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    not_stored = ask(c, "What is twice 4?")

    listed = c.chat.completions.list()
    assert [x.id for x in listed.data] == [first.id, streamed_id]  # oldest first; unstored ones absent
    assert [x.id for x in c.chat.completions.list(metadata={"topic": "maths"}).data] == [first.id]
    assert [x.id for x in c.chat.completions.list(order="desc").data] == [streamed_id, first.id]
    page = c.chat.completions.list(model=BASE, limit=1)
    assert [x.id for x in page.data] == [first.id] and page.has_more
    assert [x.id for x in c.chat.completions.list(model="ft:other").data] == []

    got = c.chat.completions.retrieve(first.id)
    assert got.choices[0].message.content == first.choices[0].message.content
    assert got.usage.total_tokens == first.usage.total_tokens and got.metadata == {"topic": "maths"}
    assert c.chat.completions.retrieve(streamed_id).choices[0].message.content == streamed_text
    messages = c.chat.completions.messages.list(first.id)
    assert [(m.role, m.content) for m in messages.data] == [("developer", "Answer briefly."),
                                                           ("user", "What is twice 2?")]
    assert c.chat.completions.update(first.id, metadata={"rating": "good"}).metadata == {"rating": "good"}

    with pytest.raises(openai.NotFoundError):
        c.chat.completions.retrieve(not_stored.id)
    with pytest.raises(openai.BadRequestError) as err:
        ask(c, "x", store=True, metadata={f"k{i}": "v" for i in range(17)})
    assert err.value.body["param"] == "metadata"
    other = server.client(server.create_key("elsewhere"))
    assert other.chat.completions.list().data == []
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.retrieve(first.id)

    assert c.chat.completions.delete(streamed_id).deleted
    assert [x.id for x in c.chat.completions.list().data] == [first.id]

    # back into training data: what was labelled good, as chat JSONL a fine-tune accepts
    out = tmp_path / "reviewed.jsonl"
    run = lambda *args: subprocess.run(["tuneforge", *args], env=server.env, capture_output=True, text=True)  # noqa: E731
    done = run("data", "stored", "-o", str(out), "--metadata", "rating=good")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"messages": [{"role": "system", "content": "Answer briefly."},
                                  {"role": "user", "content": "What is twice 2?"},
                                  {"role": "assistant", "content": first.choices[0].message.content}]}]
    for i in range(10):  # a file a fine-tuning job accepts: at least 10 examples
        ask(c, f"What is twice {i}?", store=True, metadata={"batch": "reviewed"})
    done = run("data", "stored", "-o", str(out), "--metadata", "batch=reviewed", "--json")
    assert json.loads(done.stdout)["n_examples"] == 10
    checked = run("data", "validate", str(out), "--base", BASE)
    assert checked.returncode == 0, checked.stdout
    missing = run("data", "stored", "-o", str(tmp_path / "none.jsonl"), "--metadata", "rating=bad")
    assert missing.returncode == 2 and "No stored chat completion matches" in missing.stderr
    bad = run("data", "stored", "-o", str(tmp_path / "none.jsonl"), "--metadata", "rating")
    assert bad.returncode == 2 and "key=value" in bad.stderr
