"""Answers over a real HTTP connection (uvicorn on loopback, in this process so the engine can be
watched): a client that hangs up mid-answer - streamed or not - stops the generation and is billed
what was made."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from sqlalchemy import select

from tests.serve.conftest import serving
from tuneforge.serve.app import create_app
from tuneforge.settings import get_settings
from tuneforge.store.database import UsageRow, session
from tuneforge.store.keys import create_key

MAX_TOKENS = 1000  # the tiny model never stops on its own when greedy: ~20 s of generation here


@pytest.fixture
def live():
    app = create_app(get_settings())
    key = create_key("proj")
    with serving(app) as url:
        yield app, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


ASK = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,body", [
    ("/chat/completions", {"messages": ASK, "max_tokens": MAX_TOKENS}),
    ("/completions", {"prompt": "hi", "max_tokens": MAX_TOKENS}),
    ("/responses", {"input": "hi", "max_output_tokens": MAX_TOKENS}),
])
def test_a_dropped_stream_stops_generating_and_counts_what_was_made(live, path, body):
    app, client = live
    with client.stream("POST", path, json={"model": "tiny-llama", "stream": True, "temperature": 0} | body) as r:
        assert r.status_code == 200 and r.headers["x-request-id"].startswith("req_")
        got = 0
        for line in r.iter_lines():  # a few pieces of the answer, then hang up
            got += line.startswith("data: ")
            if got == 8:
                break
    # the engine is free again long before the answer's MAX_TOKENS would have been made
    assert app.state.engine._lock.acquire(timeout=10), "generation went on after the client left"
    app.state.engine._lock.release()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the usage row is written when the request ends
        with session() as s:
            row = s.scalar(select(UsageRow).where(UsageRow.path == "/v1" + path))
        if row is not None:
            break
        time.sleep(0.1)
    assert row is not None and row.model == "tiny-llama" and row.prompt_tokens > 0
    assert 0 < row.completion_tokens < MAX_TOKENS / 4, row.completion_tokens
    assert row.status == 499  # the client's hang-up, as for a whole answer (it was logged 200)
    from tuneforge.monitor.usage import summary

    (counted,) = [r for r in summary() if r["model"] == "tiny-llama"]  # a Stop is no error: counted apart
    assert (counted["errors"], counted["stopped_by_client"]) == (0, 1)


def _usage_row(path: str) -> UsageRow | None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the usage row is written when the request ends
        with session() as s:
            row = s.scalar(select(UsageRow).where(UsageRow.path == "/v1" + path))
        if row is not None:
            return row
        time.sleep(0.1)
    return None


WHOLE = 1900  # tokens a whole answer asks for (the tiny model holds 2,048): more than a fast machine makes in the timeout


@pytest.mark.parametrize("path,body", [
    ("/chat/completions", {"messages": ASK, "max_tokens": WHOLE}),
    ("/completions", {"prompt": "hi", "max_tokens": WHOLE}),
    ("/responses", {"input": "hi", "max_output_tokens": WHOLE}),
])
def test_a_client_that_gives_up_on_a_whole_answer_stops_its_generation(live, path, body):
    """Not streamed: the client's timeout (the SDK's, a script's) hangs up long before MAX_TOKENS; the
    engine - and every request waiting for it - must not go on making the answer nobody will read."""
    app, client = live
    with pytest.raises(httpx.ReadTimeout):
        client.post(path, json={"model": "tiny-llama", "temperature": 0} | body, timeout=0.5)
    assert app.state.engine._lock.acquire(timeout=10), "generation went on after the client left"
    app.state.engine._lock.release()
    row = _usage_row(path)  # logged as the client's hang-up, with what was made (not the whole answer)
    assert row is not None and row.status == 499 and row.prompt_tokens > 0
    assert 0 < row.completion_tokens < WHOLE, row.completion_tokens
    # and the next request is answered as usual
    answer = client.post(path, json={"model": "tiny-llama", "temperature": 0} | body | {
        "max_output_tokens" if path == "/responses" else "max_tokens": 16})
    assert answer.status_code == 200, answer.text


def _fail(*args, **kwargs):
    raise RuntimeError("size mismatch in /srv/secret/adapter.safetensors")


@pytest.mark.parametrize("path,body", [
    ("/chat/completions", {"messages": ASK, "max_tokens": 4}),
    ("/completions", {"prompt": "hi", "max_tokens": 4}),
    ("/responses", {"input": "hi", "max_output_tokens": 16}),
])
def test_a_streamed_answer_that_fails_is_a_500_in_usage_and_keeps_its_internals(live, monkeypatch, path, body):
    """Its 200 is sent before generation starts: the failure is said in the stream - as the whole
    answer's 500 says it, by the kind of error only - and logged as the 500 it is (it was a 200)."""
    import tuneforge.serve.engine as engine

    monkeypatch.setattr(engine, "stream", _fail)
    app, client = live
    with client.stream("POST", path, json={"model": "tiny-llama", "stream": True} | body) as r:
        said = r.read().decode()
    assert "RuntimeError" in said and "secret" not in said
    row = _usage_row(path)
    assert row is not None and row.status == 500 and row.model == "tiny-llama"


def test_after_a_500_the_connection_serves_the_next_request(live, monkeypatch):
    """Starlette answered our bugs and raised them again, and uvicorn then closed the keep-alive
    connection: the SDK's next request on it failed with a connection error. One raw connection here,
    so nothing reconnects behind the test's back."""
    import json as json_mod

    import tuneforge.serve.engine as engine

    app, client = live
    monkeypatch.setattr(engine, "complete", _fail)
    body = json_mod.dumps({"model": "tiny-llama", "messages": ASK, "max_tokens": 2}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {client.headers['Authorization']}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((client.base_url.host, client.base_url.port), timeout=30) as conn:
        answers = []
        for _ in range(2):
            conn.sendall(request)
            answers.append(_read_response(conn))
    for head, text in answers:
        assert head.startswith("http/1.1 500") and "x-request-id: req_" in head, head  # (lowercased)
        assert "RuntimeError" in text and "secret" not in text


def _read_response(conn: socket.socket) -> tuple[str, str]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(":")[1] for line in head.decode().lower().split("\r\n")
                      if line.startswith("content-length")))
    while len(rest) < length:
        chunk = conn.recv(65536)
        assert chunk, "the server closed the connection"
        rest += chunk
    return head.decode().lower(), rest.decode()
