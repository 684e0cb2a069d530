"""The Responses API through the real `openai` SDK against a real `tuneforge serve` on loopback:
plain and streamed answers, kept responses continued with previous_response_id or streamed again on
retrieve, input items, and the refusals of what a text-only local server does not do."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.test_sdk import BASE, Server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("responses-home"), workers=0).start()
    yield srv
    srv.stop()


def prompt_tokens(c, messages) -> int:
    """What the same messages cost as a chat completion: the prompt the Responses API must have built."""
    return c.chat.completions.create(model=BASE, messages=messages, max_tokens=1).usage.prompt_tokens


def test_create_retrieve_continue_and_delete(server):
    c = server.client()
    first = c.responses.create(model=BASE, instructions="Answer briefly.", input="What is twice 2?",
                               max_output_tokens=16, temperature=1, metadata={"topic": "maths"})
    assert first.object == "response" and first.id.startswith("resp_") and first.model == BASE
    assert first.status in ("completed", "incomplete") and first.store and first.metadata == {"topic": "maths"}
    message = first.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert first.output_text == message.content[0].text
    assert 1 <= first.usage.output_tokens <= 16
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
    # the instructions are the system message ahead of the input
    assert first.usage.input_tokens == prompt_tokens(c, [{"role": "system", "content": "Answer briefly."},
                                                         {"role": "user", "content": "What is twice 2?"}])

    got = c.responses.retrieve(first.id)
    assert got.output_text == first.output_text and got.usage == first.usage and got.instructions == "Answer briefly."
    items = c.responses.input_items.list(first.id)
    assert [(i.role, i.content[0].type, i.content[0].text) for i in items.data] == [
        ("user", "input_text", "What is twice 2?")]

    # continuing: the earlier question and answer come first, the earlier instructions do not (as at OpenAI)
    second = c.responses.create(model=BASE, input=[{"role": "user", "content": [{"type": "input_text", "text": "And 3?"}]}],
                                previous_response_id=first.id, max_output_tokens=16, temperature=1)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == prompt_tokens(c, [
        {"role": "user", "content": "What is twice 2?"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And 3?"}])
    third = c.responses.create(model=BASE, input="And 4?", previous_response_id=second.id, max_output_tokens=16,
                               temperature=1)
    assert third.usage.input_tokens == prompt_tokens(c, [
        {"role": "user", "content": "What is twice 2?"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And 3?"}, {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "And 4?"}])

    cut = c.responses.create(model=BASE, input="Tell me a story.", max_output_tokens=16, temperature=1)
    if cut.status == "incomplete":  # (unless the tokens drawn ended it)
        assert cut.incomplete_details.reason == "max_output_tokens" and cut.output[0].status == "incomplete"

    other = server.client(server.create_key("elsewhere"))
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as err:
        other.responses.create(model=BASE, input="x", previous_response_id=first.id)
    assert err.value.body["param"] == "previous_response_id"

    c.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(second.id)
    assert c.responses.retrieve(third.id).output_text == third.output_text


def test_unstored_response_is_not_kept(server):
    c = server.client()
    r = c.responses.create(model=BASE, input="Hello", store=False, max_output_tokens=16, temperature=1)
    assert r.status in ("completed", "incomplete") and r.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model=BASE, input="again", previous_response_id=r.id)
    assert err.value.body["code"] == "previous_response_not_found"


def test_streamed_events_build_the_same_response(server):
    c = server.client()
    kinds, deltas = [], []
    with c.responses.stream(model=BASE, instructions="Answer briefly.", input="What is twice 5?",
                            max_output_tokens=16, temperature=1) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
    final = event.response  # get_final_response() only takes response.completed; a cut answer ends incomplete
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] == ("response.completed" if final.status == "completed" else "response.incomplete")
    assert final.output_text == "".join(deltas) and final.usage.output_tokens >= 1
    kept = c.responses.retrieve(final.id)
    assert kept.output_text == final.output_text and kept.usage == final.usage
    # retrieved as a stream: the same events (the text in one delta), which the SDK reads as it read the create
    again = list(c.responses.retrieve(final.id, stream=True))
    assert [e.type for e in again] == [k for k in kinds if k != "response.output_text.delta"][:4] + [
        "response.output_text.delta"] * bool(final.output_text) + kinds[-4:]
    assert [e.sequence_number for e in again] == list(range(len(again)))
    assert again[-1].response == final and again[0].response.status == "in_progress"
    assert "".join(e.delta for e in again if e.type == "response.output_text.delta") == final.output_text
    rest = list(c.responses.retrieve(final.id, stream=True, starting_after=len(again) - 3))
    assert [e.sequence_number for e in rest] == [len(again) - 2, len(again) - 1] and rest[-1].response == final

    raw = list(c.responses.create(model=BASE, input="Hi", max_output_tokens=16, temperature=1, stream=True))
    assert [e.sequence_number for e in raw] == list(range(len(raw)))
    assert raw[-1].type in ("response.completed", "response.incomplete")
    assert raw[-1].response.output_text == "".join(e.delta for e in raw if e.type == "response.output_text.delta")

    scored = c.responses.create(model=BASE, input="Hi", max_output_tokens=16, temperature=0, top_logprobs=2,
                                include=["message.output_text.logprobs"])
    tokens = scored.output[0].content[0].logprobs  # parsed into the SDK's own types
    assert "".join(t.token for t in tokens) == scored.output_text and all(len(t.top_logprobs) == 2 for t in tokens)

    usage = httpx.get(f"{server.url}/tuneforge/usage", headers={"Authorization": f"Bearer {server.key}"}).json()
    row = next(r for r in usage["data"] if r["model"] == BASE)
    assert row["completion_tokens"] >= final.usage.output_tokens + raw[-1].response.usage.output_tokens


def test_what_a_text_server_does_not_do_is_refused_by_name(server):
    c = server.client()
    cases = [
        (dict(input="x", tools=[{"type": "web_search"}]), "tools"),
        (dict(input="x", reasoning={"effort": "low"}), "reasoning"),
        (dict(input="x", text={"format": {"type": "json_object"}}), "text.format"),
        (dict(input="x", conversation="conv_123"), "conversation"),
        (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]),
         "input[0].content[0]"),
        (dict(input=[{"type": "function_call_output", "call_id": "c", "output": "1"}]), "input[0]"),
        (dict(input=""), "input"),
        (dict(input="x", max_output_tokens=0), "max_output_tokens"),
        (dict(input="x", max_output_tokens=5), "max_output_tokens"),
        (dict(input="x", temperature="0.5"), "temperature"),
        (dict(input="x", max_output_tokens="20"), "max_output_tokens"),
        (dict(input="x", store="false"), "store"),
        (dict(input="x", tool_choice="auto"), "tool_choice"),
        (dict(input=[{"role": "user", "content": []}]), "input[0].content"),
        (dict(input="x", temperature=3), "temperature"),
        (dict(input="x", metadata={f"k{i}": "v" for i in range(17)}), "metadata"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            c.responses.create(model=BASE, **kwargs)
        assert err.value.body["param"] == param, (kwargs, err.value.body)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="ft:nothing-here", input="x")
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model=BASE, input="x " * 5000)
    assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "input"
