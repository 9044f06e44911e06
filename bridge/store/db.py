"""SQLite storage: one file, schema migrations by `PRAGMA user_version`.

aiosqlite runs sqlite3 in its own thread, so queries never block the event loop. Every write
commits at once: a daemon crash loses nothing that was acknowledged.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite

from bridge.log import get_logger

log = get_logger(__name__)

MIGRATIONS: list[str] = [
    # 1: the seed's objects, API keys, calls with their events and transfers.
    """
    CREATE TABLE assistants (
        id TEXT PRIMARY KEY,
        doc TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE trunks (
        id TEXT PRIMARY KEY,
        doc TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE numbers (
        id TEXT PRIMARY KEY,
        number TEXT NOT NULL UNIQUE,
        assistant_id TEXT REFERENCES assistants(id),
        transfer_trunk_id TEXT REFERENCES trunks(id),
        doc TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT,
        key_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE TABLE calls (
        id TEXT PRIMARY KEY,
        pbx TEXT NOT NULL,
        channel_id TEXT NOT NULL,
        status TEXT NOT NULL,
        number_id TEXT,
        number TEXT,
        assistant_id TEXT,
        caller_number TEXT,
        caller_name TEXT,
        started_at TEXT NOT NULL,
        answered_at TEXT,
        ended_at TEXT,
        end_reason TEXT
    );
    CREATE INDEX calls_status ON calls(status);
    CREATE INDEX calls_channel ON calls(channel_id);
    CREATE TABLE call_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        call_id TEXT NOT NULL REFERENCES calls(id),
        at TEXT NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX call_events_call ON call_events(call_id, seq);
    CREATE TABLE transfers (
        id TEXT PRIMARY KEY,
        call_id TEXT NOT NULL REFERENCES calls(id),
        doc TEXT NOT NULL,
        state TEXT NOT NULL,
        outcome TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX transfers_call ON transfers(call_id);
    """,
    # 2 (ops, issue 10): webhook subscriptions and their outbox. A delivery row is written in
    # the transaction of the call event it carries (bridge.ops.webhooks), so an event is never
    # lost nor sent before it is stored. The analytics read transfers by time.
    """
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        secret TEXT NOT NULL,
        description TEXT,
        enabled INTEGER NOT NULL DEFAULT 1,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE webhook_deliveries (
        id TEXT PRIMARY KEY,
        webhook_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        event TEXT NOT NULL,
        call_id TEXT,
        payload TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        last_status INTEGER,
        last_error TEXT,
        log TEXT NOT NULL DEFAULT '[]',
        created_at TEXT NOT NULL,
        delivered_at TEXT
    );
    CREATE INDEX webhook_deliveries_pending ON webhook_deliveries(status, webhook_id, created_at);
    CREATE INDEX webhook_deliveries_hook ON webhook_deliveries(webhook_id, created_at);
    CREATE INDEX transfers_created ON transfers(created_at);
    """,
]


class DatabaseRefused(Exception):
    """The database file cannot be trusted with trunk passwords (owned by another user)."""


def secure_file(path: Path) -> None:
    """Trunk passwords live in the database: readable and writable by the daemon's user only.

    A new file is created 0600 (its directory 0700 if we create it). An existing file (and its
    -wal/-shm companions) with group or other permissions is fixed to 0600 and logged; one that
    belongs to another user is refused, since we cannot make it private.
    """
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        path.touch(mode=0o600)
        os.chmod(path, 0o600)
        return
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            st = file.stat()
        except FileNotFoundError:
            continue
        if st.st_uid != os.geteuid():
            raise DatabaseRefused(
                f"database file {file} belongs to uid {st.st_uid}, not to the daemon's user"
                f" (uid {os.geteuid()}): refusing to keep trunk passwords in it"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            os.chmod(file, 0o600)
            log.warning("database.permissions_fixed", file=str(file), was=oct(mode), now=oct(0o600))


class Database:
    """An open SQLite file with the schema at the newest version."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, path: str | Path) -> Database:
        path = Path(path)
        if str(path) != ":memory:":
            secure_file(path)
        conn = await aiosqlite.connect(path)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA foreign_keys = ON")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA busy_timeout = 5000")
        db = cls(conn)
        await db.migrate()
        return db

    async def migrate(self) -> int:
        async with self.conn.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        for index, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await self.conn.executescript(
                f"BEGIN; {script}; PRAGMA user_version = {index}; COMMIT;"
            )
        return len(MIGRATIONS)

    async def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> int:
        """One statement, committed at once. Statement and commit run as ONE job on the
        connection's thread: no other job (a `transaction`, a read) runs in between."""

        def run(conn: sqlite3.Connection) -> int:
            try:
                cur = conn.execute(sql, params)
                conn.commit()
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
            return cur.rowcount

        return int(await self._job(run))

    async def _job(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `fn(sqlite3 connection)` as one job on aiosqlite's thread (its private
        `_execute`, stable since 0.17): nothing else runs on the connection meanwhile."""
        conn: Any = self.conn
        return await conn._execute(fn, conn._conn)

    async def transaction(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Run `statements` as one transaction (one commit): all are written or none.

        The batch runs as one job on the connection's thread, so no other query on this
        connection sees it half done (reads share the connection)."""
        if not statements:
            return

        def run(conn: sqlite3.Connection) -> None:
            try:
                conn.execute("BEGIN")
                for sql, params in statements:
                    conn.execute(sql, params)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        await self._job(run)

    async def read_batch(
        self, queries: list[tuple[str, tuple[Any, ...]]]
    ) -> list[list[sqlite3.Row]]:
        """Run several SELECTs as one job on the connection's thread: they see one state of
        the database (no transaction of ours can commit between them)."""

        def run(conn: sqlite3.Connection) -> list[list[sqlite3.Row]]:
            return [list(conn.execute(sql, params).fetchall()) for sql, params in queries]

        rows: list[list[sqlite3.Row]] = await self._job(run)
        return rows

    async def fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> aiosqlite.Row | None:
        async with self.conn.execute(sql, params) as cur:
            return await cur.fetchone()

    async def fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[aiosqlite.Row]:
        async with self.conn.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def close(self) -> None:
        await self.conn.close()
