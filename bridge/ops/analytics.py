"""Transfer analytics: "what should we train the assistant on".

Per assistant and per destination over a time range: how often calls end up transferred, the
outcome mix, the median ring time, and what the callers said just before each transfer (their
last utterances in the transcript). Read from the calls, transfers and events the call store
keeps; nothing is precomputed.
"""

from __future__ import annotations

import json
import statistics
from datetime import UTC, datetime
from typing import Any

from bridge.calls.model import _iso
from bridge.store.db import Database

_FINAL = frozenset({"bridged", "failed", "cancelled", "handed_off"})
REASONS_PER_GROUP = 20  # most recent transfers whose caller words are listed
UTTERANCES = 2  # caller utterances kept before each transfer


def _ring_seconds(history: list[dict[str, Any]]) -> float | None:
    """From placing the leg (dialing) to its answer or failure."""
    start = next((h["at"] for h in history if h["state"] == "dialing"), None)
    end = next(
        (h["at"] for h in history if h["state"] in ("answered", "failed", "cancelled", "bridged")),
        None,
    )
    if start is None or end is None:
        return None
    seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    return seconds if seconds >= 0 else None


def _bound(value: datetime | None) -> str | None:
    """A range bound as the stored times are written (UTC, `Z`), compared as text: with its
    microseconds, so 00:00:00.5Z is not taken as earlier than 00:00:00Z ('.' < 'Z')."""
    if value is None:
        return None
    utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _group(key: str, name: str | None) -> dict[str, Any]:
    return {
        "id": key,
        "name": name,
        "calls": 0,
        "transfers": 0,
        "in_progress": 0,
        "answered": 0,
        "outcomes": {},
        "_ring": [],
        "reasons": [],
    }


def _finish(group: dict[str, Any], rate_of_calls: bool) -> dict[str, Any]:
    ring = group.pop("_ring")
    group["median_ring_seconds"] = _median(ring)
    settled = group["transfers"]
    group["answer_rate"] = round(group["answered"] / settled, 4) if settled else 0.0
    if rate_of_calls:
        calls = group["calls"]
        transferred = len(group.pop("_transferred_calls", set()))
        group["transfer_rate"] = round(transferred / calls, 4) if calls else 0.0
    else:
        group.pop("calls")
        group.pop("_transferred_calls", None)
    return group


async def transfer_analytics(
    db: Database,
    since: datetime | None,
    until: datetime | None,
    assistant_id: str | None = None,
) -> dict[str, Any]:
    after, before = _bound(since) or "", _bound(until) or "9999"
    only = " AND c.assistant_id = ?" if assistant_id else ""
    extra: tuple[Any, ...] = (assistant_id,) if assistant_id else ()
    calls, transfers = await db.read_batch(
        [
            (
                "SELECT c.assistant_id, json_extract(a.doc, '$.name') AS name, COUNT(*) AS n"
                " FROM calls c LEFT JOIN assistants a ON a.id = c.assistant_id"
                " WHERE c.started_at >= ? AND c.started_at < ? AND c.assistant_id IS NOT NULL"
                f"{only} GROUP BY c.assistant_id",
                (after, before, *extra),
            ),
            (
                "SELECT t.id, t.call_id, t.doc, t.state, t.outcome, t.created_at,"
                " c.assistant_id, json_extract(a.doc, '$.name') AS name"
                " FROM transfers t JOIN calls c ON c.id = t.call_id"
                " LEFT JOIN assistants a ON a.id = c.assistant_id"
                f" WHERE t.created_at >= ? AND t.created_at < ?{only}"
                " ORDER BY t.created_at DESC",
                (after, before, *extra),
            ),
        ]
    )
    per_assistant: dict[str, dict[str, Any]] = {}
    for r in calls:
        group = per_assistant.setdefault(r["assistant_id"], _group(r["assistant_id"], r["name"]))
        group["calls"] = int(r["n"])
    said = await _caller_words(db, [r for r in transfers][: REASONS_PER_GROUP * 10])
    per_destination: dict[str, dict[str, Any]] = {}
    for r in transfers:
        doc = json.loads(r["doc"])
        dest_key = doc.get("label") or doc["destination"]
        a = per_assistant.setdefault(
            r["assistant_id"] or "none", _group(r["assistant_id"] or "none", r["name"])
        )
        d = per_destination.setdefault(dest_key, _group(dest_key, doc.get("label")))
        d.setdefault("destination", doc["destination"])
        for group in (a, d):
            if r["state"] not in _FINAL:
                group["in_progress"] += 1
                continue
            group["transfers"] += 1
            outcome = r["outcome"] or r["state"]
            group["outcomes"][outcome] = group["outcomes"].get(outcome, 0) + 1
            if outcome == "answered":
                group["answered"] += 1
                group.setdefault("_transferred_calls", set()).add(r["call_id"])
            ring = _ring_seconds(doc.get("history", []))
            if ring is not None:
                group["_ring"].append(ring)
            if len(group["reasons"]) < REASONS_PER_GROUP:
                group["reasons"].append(
                    {
                        "call_id": r["call_id"],
                        "transfer_id": r["id"],
                        "at": r["created_at"],
                        "source": doc.get("source"),
                        "destination": dest_key,
                        "outcome": outcome,
                        "caller_said": said.get(r["id"], []),
                    }
                )
    return {
        "since": _iso(since),
        "until": _iso(until),
        "assistants": sorted(
            (_finish(g, True) for g in per_assistant.values()), key=lambda g: -g["calls"]
        ),
        "destinations": sorted(
            (_finish(g, False) for g in per_destination.values()), key=lambda g: -g["transfers"]
        ),
    }


async def _caller_words(db: Database, transfers: list[Any]) -> dict[str, list[str]]:
    """For each transfer: the caller's last utterances before it was requested."""
    if not transfers:
        return {}
    call_ids = sorted({r["call_id"] for r in transfers})
    marks = ",".join("?" * len(call_ids))
    rows = await db.fetchall(
        "SELECT call_id, at, data FROM call_events WHERE kind = 'transcript'"
        f" AND call_id IN ({marks}) AND json_extract(data, '$.role') = 'caller' ORDER BY seq",
        tuple(call_ids),
    )
    by_call: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        text = json.loads(r["data"]).get("text") or ""
        by_call.setdefault(r["call_id"], []).append((r["at"], text))
    out: dict[str, list[str]] = {}
    for t in transfers:
        before = [text for at, text in by_call.get(t["call_id"], []) if at <= t["created_at"]]
        out[t["id"]] = before[-UTTERANCES:]
    return out
