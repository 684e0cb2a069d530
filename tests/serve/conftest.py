"""The server's test harnesses: the app in-process (FastAPI's TestClient) and on a loopback port."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn
from fastapi.testclient import TestClient

from tuneforge.serve.app import create_app
from tuneforge.settings import get_settings
from tuneforge.store.keys import create_key


@pytest.fixture
def client(monkeypatch):
    """The app in-process, with a key of project "proj" and a 2,000-byte upload limit."""
    monkeypatch.setenv("TUNEFORGE_MAX_UPLOAD_BYTES", "2000")
    get_settings.cache_clear()
    key = create_key("proj")
    with TestClient(create_app(get_settings()), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {key}"
        yield c


def upload(c, body: bytes = b'{"messages": []}\n', name: str = "a.jsonl", purpose: str | None = "fine-tune"):
    data = {"purpose": purpose} if purpose else {}
    return c.post("/v1/files", files={"file": (name, body)}, data=data)


@contextmanager
def serving(app=None):
    """`app` (a new one by default) served by uvicorn on a free loopback port until the block ends,
    lifespan included; yields the /v1 base URL."""
    app = app or create_app(get_settings())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
