"""Request shapes (serve.protocol): what a body may hold, said as OpenAI says it."""

from __future__ import annotations

import pytest

from tests.serve.conftest import upload


@pytest.mark.parametrize("field,value", [
    ("n_epochs", True), ("n_epochs", "3"), ("batch_size", False), ("learning_rate_multiplier", "0.5"),
])
def test_hyperparameters_are_numbers_not_booleans_or_strings(client, field, value):
    file_id = upload(client).json()["id"]
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                 "hyperparameters": {field: value}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == f"hyperparameters.{field}"
    ok = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                  "hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 1}})
    assert ok.status_code == 200, ok.text


CHAT = ("/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
LEGACY = ("/v1/completions", {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2})
RESPONSES = ("/v1/responses", {"model": "tiny-llama", "input": "hi", "max_output_tokens": 16})


@pytest.mark.parametrize("endpoint,field,value,expected", [
    (CHAT, "temperature", "0.5", "a decimal"), (CHAT, "n", "2", "an integer"), (CHAT, "max_tokens", "10", "an integer"),
    (CHAT, "n", 2.0, "an integer"), (CHAT, "top_p", "1", "a decimal"), (CHAT, "seed", "7", "an integer"),
    (CHAT, "stream", "true", "a boolean"), (CHAT, "store", 1, "a boolean"), (CHAT, "presence_penalty", "0", "a decimal"),
    (CHAT, "max_completion_tokens", "5", "an integer"), (CHAT, "parallel_tool_calls", "false", "a boolean"),
    (CHAT, "logprobs", "true", "a boolean or an integer"), (CHAT, "top_logprobs", "2", "an integer"),
    (LEGACY, "temperature", "0.5", "a decimal"), (LEGACY, "echo", "true", "a boolean"), (LEGACY, "best_of", "1", "an integer"),
    (RESPONSES, "temperature", "0.5", "a decimal"), (RESPONSES, "max_output_tokens", "20", "an integer"),
    (RESPONSES, "top_p", "0.9", "a decimal"), (RESPONSES, "store", "false", "a boolean"),
    (RESPONSES, "stream", 0, "a boolean"), (RESPONSES, "top_logprobs", "1", "an integer"),
])
def test_numbers_and_booleans_are_not_strings(client, endpoint, field, value, expected):
    """pydantic's lax mode took "0.5" as a temperature and "true" as stream; OpenAI answers a 400 naming
    the parameter and the type it wanted."""
    path, body = endpoint
    r = client.post(path, json=body | {field: value})
    assert r.status_code == 400, r.text
    sent = "a string" if isinstance(value, str) else "an integer" if type(value) is int else "a decimal"
    assert r.json()["error"] == {"message": f"Invalid type for '{field}': expected {expected}, but got {sent} instead.",
                                 "type": "invalid_request_error", "param": field, "code": "invalid_type"}


def test_nested_and_mapped_numbers_are_strict_too(client):
    path, body = CHAT
    r = client.post(path, json=body | {"stream": True, "stream_options": {"include_usage": "true"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.include_usage", r.text
    r = client.post(path, json=body | {"logit_bias": {"5": "10"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias[5]", r.text
    r = client.post(LEGACY[0], json=LEGACY[1] | {"prompt": ["1", 2]})  # not token ids 1 and 2
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), r.text


@pytest.mark.parametrize("endpoint,given", [
    (CHAT, {"temperature": 1, "top_p": 1, "presence_penalty": 0, "n": 1, "logprobs": True, "top_logprobs": 1}),
    (CHAT, {"logit_bias": {"5": 1}, "seed": 3, "stream": False, "store": False}),
    (LEGACY, {"temperature": 0.5, "logprobs": 1, "echo": False}),
    (RESPONSES, {"temperature": 1, "top_p": 1, "store": False, "stream": False}),
])
def test_an_integer_is_a_number(client, endpoint, given):
    path, body = endpoint
    r = client.post(path, json=body | given)
    assert r.status_code == 200, r.text
