"""API keys for `famsearch api`: made, revoked, listed and checked; only their SHA-256 is stored.

A key is 32 random bytes (`secrets.token_urlsafe`), so a plain hash is enough: no one can guess a key
from its hash, and a leaked database gives away no key. A revoked key stays listed, with when.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select

from retrieval.errors import UsageError
from retrieval.schema import ApiKey, utc_now
from retrieval.store import Store, check_name_length, code_point_order


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(store: Store, name: str) -> str:
    """A new key under ``name``, returned once (only its hash is kept); UsageError if the name is taken."""
    if not name.strip():
        raise UsageError("an API key needs a name (--name)")
    check_name_length(name, ApiKey.name, "an API key's name")
    key = secrets.token_urlsafe(32)
    with store.session() as session:
        if session.scalars(select(ApiKey.id).where(ApiKey.name == name)).first() is not None:
            raise UsageError(f"an API key named {name!r} exists (revoked keys keep their names); choose another name")
        session.add(ApiKey(name=name, key_hash=key_hash(key)))
    return key


def revoke_key(store: Store, name: str) -> None:
    """Revoke the key named ``name`` from now on; UsageError if there is none, or it is revoked already."""
    with store.session() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.name == name)).one_or_none()
        if row is None:
            raise UsageError(f"no API key is named {name!r}; see: famsearch api-key list")
        if row.revoked_at is not None:
            raise UsageError(f"the API key {name!r} was revoked already, at {row.revoked_at.isoformat()}")
        row.revoked_at = utc_now()


def list_keys(store: Store) -> list[dict]:
    """``[{"name", "created", "revoked": ISO time | None}, ...]`` by name; never the keys (they are not kept)."""
    with store.session() as session:
        rows = session.scalars(select(ApiKey).order_by(code_point_order(ApiKey.name, session))).all()
        return [
            {
                "name": row.name,
                "created": row.created_at.isoformat(),
                "revoked": row.revoked_at.isoformat() if row.revoked_at else None,
            }
            for row in rows
        ]


def key_is_valid(store: Store, key: str) -> bool:
    """Whether ``key`` is a key that was made here and not revoked. Every live hash is compared in constant
    time (`hmac.compare_digest`), so the answer's timing says nothing about how close a guess came."""
    digest = key_hash(key)
    with store.session() as session:
        live = session.scalars(select(ApiKey.key_hash).where(ApiKey.revoked_at.is_(None))).all()
    return any([hmac.compare_digest(digest, stored) for stored in live])  # a list: no short-circuit
