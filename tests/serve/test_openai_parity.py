"""Chat requests OpenAI answers with a 400 naming the parameter are refused here too, as the real
`openai` SDK sees it: uvicorn on loopback in this process (tests.serve.conftest.serving)."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from tests.serve.conftest import serving
from tuneforge.store.keys import create_key

HI = [{"role": "user", "content": "hi"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}


@pytest.fixture(scope="module")
def sdk():
    with serving() as url:
        yield OpenAI(base_url=url, api_key=create_key("proj"), max_retries=0, timeout=60)


@pytest.mark.parametrize("ask,param,code", [
    (dict(temperature="0.5"), "temperature", "invalid_type"),
    (dict(n="2"), "n", "invalid_type"),
    (dict(max_tokens="10"), "max_tokens", "invalid_type"),
    (dict(stream_options={"include_usage": "true"}, stream=True), "stream_options.include_usage", "invalid_type"),
    (dict(tool_choice="none"), "tool_choice", "invalid_value"),
    (dict(messages=[{"role": "user", "content": []}]), "messages[0].content", "empty_array"),
    (dict(messages=[*HI, {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}]),
     "messages[1].tool_calls[0].function", "missing_required_parameter"),
    (dict(messages=[*HI, {"role": "assistant", "tool_calls": [CALL | {"function": {"name": "add", "arguments": {}}}]}]),
     "messages[1].tool_calls[0].function.arguments", "invalid_type"),
])
def test_chat_requests_openai_refuses_are_bad_requests_naming_the_parameter(sdk, ask, param, code):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(**{"model": "tiny-llama", "messages": HI, "max_tokens": 2} | ask)
    assert (err.value.body["param"], err.value.body["code"]) == (param, code), err.value.body


def test_what_openai_takes_is_still_answered(sdk):
    messages = [*HI, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "content": "2", "tool_call_id": "call_1"}]
    tools = [{"type": "function", "function": {"name": "add"}}]
    done = sdk.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=2, temperature=1, n=2,
                                       tools=tools, tool_choice="none")
    assert len(done.choices) == 2
