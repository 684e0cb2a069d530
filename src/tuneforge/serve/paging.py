"""OpenAI's cursor pagination: `after=<id of the last item seen>` and `limit`, with `has_more`.

Rows are ordered by their insertion sequence (`seq`), so a cursor stays valid while new rows arrive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import Session

from .errors import APIError, bad_request


def check_limit(limit: int, maximum: int) -> None:
    if not 1 <= limit <= maximum:
        raise bad_request(f"limit must be between 1 and {maximum}, got {limit}", param="limit", code="invalid_limit")


def _unknown_cursor(after: str) -> APIError:
    return bad_request(f"No object with id '{after}' to continue after", param="after", code="invalid_cursor")


def page(db: Session, stmt: Select, table: Any, after: str | None, limit: int,
         order: str = "desc") -> tuple[Sequence[Any], bool]:
    """(rows of one page, has_more) of `stmt` (already scoped to the caller)."""
    desc = order != "asc"
    if after:
        # looked up within the caller's own rows: another project's id is as unknown as a made-up one
        anchor = db.scalar(stmt.with_only_columns(table.seq).where(table.id == after))
        if anchor is None:
            raise _unknown_cursor(after)
        stmt = stmt.where(table.seq < anchor if desc else table.seq > anchor)
    stmt = stmt.order_by(table.seq.desc() if desc else table.seq.asc()).limit(limit + 1)
    rows = db.scalars(stmt).all()
    return rows[:limit], len(rows) > limit


def page_list(rows: Sequence[Any], after: str | None, limit: int) -> tuple[Sequence[Any], bool]:
    """The same over rows already filtered in Python (e.g. by metadata) and in display order."""
    if after:
        ids = [r.id for r in rows]
        if after not in ids:
            raise _unknown_cursor(after)
        rows = rows[ids.index(after) + 1 :]
    return rows[:limit], len(rows) > limit
