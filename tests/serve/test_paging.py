"""Cursor pagination over the app in-process: every list refuses an unknown cursor the same way."""

from __future__ import annotations

import pytest

from tests.serve import test_app

client = test_app.client  # the fixture: the app in-process, with a key


@pytest.mark.parametrize("path", ["/v1/fine_tuning/jobs", "/v1/files", "/v1/chat/completions"])
def test_an_unknown_cursor_is_a_400_with_a_code(client, path):
    r = client.get(path, params={"after": "nope-123"})
    assert r.status_code == 400
    assert r.json()["error"] == {"message": "No object with id 'nope-123' to continue after",
                                 "type": "invalid_request_error", "param": "after", "code": "invalid_cursor"}
