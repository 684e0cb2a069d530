"""API keys: plaintext shown once, only a hash stored, revocation, the fresh-install key."""

from __future__ import annotations

from sqlalchemy import select

from tuneforge.store.database import ApiKey, session
from tuneforge.store.keys import authenticate, create_key, ensure_initial_key, hash_key, list_keys, revoke_key


def test_fresh_install_gets_exactly_one_key():
    key = ensure_initial_key()
    assert key and key.startswith("tf-")
    assert ensure_initial_key() is None
    assert [k["project"] for k in list_keys()] == ["default"]
    assert authenticate(key).project == "default"


def test_keys_are_stored_hashed_and_belong_to_a_project():
    key = create_key("research", "ci")
    with session() as s:
        row = s.scalar(select(ApiKey))
    assert row.hash == hash_key(key) and key not in (row.hash, row.hint) and row.project == "research"
    listed = list_keys()
    assert listed == [{"id": row.id, "project": "research", "name": "ci", "hint": row.hint,
                       "created_at": int(row.created_at), "revoked": False}]
    assert key not in str(listed)
    assert authenticate(key).key_id == row.id
    assert authenticate(key + "x") is None


def test_revoked_keys_stop_working_but_stay_listed():
    key = create_key("p")
    key_id = list_keys()[0]["id"]
    revoke_key(key_id)
    assert authenticate(key) is None
    assert list_keys()[0]["revoked"] is True
    try:
        revoke_key("key_missing")
    except KeyError as err:
        assert "key_missing" in str(err)
    else:
        raise AssertionError("revoking an unknown key must fail")


def test_explicit_database_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    create_key("elsewhere", database_url=url)
    assert [k["project"] for k in list_keys(database_url=url)] == ["elsewhere"]
    assert list_keys() == []
