"""The call store's transactions: a call and its transfer change together, and concurrent
single writes never interleave with a transaction (one SQLite connection, one thread)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge.calls.model import Call, CallEvent, CallStatus, utcnow
from bridge.calls.store import CallStore
from bridge.calls.transfer import Transfer, TransferEvent
from bridge.pbx.ports import DialTarget, LegOutcome
from bridge.store.db import Database


def make_call(n: int) -> Call:
    return Call(f"c{n}", "asterisk", f"ch{n}", CallStatus.TRANSFERRING, utcnow())


def make_transfer(call: Call) -> Transfer:
    t = Transfer(f"t-{call.id}", call.id, "api", "+31612345678", DialTarget(number="+316"),
                 "bridge", 20)  # fmt: skip
    t.apply(TransferEvent.MESSAGE_DONE)
    return t


async def test_single_writes_and_transactions_interleave_safely(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "s.sqlite3")
    store = CallStore(db)
    calls = [make_call(n) for n in range(30)]
    for call in calls:
        await store.save(call)

    async def bridge(call: Call) -> None:
        transfer = make_transfer(call)
        transfer.apply(TransferEvent.LEG_ANSWERED)
        transfer.settle(TransferEvent.CONNECTED, LegOutcome.ANSWERED)
        call.status = CallStatus.TRANSFERRED
        await store.save_state(call, transfer, [CallEvent("transfer.completed", utcnow())])

    async def note(call: Call) -> None:
        await store.add_event(call.id, CallEvent("note", utcnow()))

    await asyncio.gather(*(f(c) for c in calls for f in (bridge, note)))
    for call in calls:
        found = await store.snapshot(call.id)
        assert found is not None
        stored, events, transfers = found
        assert stored.status is CallStatus.TRANSFERRED and transfers[0].state.value == "bridged"
        assert sorted(e.kind for e in events) == ["note", "transfer.completed"]
    await db.close()


async def test_a_failing_transaction_writes_nothing(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "s.sqlite3")
    store = CallStore(db)
    call = make_call(1)
    await store.save(call)
    call.status = CallStatus.TRANSFERRED
    transfer = make_transfer(call)
    transfer.call_id = "no-such-call"  # the foreign key refuses the transfer row
    with pytest.raises(Exception, match="FOREIGN KEY"):
        await store.save_state(call, transfer)
    stored = await store.get(call.id)
    assert stored is not None and stored.status is CallStatus.TRANSFERRING
    await store.add_event(call.id, CallEvent("after", utcnow()))  # the connection still works
    assert [e.kind for e in await store.events(call.id)] == ["after"]
    await db.close()
