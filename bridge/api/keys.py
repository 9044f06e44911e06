"""API keys: random bearer tokens of which only a SHA-256 digest is stored.

A key is `cb_` + 43 url-safe characters (256 random bits): the prefix makes a leaked key easy
to recognise (secret scanners, logs). It is shown once, by `create_api_key`; the database holds
its digest, so a copy of the database file does not grant access. With 256 bits of entropy a
plain (unsalted) SHA-256 is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

from bridge.store.db import Database

KEY_PREFIX = "cb_"
_MAX_KEY_LENGTH = 200


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


async def create_api_key(db: Database, name: str | None = None) -> str:
    """Create a key and return it; it cannot be shown again."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    await db.execute(
        "INSERT INTO api_keys (id, name, key_hash, created_at) VALUES (?, ?, ?, ?)",
        (str(uuid.uuid4()), name, _digest(key), datetime.now(UTC).isoformat()),
    )
    return key


async def verify_api_key(db: Database, presented: str) -> bool:
    """True if `presented` is a key that exists and is not revoked."""
    return await api_key_id(db, presented) is not None


async def api_key_id(db: Database, presented: str) -> str | None:
    """The id of `presented` if it is a key that exists and is not revoked, else None."""
    if not presented.startswith(KEY_PREFIX) or len(presented) > _MAX_KEY_LENGTH:
        return None
    digest = _digest(presented)
    row = await db.fetchone(
        "SELECT id, key_hash FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (digest,)
    )
    # The look-up is by digest, which an attacker cannot steer byte by byte; the constant-time
    # compare keeps the final check free of timing differences all the same.
    if row is None or not hmac.compare_digest(row["key_hash"], digest):
        return None
    return str(row["id"])


async def list_api_keys(db: Database) -> list[dict[str, Any]]:
    """Every key's id, name and dates (never the key nor its digest)."""
    rows = await db.fetchall(
        "SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY created_at, id"
    )
    return [dict(r) for r in rows]


async def revoke_api_key(db: Database, key_id_or_key: str) -> bool:
    """Revoke a key given its id (from `list_api_keys`) or the key itself; False if there is
    no such active key."""
    if key_id_or_key.startswith(KEY_PREFIX):
        column, value = "key_hash", _digest(key_id_or_key)
    else:
        column, value = "id", key_id_or_key
    count = await db.execute(
        f"UPDATE api_keys SET revoked_at = ? WHERE {column} = ? AND revoked_at IS NULL",
        (datetime.now(UTC).isoformat(), value),
    )
    return count > 0
