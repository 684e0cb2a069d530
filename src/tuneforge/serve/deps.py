"""What a route needs, as `Annotated` dependencies: the settings, a database session, the caller.

The caller is resolved from `Authorization: Bearer <key>`; the key's project is what every query
is scoped by, so another project's objects are simply not found (404), never forbidden (which
would confirm they exist).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..settings import Settings
from ..store.database import ApiKey
from ..store.keys import Principal, hash_key
from .errors import APIError


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as s:
        yield s


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
DB = Annotated[Session, Depends(get_db)]


def current_principal(request: Request, db: DB, authorization: Annotated[str | None, Header()] = None) -> Principal:
    scheme, _, key = (authorization or "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise APIError(401, "You didn't provide an API key. You need to provide your API key in an "
                       "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    row = db.scalar(select(ApiKey).where(ApiKey.hash == hash_key(key), ApiKey.revoked_at.is_(None)))
    if row is None:
        shown = f"{key[:6]}{'*' * 8}{key[-4:]}" if len(key) > 12 else "*" * len(key)
        raise APIError(401, f"Incorrect API key provided: {shown}. Create one with `tuneforge keys create`.",
                       code="invalid_api_key")
    # Read back by the usage middleware once the response is done.
    request.state.key_id = row.id
    request.state.project = row.project
    return Principal(row.id, row.project)


Caller = Annotated[Principal, Depends(current_principal)]
