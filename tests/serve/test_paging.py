"""Cursor pagination over the app in-process: every list refuses an unknown cursor the same way."""

from __future__ import annotations

import pytest

from tests.serve.conftest import upload


@pytest.mark.parametrize("path", ["/v1/fine_tuning/jobs", "/v1/files", "/v1/chat/completions"])
def test_an_unknown_cursor_is_a_400_with_a_code(client, path):
    r = client.get(path, params={"after": "nope-123"})
    assert r.status_code == 400
    assert r.json()["error"] == {"message": "No object with id 'nope-123' to continue after",
                                 "type": "invalid_request_error", "param": "after", "code": "invalid_cursor"}


def test_another_projects_id_is_no_cursor(client):
    """A cursor is looked up among the caller's own objects: another project's id must not page (that
    would tell the caller it exists, and where it lies among its own)."""
    from tuneforge.store.keys import create_key

    theirs = upload(client, b'{"messages": [{"role": "user", "content": "hi"}]}\n').json()["id"]
    upload(client, b'{"messages": [{"role": "user", "content": "again"}]}\n')
    assert client.get("/v1/files", params={"after": theirs}).status_code == 200  # the owner may page after it
    other = {"Authorization": f"Bearer {create_key('other')}"}
    r = client.get("/v1/files", params={"after": theirs}, headers=other)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cursor"
