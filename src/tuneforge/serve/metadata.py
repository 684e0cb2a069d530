"""OpenAI's `metadata`: up to 16 string pairs on an object, and `metadata[key]=value` list filters."""

from __future__ import annotations

from fastapi import Request

from .errors import bad_request


def check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata and (len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items())):
        raise bad_request("metadata takes at most 16 pairs, keys up to 64 and values up to 512 characters",
                          param="metadata", code="invalid_metadata")


def metadata_filter(request: Request) -> dict[str, str]:
    """The `metadata[key]=value` query parameters of a list request (they fit no declared parameter)."""
    return {k[len("metadata["):-1]: v for k, v in request.query_params.items()
            if k.startswith("metadata[") and k.endswith("]")}
