"""Uploads streamed to disk: a disk that refuses the file is the server's problem, said so."""

from __future__ import annotations

import asyncio

import pytest

from tuneforge.store import blobs


async def _chunks(body: bytes):
    for i in range(0, len(body), 4096):
        yield body[i : i + 4096]


def _body(content: bytes) -> bytes:
    return (b'--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n' + content +
            b"\r\n--XyZ--\r\n")


@pytest.mark.parametrize("size", [100, 100_000])  # refused when the file is closed / as it is written
def test_an_upload_the_disk_cannot_take_is_said_so_and_leaves_nothing(tmp_path, size):
    """Not a 'malformed body' (the caller's fault), nor a bare OSError that left the part written on the
    disk: /dev/full refuses every write as a full disk does, and the upload is written there."""
    dest = tmp_path / "file-abc"
    partial = tmp_path / ".file-abc.partial"
    partial.symlink_to("/dev/full")
    with pytest.raises(blobs.BadUpload, match=r"^The file could not be stored: the server's disk is full; ask its "
                                              r"operator to make room$"):
        asyncio.run(blobs.receive_multipart("multipart/form-data; boundary=XyZ", _chunks(_body(b"a" * size)),
                                            dest, limit=1 << 20))
    assert list(tmp_path.iterdir()) == []
