"""SQLite storage: one file, schema migrations by `PRAGMA user_version`.

aiosqlite runs sqlite3 in its own thread, so queries never block the event loop. Every write
is committed before its caller resumes: a daemon crash loses nothing that was acknowledged.

Settings and what they risk: `journal_mode = WAL` (readers never wait for the writer; a
commit appends to the -wal file) and `synchronous` left at SQLite's default FULL (the WAL is
fsynced at every commit, so an acknowledged write survives a power loss or OS crash too).
`synchronous = NORMAL` would drop that fsync (0.65 ms idle on this machine's disk, tens of ms
when other processes write): still safe against a daemon crash and never corrupt, but an OS
crash or power loss could lose the last acknowledged call events. We keep FULL and amortise the
fsync instead: concurrent transactions share one commit (`Database.transaction`, group
commit).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from bridge import timing
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


def _run_group(
    conn: sqlite3.Connection,
    group: list[list[tuple[str, tuple[Any, ...]]]],
    stats: DbStats,
) -> list[BaseException | None]:
    """Run each transaction of `group` in its own SAVEPOINT inside one SQLite transaction and
    commit once; return each one's error (None: committed). Runs on the connection's thread.

    A group of one (the usual case below a few commits per second) needs no SAVEPOINT: its
    failure rolls back the whole transaction, which is all it holds. Every statement costs a
    GIL hand-off on this thread (sqlite3 releases the GIL around each step), each up to the
    interpreter's switch interval while the event loop runs Python (see `bridge.eventloop`)."""
    errors: list[BaseException | None] = [None] * len(group)
    written: list[int] = []  # in the open transaction, waiting for the COMMIT
    alone = len(group) == 1
    conn.execute("BEGIN")
    for index, statements in enumerate(group):
        try:
            if not alone:
                conn.execute("SAVEPOINT tx")
            for sql, params in statements:
                conn.execute(sql, params)
            if not alone:
                conn.execute("RELEASE tx")
            written.append(index)
        except Exception as exc:
            errors[index] = exc
            if conn.in_transaction and alone:
                conn.execute("ROLLBACK")  # all it held
                return errors
            if conn.in_transaction:
                conn.execute("ROLLBACK TO tx")  # this transaction's statements only
                conn.execute("RELEASE tx")
            else:
                # SQLite rolled the whole transaction back (e.g. disk full, I/O error): the
                # ones before it are gone too; say so to their callers.
                for lost in written:
                    errors[lost] = exc
                written = []
                conn.execute("BEGIN")
    committing = time.monotonic()
    try:
        conn.execute("COMMIT")
        stats.commit_ms.append((time.monotonic() - committing) * 1000)
    except BaseException as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        for lost in written:
            errors[lost] = exc
        return errors
    stats.commits += 1
    stats.transactions += len(written)
    stats.group_sizes.append(len(group))
    return errors


SAMPLES = 20_000  # the newest jobs' figures kept for `db.stats`


@dataclass
class DbStats:
    """What the connection's thread did (`db.stats` in the log at stop): jobs' wait for the
    thread and run time, jobs in flight when one was asked for, commits and group sizes."""

    commits: int = 0
    transactions: int = 0
    depth: int = 0
    depth_seen: deque[int] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    wait_ms: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    run_ms: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    # Of `run_ms`: the job's own time on the thread, and the COMMIT (its WAL fsync). The rest
    # of `run_ms` is the hand-back to the event loop.
    work_ms: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    commit_ms: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    group_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    since: float = field(default_factory=time.monotonic)

    def summary(self) -> dict[str, Any]:
        def pct(values: Iterable[float], q: float) -> float | None:
            ordered = sorted(values)
            if not ordered:
                return None
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

        seconds = max(time.monotonic() - self.since, 1e-9)
        return {
            "jobs_sampled": len(self.wait_ms),
            "commits": self.commits,
            "transactions": self.transactions,
            "commits_per_s": round(self.commits / seconds, 1),
            "wait_ms_p50": pct(self.wait_ms, 0.5),
            "wait_ms_p95": pct(self.wait_ms, 0.95),
            "wait_ms_max": max(self.wait_ms, default=None),
            "run_ms_p50": pct(self.run_ms, 0.5),
            "run_ms_p95": pct(self.run_ms, 0.95),
            "run_ms_max": max(self.run_ms, default=None),
            "work_ms_p50": pct(self.work_ms, 0.5),
            "work_ms_p95": pct(self.work_ms, 0.95),
            "commit_ms_p50": pct(self.commit_ms, 0.5),
            "commit_ms_p95": pct(self.commit_ms, 0.95),
            "commit_ms_max": max(self.commit_ms, default=None),
            "depth_p95": pct([float(d) for d in self.depth_seen], 0.95),
            "depth_max": max(self.depth_seen, default=None),
            "group_p95": pct([float(g) for g in self.group_sizes], 0.95),
            "group_max": max(self.group_sizes, default=None),
        }


