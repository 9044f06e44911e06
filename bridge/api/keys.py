"""API keys: random bearer tokens of which only a SHA-256 digest is stored.

A key is `cb_` + 43 url-safe characters (256 random bits): the prefix makes a leaked key easy
to recognise (secret scanners, logs). It is shown once, by `create_api_key`; the database holds
its digest, so a copy of the database file does not grant access. With 256 bits of entropy a
plain (unsalted) SHA-256 is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
import uuid
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.store.db import Database

KEY_PREFIX = "cb_"
_MAX_KEY_LENGTH = 200
# A key seen valid is trusted from memory this long at most (a key revoked by other means
# than `revoke_api_key`, e.g. SQL by hand); `revoke_api_key` itself invalidates at once.
CACHE_MAX_AGE_S = 60.0


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


# --- speed (issue 8 §4): every API request checks its key; not on the database thread ---
class KeyCache:
    """Keys seen valid, by digest, so that a request does not queue on the database thread
    behind commits. Any revocation empties it: `revoke_api_key` (run by the CLI, another
    process) rewrites `<database>.keys-revoked`, whose change time every look-up compares
    (one stat). Only valid keys are kept: a new key works at once."""

    def __init__(self, db: Database) -> None:
        self.marker = _revocation_marker(db)
        self._seen: dict[str, tuple[str, float]] = {}  # digest -> (key id, when checked)
        self._version = self._marker_version()

    def _marker_version(self) -> int:
        if self.marker is None:
            return 0
        try:
            return os.stat(self.marker).st_mtime_ns
        except FileNotFoundError:
            return 0

    @property
    def version(self) -> int:
        return self._version

    def get(self, digest: str) -> str | None:
        version = self._marker_version()
        if version != self._version:
            self._seen.clear()
            self._version = version
        found = self._seen.get(digest)
        if found is None or time.monotonic() - found[1] > CACHE_MAX_AGE_S:
            return None
        return found[0]

    def put(self, digest: str, key_id: str, version: int) -> None:
        """`version`: the marker's when the look-up started (a revocation meanwhile wins)."""
        if version == self._version == self._marker_version():
            self._seen[digest] = (key_id, time.monotonic())

    def revoked(self) -> None:
        self._seen.clear()


_caches: weakref.WeakKeyDictionary[Database, KeyCache] = weakref.WeakKeyDictionary()


def _cache(db: Database) -> KeyCache:
    cache = _caches.get(db)
    if cache is None:
        cache = _caches[db] = KeyCache(db)
    return cache


def _revocation_marker(db: Database) -> Path | None:
    return None if db.path is None else db.path.with_name(db.path.name + ".keys-revoked")


def _mark_revoked(db: Database) -> None:
    marker = _revocation_marker(db)
    if marker is not None:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{time.time_ns()} {secrets.token_hex(8)}\n".encode())
        finally:
            os.close(fd)
    _cache(db).revoked()


# --- end speed ---


async def api_key_id(db: Database, presented: str) -> str | None:
    """The id of `presented` if it is a key that exists and is not revoked, else None."""
    if not presented.startswith(KEY_PREFIX) or len(presented) > _MAX_KEY_LENGTH:
        return None
    digest = _digest(presented)
    cache = _cache(db)
    cached = cache.get(digest)
    if cached is not None:
        return cached
    version = cache.version
    row = await db.fetchone(
        "SELECT id, key_hash FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (digest,)
    )
    # The look-up is by digest, which an attacker cannot steer byte by byte; the constant-time
    # compare keeps the final check free of timing differences all the same.
    if row is None or not hmac.compare_digest(row["key_hash"], digest):
        return None
    cache.put(digest, str(row["id"]), version)
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
    if count > 0:
        _mark_revoked(db)  # a running daemon's KeyCache forgets every key it had seen
    return count > 0
