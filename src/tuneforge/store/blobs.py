"""Uploaded files on disk: a multipart body is streamed chunk by chunk into its final file.

Starlette's own form parsing spools a whole upload to a temporary file before the handler sees it,
so a size limit could only be checked after the fact. Parsing the multipart stream here lets the
upload stop at the first byte past the limit, and the file never passes through memory whole.
A file is written under a temporary name and renamed when complete, so a crash mid-upload never
leaves a partial file that looks finished.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

MAX_FIELD_BYTES = 64 * 1024  # plain form fields (purpose, ...) are tiny; anything bigger is abuse

log = logging.getLogger("tuneforge.blobs")


class UploadTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"File is too large: the limit is {limit:,} bytes")
        self.limit = limit


class BadUpload(ValueError):
    pass


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    path: Path | None = None  # the stored file (final name), when the body had a file part
    bytes: int = 0


def blob_path(files_dir: Path, file_id: str) -> Path:
    return Path(files_dir) / file_id


async def receive_multipart(
    content_type: str, chunks: AsyncIterator[bytes], dest: Path, limit: int, file_field: str = "file"
) -> Upload:
    """Parse a multipart/form-data stream; the part named `file_field` goes to `dest`."""
    ctype, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise BadUpload("Expected a multipart/form-data body with a 'file' part")

    up = Upload()
    tmp = dest.with_name(f".{dest.name}.partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    state: dict = {"header_field": b"", "header_value": b"", "headers": {}, "name": None, "out": None, "buf": b""}

    def on_part_begin():
        state["headers"] = {}

    def on_header_field(data, start, end):
        state["header_field"] += data[start:end]

    def on_header_value(data, start, end):
        state["header_value"] += data[start:end]

    def on_header_end():
        state["headers"][state["header_field"].lower()] = state["header_value"]
        state["header_field"] = state["header_value"] = b""

    def on_headers_finished():
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        state["buf"] = b""
        if name == file_field and b"filename" in disp:
            if up.path is not None:
                raise BadUpload("Only one file per upload")
            up.filename = disp[b"filename"].decode("utf-8", "replace")
            state["out"] = open(tmp, "wb")

    def on_part_data(data, start, end):
        piece = data[start:end]
        if state["out"] is not None:
            up.bytes += len(piece)
            if up.bytes > limit:
                raise UploadTooLarge(limit)
            state["out"].write(piece)
        else:
            state["buf"] += piece
            if len(state["buf"]) > MAX_FIELD_BYTES:
                raise BadUpload(f"Form field {state['name']!r} is too long")

    def on_part_end():
        if state["out"] is not None:
            state["out"].close()
            state["out"] = None
            up.path = dest
        elif state["name"]:
            up.fields[state["name"]] = state["buf"].decode("utf-8", "replace")

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except (UploadTooLarge, BadUpload):
        _discard(state, tmp)
        raise
    except OSError as err:  # the server's disk (full, read-only), not the body: said so, and no part of it kept
        _discard(state, tmp)
        raise BadUpload(_unstored(tmp, err)) from err
    except Exception as err:  # python-multipart raises its own errors on malformed bodies
        _discard(state, tmp)
        raise BadUpload(f"Malformed multipart body: {err}") from err
    if up.path is not None:
        os.replace(tmp, dest)
    else:
        _discard(state, tmp)
    return up


def _discard(state: dict, tmp: Path) -> None:
    if state.get("out") is not None:
        try:
            state["out"].close()
        except OSError:  # its last writes failing again (a full disk): the file is closed all the same
            pass
        state["out"] = None
    tmp.unlink(missing_ok=True)


def _unstored(tmp: Path, err: OSError) -> str:
    """The caller's message for an upload the server's disk refused: what to do, not where (the
    server's disk layout is none of the caller's business: the log names the file)."""
    log.warning("upload to %s failed: %s", tmp, err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "The file could not be stored: the server's disk is full; ask its operator to make room"
    return f"The file could not be stored on the server ({err.strerror or err}); ask its operator"


def delete_blob(path: str | Path) -> None:
    Path(path).unlink(missing_ok=True)