class Database:
    """An open SQLite file with the schema at the newest version."""

    def __init__(self, conn: aiosqlite.Connection, path: Path | None = None) -> None:
        self.conn = conn
        self.path = path  # None: in memory
        self.stats = DbStats()
        self._pending: list[tuple[list[tuple[str, tuple[Any, ...]]], Any]] = []
        self._pending_lock = threading.Lock()  # the loop adds, the connection's thread takes
        self._flush_scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()

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
        db = cls(conn, None if str(path) == ":memory:" else path)
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
            self.stats.commits += 1
            return cur.rowcount

        return int(await self._job(run))

    async def _job(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `fn(sqlite3 connection)` as one job on aiosqlite's thread (its private
        `_execute`, stable since 0.17): nothing else runs on the connection meanwhile.

        Timed: the wait for the thread (jobs queued before it) and the run, both added to
        the span of the command being handled (`bridge.timing`) and to `stats`."""
        conn: Any = self.conn
        stats = self.stats
        submitted = time.monotonic()
        stats.depth += 1
        stats.depth_seen.append(stats.depth)
        ran: list[float] = []

        def timed(raw: sqlite3.Connection) -> Any:
            ran.append(time.monotonic())
            try:
                return fn(raw)
            finally:
                stats.work_ms.append((time.monotonic() - ran[0]) * 1000)

        try:
            return await conn._execute(timed, conn._conn)
        finally:
            stats.depth -= 1
            done = time.monotonic()
            started = ran[0] if ran else done
            stats.wait_ms.append((started - submitted) * 1000)
            stats.run_ms.append((done - started) * 1000)
            timing.add("db_wait", (started - submitted) * 1000)
            timing.add("db_run", (done - started) * 1000)

    async def transaction(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Run `statements` as one transaction: all are written or none, and when this
        returns they are committed (durable: `synchronous` stays FULL).

        Group commit (issue 7 §8): transactions asked for while the connection's thread is
        busy wait in `_pending`; the next job on the thread runs all of them in ONE SQLite
        transaction, each inside its own SAVEPOINT, and commits once (one WAL fsync for the
        group instead of one each). A transaction whose statement fails is rolled back to its
        savepoint alone and its caller gets the error; the others commit. They run in the
        order they were asked for, and the batch is one job on the thread, so no read on
        this connection sees any of them half done. If the COMMIT itself fails, every
        transaction of the group fails (none is written)."""
        if not statements:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        with self._pending_lock:
            self._pending.append((statements, done))
            schedule = not self._flush_scheduled
            self._flush_scheduled = True
        if schedule:
            task = loop.create_task(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        # The flush runs in its own task: a caller cancelled here does not stop the others'
        # commit (its own transaction may still be written, as before group commit).
        await done

    def _take_pending(self) -> list[tuple[list[tuple[str, tuple[Any, ...]]], Any]]:
        with self._pending_lock:
            batch, self._pending = self._pending, []
            self._flush_scheduled = False
        return batch

    async def _flush(self) -> None:
        taken: list[tuple[list[tuple[str, tuple[Any, ...]]], Any]] = []

        def run(conn: sqlite3.Connection) -> list[BaseException | None]:
            # Taken on the thread, when it is free: everything asked for until now.
            taken.extend(self._take_pending())
            return _run_group(conn, [statements for statements, _ in taken], self.stats)

        try:
            errors = await self._job(run)
        except BaseException as exc:  # the connection is closed or its thread is gone
            if not taken:
                taken.extend(self._take_pending())
            errors = [exc] * len(taken)
        for (_, future), error in zip(taken, errors, strict=True):
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    async def read_batch(
        self, queries: list[tuple[str, tuple[Any, ...]]]
    ) -> list[list[sqlite3.Row]]:
        """Run several SELECTs as one job on the connection's thread: they see one state of
        the database (no transaction of ours can commit between them)."""

        def run(conn: sqlite3.Connection) -> list[list[sqlite3.Row]]:
            return [list(conn.execute(sql, params).fetchall()) for sql, params in queries]

        rows: list[list[sqlite3.Row]] = await self._job(run)
        return rows

    # One job on the connection's thread per read (aiosqlite's cursor API takes three: execute,
    # fetch, close, each queued behind whatever the thread has to do).
    async def fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> aiosqlite.Row | None:
        def run(conn: sqlite3.Connection) -> Any:
            return conn.execute(sql, params).fetchone()

        row: aiosqlite.Row | None = await self._job(run)
        return row

    async def fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[aiosqlite.Row]:
        def run(conn: sqlite3.Connection) -> Any:
            return list(conn.execute(sql, params).fetchall())

        rows: list[aiosqlite.Row] = await self._job(run)
        return rows

    async def close(self) -> None:
        await self.conn.close()
