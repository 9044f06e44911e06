"""Group commit on the database thread (issue 7 §8): transactions asked for while the thread
is busy commit together, each still all-or-nothing, durable when its caller resumes, and in
the order they were asked for. Real SQLite files; durability is checked through a second,
independent connection."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bridge.calls.model import Call, CallEvent, CallStatus, utcnow
from bridge.calls.store import CallStore, StoreChange
from bridge.store.db import Database


def other_connection(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path)


async def open_db(tmp_path: Path) -> tuple[Database, Path]:
    path = tmp_path / "g.sqlite3"
    db = await Database.open(path)
    await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v INTEGER)")
    return db, path


async def test_concurrent_transactions_are_all_committed_in_one_group(tmp_path: Path) -> None:
    db, path = await open_db(tmp_path)
    commits_before = db.stats.commits
    await asyncio.gather(
        *(db.transaction([("INSERT INTO t (k, v) VALUES (?, ?)", (f"k{i}", i))]) for i in range(50))
    )
    # Every caller resumed after its row was committed: another connection sees all 50.
    with other_connection(path) as other:
        assert other.execute("SELECT count(*) FROM t").fetchone()[0] == 50
    # All 50 were asked for before the thread took them: one commit, not 50.
    assert db.stats.commits - commits_before == 1
    assert db.stats.group_sizes[-1] == 50
    await db.close()


async def test_a_failing_statement_rolls_back_only_its_own_transaction(tmp_path: Path) -> None:
    db, path = await open_db(tmp_path)
    await db.transaction([("INSERT INTO t (k, v) VALUES ('taken', 0)", ())])
    results = await asyncio.gather(
        db.transaction(
            [
                ("INSERT INTO t (k, v) VALUES ('a1', 1)", ()),
                ("INSERT INTO t (k, v) VALUES ('a2', 2)", ()),
            ]
        ),
        db.transaction(
            [
                ("INSERT INTO t (k, v) VALUES ('b1', 1)", ()),
                ("INSERT INTO t (k, v) VALUES ('taken', 2)", ()),  # UNIQUE violation
            ]
        ),
        db.transaction([("INSERT INTO t (k, v) VALUES ('c1', 1)", ())]),
        return_exceptions=True,
    )
    assert results[0] is None
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert results[2] is None
    with other_connection(path) as other:
        keys = {row[0] for row in other.execute("SELECT k FROM t")}
    assert keys == {"taken", "a1", "a2", "c1"}  # b1 went with its failing sibling
    assert db.stats.group_sizes[-1] == 3  # they were one group
    await db.close()


async def test_a_lone_transaction_runs_without_savepoints_and_fails_whole(
    tmp_path: Path,
) -> None:
    """A group of one is the usual case; its statements are all the thread runs (each one a
    GIL hand-off), and a failure still leaves none of them written."""
    db, path = await open_db(tmp_path)
    await db.transaction([("INSERT INTO t (k, v) VALUES ('taken', 0)", ())])
    ran: list[str] = []
    # the statements SQLite is given, traced on the connection's own thread
    await db._job(lambda conn: conn.set_trace_callback(ran.append))
    await db.transaction(
        [("INSERT INTO t (k, v) VALUES ('a', 1)", ()), ("UPDATE t SET v = 2 WHERE k = 'a'", ())]
    )
    assert [sql.split()[0] for sql in ran] == ["BEGIN", "INSERT", "UPDATE", "COMMIT"]
    commits = len(db.stats.commit_ms)
    with pytest.raises(sqlite3.IntegrityError):
        await db.transaction(
            [
                ("INSERT INTO t (k, v) VALUES ('b', 1)", ()),
                ("INSERT INTO t (k, v) VALUES ('taken', 2)", ()),  # UNIQUE violation
            ]
        )
    assert len(db.stats.commit_ms) == commits  # nothing was committed
    await db.transaction([("INSERT INTO t (k, v) VALUES ('c', 3)", ())])
    with other_connection(path) as other:
        rows = dict(other.execute("SELECT k, v FROM t").fetchall())
    assert rows == {"taken": 0, "a": 2, "c": 3}  # b went with its failing statement
    await db._job(lambda conn: conn.set_trace_callback(None))
    await db.close()


async def test_transactions_apply_in_the_order_they_were_asked_for(tmp_path: Path) -> None:
    db, path = await open_db(tmp_path)
    await db.transaction([("INSERT INTO t (k, v) VALUES ('x', 0)", ())])
    await asyncio.gather(
        *(
            db.transaction(
                [
                    ("UPDATE t SET v = ? WHERE k = 'x'", (i,)),
                    ("INSERT INTO t (k, v) VALUES (?, ?)", (f"o{i}", i)),
                ]
            )
            for i in range(1, 21)
        )
    )
    with other_connection(path) as other:
        assert other.execute("SELECT v FROM t WHERE k = 'x'").fetchone()[0] == 20
        order = [row[0] for row in other.execute("SELECT v FROM t WHERE k LIKE 'o%' ORDER BY id")]
    assert order == list(range(1, 21))
    await db.close()


async def test_transactions_asked_for_while_a_group_runs_form_the_next(tmp_path: Path) -> None:
    db, path = await open_db(tmp_path)
    first = asyncio.ensure_future(db.transaction([("INSERT INTO t (k) VALUES ('g1')", ())]))
    await first
    second = await asyncio.gather(
        db.transaction([("INSERT INTO t (k) VALUES ('g2')", ())]),
        db.transaction([("INSERT INTO t (k) VALUES ('g3')", ())]),
    )
    assert second == [None, None]
    with other_connection(path) as other:
        assert other.execute("SELECT count(*) FROM t").fetchone()[0] == 3
    await db.close()


async def test_a_transaction_on_a_closed_database_fails_instead_of_hanging(
    tmp_path: Path,
) -> None:
    db, _ = await open_db(tmp_path)
    await db.close()
    with pytest.raises(ValueError):
        await db.transaction([("INSERT INTO t (k) VALUES ('late')", ())])


async def test_store_outbox_rows_commit_with_their_event_inside_a_group(tmp_path: Path) -> None:
    """A subscriber's in-transaction rows (the webhook outbox) are written with their event
    and rolled back with it, also when other calls' changes share the group commit."""
    db, path = await open_db(tmp_path)
    store = CallStore(db)

    def outbox(change: StoreChange) -> list[tuple[str, tuple[object, ...]]]:
        # e1's outbox row collides with an existing key: e1 must not be stored either.
        return [
            ("INSERT INTO t (k) VALUES (?)", ("taken" if e.kind == "e1" else f"outbox-{e.kind}",))
            for e in change.events
        ]

    store.subscribe(in_transaction=outbox)
    await db.execute("INSERT INTO t (k) VALUES ('taken')")
    calls = [Call(f"c{n}", "asterisk", f"ch{n}", CallStatus.ACTIVE, utcnow()) for n in range(3)]
    for call in calls:
        await store.save(call)
    results = await asyncio.gather(
        *(store.add_event(call.id, CallEvent(f"e{n}", utcnow())) for n, call in enumerate(calls)),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert db.stats.group_sizes[-1] == 3
    with other_connection(path) as other:
        outboxed = {row[0] for row in other.execute("SELECT k FROM t")}
        events = {row[0] for row in other.execute("SELECT kind FROM call_events")}
    assert outboxed == {"taken", "outbox-e0", "outbox-e2"}
    assert events == {"e0", "e2"}
    await db.close()
