"""API keys: created once (the plaintext is shown a single time), stored only as a hash.

Keys are 256-bit random tokens, so a plain SHA-256 is enough: there is nothing to brute-force that a
slow password hash would protect, and lookups by hash stay a single indexed query per request.
Each key belongs to a project; everything the server stores is scoped by that project.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import func, select

from .database import ApiKey, new_id, now, session

PREFIX = "tf-"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id and its project (what the server scopes every object by)."""

    key_id: str
    project: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _hint(key: str) -> str:
    return f"{key[:6]}...{key[-4:]}"


def create_key(project: str, name: str | None = None, database_url: str | None = None) -> str:
    """Create a key for `project` and return its plaintext (the only time it exists anywhere)."""
    project = project.strip()
    if not project:
        raise ValueError("a key needs a project name")
    key = PREFIX + secrets.token_urlsafe(32)
    with session(database_url) as s, s.begin():
        s.add(ApiKey(id=new_id("key_", 16), project=project, name=name, hash=hash_key(key), hint=_hint(key)))
    return key


def list_keys(database_url: str | None = None) -> list[dict]:
    with session(database_url) as s:
        rows = s.scalars(select(ApiKey).order_by(ApiKey.seq)).all()
        return [
            {
                "id": r.id,
                "project": r.project,
                "name": r.name,
                "hint": r.hint,
                "created_at": int(r.created_at),
                "revoked": r.revoked_at is not None,
            }
            for r in rows
        ]


def revoke_key(key_id: str, database_url: str | None = None) -> None:
    """Revoke a key by id; KeyError if there is no such key. Revoked keys stay listed (audit)."""
    with session(database_url) as s, s.begin():
        row = s.scalar(select(ApiKey).where(ApiKey.id == key_id))
        if row is None:
            raise KeyError(f"no API key with id {key_id!r}")
        if row.revoked_at is None:
            row.revoked_at = now()


def ensure_initial_key(database_url: str | None = None) -> str | None:
    """On a fresh install (no key ever created), create one for project "default" and return it."""
    with session(database_url) as s:
        if s.scalar(select(func.count()).select_from(ApiKey)):
            return None
    return create_key("default", "initial", database_url)


def authenticate(key: str, database_url: str | None = None) -> Principal | None:
    """The key's Principal, or None for an unknown or revoked key."""
    with session(database_url) as s:
        row = s.scalar(select(ApiKey).where(ApiKey.hash == hash_key(key), ApiKey.revoked_at.is_(None)))
        return Principal(row.id, row.project) if row else None
