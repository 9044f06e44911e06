"""Persistence of calls, their event log and their transfers."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bridge.calls.model import Call, CallEvent, CallStatus, _iso
from bridge.calls.transfer import FINAL_STATES, Transfer, transfer_from_doc, transfer_to_doc
from bridge.log import get_logger
from bridge.store.db import Database

_CALL_COLUMNS = (
    "id, pbx, channel_id, status, number_id, number, assistant_id, caller_number, caller_name,"
    " started_at, answered_at, ended_at, end_reason"
)


_FINAL = frozenset(s.value for s in FINAL_STATES)


def _save_call(call: Call) -> tuple[str, tuple[Any, ...]]:
    return (
        f"INSERT INTO calls ({_CALL_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT(id) DO UPDATE SET status=excluded.status,"
        " answered_at=excluded.answered_at, ended_at=excluded.ended_at,"
        " end_reason=excluded.end_reason",
        (
            call.id,
            call.pbx,
            call.channel_id,
            call.status.value,
            call.number_id,
            call.number,
            call.assistant_id,
            call.caller_number,
            call.caller_name,
            _iso(call.started_at),
            _iso(call.answered_at),
            _iso(call.ended_at),
            call.end_reason,
        ),
    )


def _save_transfer(transfer: Transfer) -> tuple[str, tuple[Any, ...]]:
    return (
        "INSERT INTO transfers (id, call_id, doc, state, outcome, created_at, updated_at)"
        " VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET doc=excluded.doc,"
        " state=excluded.state, outcome=excluded.outcome, updated_at=excluded.updated_at",
        (
            transfer.id,
            transfer.call_id,
            json.dumps(transfer_to_doc(transfer)),
            transfer.state.value,
            transfer.outcome.value if transfer.outcome else None,
            _iso(transfer.created_at),
            _iso(transfer.updated_at),
        ),
    )


def _add_event(call_id: str, event: CallEvent) -> tuple[str, tuple[Any, ...]]:
    return (
        "INSERT INTO call_events (call_id, at, kind, data) VALUES (?,?,?,?)",
        (call_id, _iso(event.at), event.kind, json.dumps(event.data)),
    )


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _row_to_call(row: Any) -> Call:
    return Call(
        id=row["id"],
        pbx=row["pbx"],
        channel_id=row["channel_id"],
        status=CallStatus(row["status"]),
        number_id=row["number_id"],
        number=row["number"],
        assistant_id=row["assistant_id"],
        caller_number=row["caller_number"],
        caller_name=row["caller_name"],
        started_at=datetime.fromisoformat(row["started_at"]),
        answered_at=_dt(row["answered_at"]),
        ended_at=_dt(row["ended_at"]),
        end_reason=row["end_reason"],
    )


Statement = tuple[str, tuple[Any, ...]]


@dataclass(frozen=True)
class StoreChange:
    """What one commit of the store writes: a call, a transfer and/or events of one call."""

    call_id: str | None
    call: Call | None = None
    transfer: Transfer | None = None
    events: tuple[CallEvent, ...] = field(default_factory=tuple)


# In-transaction subscribers return extra statements committed WITH the change (an outbox row
# exists exactly when its event does); after-commit subscribers see changes that are durable.
InTransaction = Callable[[StoreChange], list[Statement]]
AfterCommit = Callable[[StoreChange], None]

_log = get_logger(__name__)


class CallStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._in_transaction: list[InTransaction] = []
        self._after_commit: list[AfterCommit] = []

    # --- the single funnel of call writes (contract 1): every write below goes through
    # `_commit`, which lets subscribers add statements to its transaction and see it after.

    def subscribe(
        self,
        after_commit: AfterCommit | None = None,
        *,
        in_transaction: InTransaction | None = None,
    ) -> None:
        if in_transaction is not None:
            self._in_transaction.append(in_transaction)
        if after_commit is not None:
            self._after_commit.append(after_commit)

    async def _commit(self, statements: list[Statement], change: StoreChange) -> None:
        for hook in self._in_transaction:
            statements.extend(hook(change))
        await self.db.transaction(statements)
        for seen in self._after_commit:
            try:
                seen(change)
            except Exception:  # an observer (metrics) never fails a call's write
                _log.exception("store.subscriber_failed")

    async def save(self, call: Call) -> None:
        await self._commit([_save_call(call)], StoreChange(call.id, call=call))

    async def save_state(
        self,
        call: Call | None = None,
        transfer: Transfer | None = None,
        events: list[CallEvent] | None = None,
        *,
        call_id: str | None = None,
    ) -> None:
        """Save a call, its transfer and events in ONE transaction: the API never sees a call
        and its transfer disagree (e.g. transfer bridged, call still transferring)."""
        statements: list[tuple[str, tuple[Any, ...]]] = []
        if call is not None:
            statements.append(_save_call(call))
        if transfer is not None:
            statements.append(_save_transfer(transfer))
        owner = call.id if call is not None else call_id
        if owner is None and transfer is not None:
            owner = transfer.call_id
        for event in events or ():
            assert owner is not None, "events need a call id"
            statements.append(_add_event(owner, event))
        change = StoreChange(owner, call, transfer, tuple(events or ()))
        await self._commit(statements, change)

    async def snapshot(self, call_id: str) -> tuple[Call, list[CallEvent], list[Transfer]] | None:
        """A call with its events and transfers, read together (one consistent state)."""
        calls, events, transfers = await self.db.read_batch(
            [
                (f"SELECT {_CALL_COLUMNS} FROM calls WHERE id = ?", (call_id,)),
                (
                    "SELECT at, kind, data FROM call_events WHERE call_id = ? ORDER BY seq",
                    (call_id,),
                ),
                ("SELECT doc FROM transfers WHERE call_id = ? ORDER BY created_at", (call_id,)),
            ]
        )
        if not calls:
            return None
        return (
            _row_to_call(calls[0]),
            [
                CallEvent(r["kind"], datetime.fromisoformat(r["at"]), json.loads(r["data"]))
                for r in events
            ],
            [transfer_from_doc(json.loads(r["doc"])) for r in transfers],
        )

    async def find_by_channel(self, pbx: str, channel_id: str) -> Call | None:
        """The newest call record of a PBX channel (ended or not)."""
        row = await self.db.fetchone(
            f"SELECT {_CALL_COLUMNS} FROM calls WHERE pbx = ? AND channel_id = ?"
            " ORDER BY started_at DESC LIMIT 1",
            (pbx, channel_id),
        )
        return _row_to_call(row) if row else None

    async def get(self, call_id: str) -> Call | None:
        row = await self.db.fetchone(f"SELECT {_CALL_COLUMNS} FROM calls WHERE id = ?", (call_id,))
        return _row_to_call(row) if row else None

    async def unfinished(self, pbx: str) -> list[Call]:
        rows = await self.db.fetchall(
            f"SELECT {_CALL_COLUMNS} FROM calls WHERE status != 'ended' AND pbx = ?", (pbx,)
        )
        return [_row_to_call(r) for r in rows]

    async def add_event(self, call_id: str, event: CallEvent) -> None:
        await self._commit([_add_event(call_id, event)], StoreChange(call_id, events=(event,)))

    async def events(self, call_id: str) -> list[CallEvent]:
        rows = await self.db.fetchall(
            "SELECT at, kind, data FROM call_events WHERE call_id = ? ORDER BY seq", (call_id,)
        )
        return [
            CallEvent(r["kind"], datetime.fromisoformat(r["at"]), json.loads(r["data"]))
            for r in rows
        ]

    async def save_transfer(self, transfer: Transfer) -> None:
        await self._commit(
            [_save_transfer(transfer)], StoreChange(transfer.call_id, transfer=transfer)
        )

    async def count_transfers(self, call_id: str) -> int:
        """How many transfers a call has had (the per-call cap is the policy's)."""
        row = await self.db.fetchone(
            "SELECT COUNT(*) AS n FROM transfers WHERE call_id = ?", (call_id,)
        )
        return int(row["n"]) if row else 0

    async def transfers(self, call_id: str) -> list[Transfer]:
        rows = await self.db.fetchall(
            "SELECT doc FROM transfers WHERE call_id = ? ORDER BY created_at", (call_id,)
        )
        return [transfer_from_doc(json.loads(r["doc"])) for r in rows]

    async def transfer_stats(self, since: datetime | None) -> dict[str, Any]:
        """Transfer counts since `since`: overall, per outcome, per source, per destination."""
        after = _iso(since) or ""
        calls = await self.db.fetchone(
            "SELECT COUNT(*) AS n FROM calls WHERE started_at >= ? AND assistant_id IS NOT NULL",
            (after,),
        )
        rows = await self.db.fetchall(
            "SELECT call_id, json_extract(doc, '$.destination') AS destination,"
            " json_extract(doc, '$.source') AS source, state, outcome,"
            " json_extract(doc, '$.local_fault') AS local_fault"
            " FROM transfers WHERE created_at >= ?",
            (after,),
        )
        by_outcome: dict[str, int] = {}
        by_source: dict[str, int] = {}
        per_dest: dict[str, dict[str, Any]] = {}
        in_progress = 0
        local_faults = 0
        final = []
        for r in rows:
            if r["state"] not in _FINAL:
                in_progress += 1  # not an outcome (yet): reported apart
                continue
            final.append(r)
            outcome = r["outcome"] or r["state"]
            by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
            by_source[r["source"]] = by_source.get(r["source"], 0) + 1
            dest = per_dest.setdefault(
                r["destination"],
                {
                    "destination": r["destination"],
                    "attempts": 0,
                    "answered": 0,
                    "local_faults": 0,
                    "outcomes": {},
                },
            )
            if r["local_fault"]:
                # Our PBX or daemon failed: not an attempt on the destination.
                local_faults += 1
                dest["local_faults"] += 1
                continue
            dest["attempts"] += 1
            dest["answered"] += outcome == "answered"
            dest["outcomes"][outcome] = dest["outcomes"].get(outcome, 0) + 1
        for dest in per_dest.values():
            attempts = dest["attempts"]
            dest["answer_rate"] = round(dest["answered"] / attempts, 4) if attempts else 0.0
        n_calls = int(calls["n"]) if calls else 0
        transferred = {r["call_id"] for r in final if r["outcome"] == "answered"}
        return {
            "since": _iso(since),
            "calls": n_calls,
            "transfers": len(final),  # settled ones; `in_progress` are still under way
            "in_progress": in_progress,
            "local_faults": local_faults,  # failed in our own PBX or daemon (in `failed`)
            # Share of the assistant's calls that ended up with a human: the number to watch
            # when training the assistant not to over-transfer.
            "transfer_rate": round(len(transferred) / n_calls, 4) if n_calls else 0.0,
            "by_outcome": by_outcome,
            "by_source": by_source,
            "by_destination": sorted(per_dest.values(), key=lambda d: -d["attempts"]),
        }

    # Last in the class: a method named `list` shadows the builtin in later annotations.
    async def list(self, status: CallStatus | None = None, limit: int = 100) -> list[Call]:
        if status is None:
            rows = await self.db.fetchall(
                f"SELECT {_CALL_COLUMNS} FROM calls ORDER BY started_at DESC LIMIT ?", (limit,)
            )
        else:
            rows = await self.db.fetchall(
                f"SELECT {_CALL_COLUMNS} FROM calls WHERE status = ?"
                " ORDER BY started_at DESC LIMIT ?",
                (status.value, limit),
            )
        return [_row_to_call(r) for r in rows]
