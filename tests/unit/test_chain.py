"""Fallback chains and the extension check (issue 9 §3), on the real session and a real
SQLite store with the fake PBX: which attempt runs next, what the caller hears (one
announcement, the failure line once), what the record and the conversation get."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bridge.calls.model import CallStatus, TransferCommand
from bridge.calls.session import CallSession
from bridge.calls.store import StoreChange
from bridge.calls.transfer import TransferState
from bridge.directory.models import Assistant
from bridge.errors import PbxCommandFailed
from bridge.ops.webhooks import webhook_events
from bridge.pbx.ports import (
    ChannelHungUp,
    ConnectionRestored,
    DialTarget,
    ExtensionState,
    LegAnswered,
    LegFailed,
    LegRinging,
)
from tests.support.calls import CallEnv, FakePbx, open_env, until

FIRST, SECOND = "+31612345678", "+31687654321"
ANNOUNCEMENT = "Connecting you to sales, one moment please."


def assistant_with_chain(fallbacks: list[dict[str, Any]]) -> Assistant:
    now = datetime.now(UTC)
    return Assistant.model_validate(
        {
            "id": "a1",
            "name": "Acme",
            "created_at": now,
            "updated_at": now,
            "llm_config": {
                "tools": [
                    {
                        "type": "transfer_call",
                        "destinations": [
                            {
                                "number": FIRST,
                                "description": "Sales",
                                "message": ANNOUNCEMENT,
                                "fallbacks": fallbacks,
                            }
                        ],
                    }
                ]
            },
        }
    )


CHAIN = [
    {"type": "extension", "extension": "1001", "description": "Alice", "dtmf": "1"},
    {"number": SECOND, "description": "Sales overflow"},
]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[CallEnv]:
    env = await open_env(tmp_path)
    env.directory.assistant = assistant_with_chain(CHAIN)
    try:
        yield env
    finally:
        await env.close()


async def transfer_first(env: CallEnv, session: CallSession, **fields: Any) -> str:
    """The assistant's transfer to FIRST (its message, its fallbacks); returns its reply's
    transfer id once the first leg is placed."""
    command = TransferCommand(type="transfer", destination=FIRST, message=ANNOUNCEMENT, **fields)
    reply = await session.command(command, source="assistant", label="Sales")
    await until(lambda: env.pbx.verbs("originate"), "the first leg")
    return str(reply["transfer_id"])


def legs(env: CallEnv) -> list[tuple[str, DialTarget]]:
    return [(leg, target) for leg, target, _ in env.pbx.verbs("originate")]


async def next_leg(env: CallEnv, count: int) -> tuple[str, DialTarget]:
    await until(lambda: len(legs(env)) >= count, f"leg {count}")
    return legs(env)[count - 1]


async def stored(
    env: CallEnv, call_id: str, transfers: int, *, ended: bool = False
) -> dict[str, Any]:
    """The call once `transfers` attempts are stored and the last is final (`ended`: and the
    failed chain's record completed)."""

    async def check() -> dict[str, Any] | None:
        data = await env.stored(call_id)
        rows = data["transfers"]
        done = ("bridged", "failed", "cancelled")
        ok = len(rows) == transfers and rows[-1]["state"] in done
        ok = ok and (not ended or "transfer.attempts_ended" in kinds(data))
        return data if ok and data["status"] != "transferring" else None

    return await until(check, f"{transfers} attempts settled")


def results(env: CallEnv) -> list[tuple[Any, ...]]:
    return [entry for c in env.conversations for entry in c.log if entry[0] == "result"]


def kinds(data: dict[str, Any]) -> list[str]:
    return [e["type"] for e in data["events"]]


async def test_busy_then_the_next_answers_with_one_announcement(env: CallEnv) -> None:
    session = await env.arrive()
    chain_id = await transfer_first(env, session)
    leg1, target1 = await next_leg(env, 1)
    assert target1.number == FIRST
    await env.push(LegFailed(leg1, 17, "User busy", 486))
    leg2, target2 = await next_leg(env, 2)
    assert target2.endpoint == "1001"  # the first fallback, checked (available) then dialled
    assert ("1001",) in env.pbx.verbs("extension_state")
    await env.push(LegRinging(leg2))
    await env.push(LegAnswered(leg2))
    await until(lambda: env.pbx.verbs("send_dtmf"), "the fallback's own DTMF")
    assert env.pbx.verbs("send_dtmf") == [(leg2, "1")]
    data = await stored(env, session.call.id, 2)
    first, second = data["transfers"]
    assert (first["state"], first["outcome"]) == ("failed", "busy")
    assert (second["state"], second["outcome"]) == ("bridged", "answered")
    assert first["chain_id"] == second["chain_id"] == chain_id == first["id"]
    assert (first["attempt"], second["attempt"]) == (0, 1)
    assert second["label"] == "Alice" and second["message"] is None
    assert [a["outcome"] for a in second["attempts"]] == ["busy"]
    assert data["status"] == "transferred"
    # One announcement; never the assistant's failure line between attempts.
    assert env.tts.texts == [ANNOUNCEMENT]
    await until(lambda: results(env), "the conversation told")
    assert results(env) == [("result", TransferState.BRIDGED, CallStatus.TRANSFERRED, False)]
    assert kinds(data).count("transfer.attempt") == 2
    # The ringback of the first attempt stopped, the second's started.
    rings = [pid for _, tone, pid in env.pbx.verbs("play_tone") if tone == "ring"]
    assert rings == [f"cbring-{first['id']}", f"cbring-{second['id']}"]


async def test_all_fail_the_caller_is_back_once_knowing_every_attempt(env: CallEnv) -> None:
    env.pbx.extensions["1001"] = ExtensionState.OFFLINE
    changes: list[StoreChange] = []
    env.store.subscribe(
        lambda change: (
            changes.append(change)
            if any(e.kind == "transfer.attempts_ended" for e in change.events)
            else None
        )
    )
    session = await env.arrive()
    await transfer_first(env, session)
    leg1, _ = await next_leg(env, 1)
    await env.push(LegRinging(leg1))
    await env.push(LegFailed(leg1, 19, "No answer", 487))
    leg2, target2 = await next_leg(env, 2)
    assert target2.number == SECOND  # the offline extension was never dialled
    await env.push(LegFailed(leg2, 21, "Declined", 603))
    data = await stored(env, session.call.id, 3, ended=True)
    no_answer, offline, declined = data["transfers"]
    assert offline["skipped"] == "extension 1001 is offline (not registered): not rung"
    assert (offline["outcome"], offline["leg_id"] if "leg_id" in offline else None) == (
        "unreachable",
        None,
    )
    assert (no_answer["outcome"], declined["outcome"]) == ("no_answer", "declined")
    assert [a["outcome"] for a in declined["attempts"]] == ["no_answer", "unreachable", "declined"]
    assert [a["attempt"] for a in declined["attempts"]] == [0, 1, 2]
    assert data["status"] == "active"
    # Back with the assistant once: the failure line once, the conversation told once.
    await until(lambda: results(env), "the conversation told")
    await until(lambda: len(env.tts.texts) == 2, "the failure line")
    assert env.tts.texts == [ANNOUNCEMENT, env.settings.transfer.failure_message]
    assert results(env) == [("result", TransferState.FAILED, CallStatus.ACTIVE, True)]
    told = session.transfer
    assert told is not None and told.id == declined["id"]
    assert [a["outcome"] for a in told.result_for_assistant()["attempts"]] == [
        "no_answer",
        "unreachable",
        "declined",
    ]
    assert "transfer.skipped" in kinds(data) and "transfer.attempts_ended" in kinds(data)
    # Webhooks see it, with the chain's whole record (the store's funnel, contract 1).
    (hook,) = [p for k, p in webhook_events(changes[-1]) if k == "transfer.attempts_ended"]
    assert hook["data"]["attempts"] == 3 and len(hook["transfer"]["attempts"]) == 3


async def test_a_busy_first_extension_is_skipped_and_the_next_says_the_announcement(
    env: CallEnv,
) -> None:
    """Skipped before anything was said: the announcement goes with the first attempt that
    dials, and the caller hears it once."""
    env.pbx.extensions["1001"] = ExtensionState.BUSY
    session = await env.arrive()
    # Both are configured (as fallbacks of FIRST): an operator may start the chain there.
    command = TransferCommand(
        type="transfer", destination="extension:1001", message=ANNOUNCEMENT, fallbacks=[SECOND]
    )
    reply = await session.command(command)
    leg, target = await next_leg(env, 1)
    assert target.number == SECOND and len(legs(env)) == 1
    await env.push(LegAnswered(leg))
    data = await stored(env, session.call.id, 2)
    skipped, bridged = data["transfers"]
    assert skipped["id"] == reply["transfer_id"] and skipped["outcome"] == "busy"
    assert skipped["skipped"] == "extension 1001 is busy (on a call): not rung"
    assert bridged["state"] == "bridged" and bridged["message"] == ANNOUNCEMENT
    assert env.tts.texts == [ANNOUNCEMENT]


async def test_a_lone_offline_extension_is_not_rung_and_the_caller_stays(env: CallEnv) -> None:
    env.pbx.extensions["1001"] = ExtensionState.OFFLINE
    session = await env.arrive()
    await session.command(TransferCommand(type="transfer", destination="extension:1001"))
    await until(lambda: results(env), "the conversation told")
    assert env.pbx.verbs("originate") == []
    data = await env.stored(session.call.id)
    (transfer,) = data["transfers"]
    assert (transfer["outcome"], transfer["chain_id"]) == ("unreachable", None)
    assert data["status"] == "active"


async def test_a_fallback_the_policy_refuses_is_recorded_and_skipped(env: CallEnv) -> None:
    """allow_any is off: a fallback named in the command must be configured; it is refused
    (recorded with its rule) and the chain goes on to the next."""
    session = await env.arrive()
    await transfer_first(env, session, fallbacks=["+4930123456", SECOND])
    leg1, _ = await next_leg(env, 1)
    await env.push(LegFailed(leg1, 17, "User busy", 486))
    leg2, target2 = await next_leg(env, 2)
    assert target2.number == SECOND
    await env.push(LegFailed(leg2, 17, "User busy", 486))
    data = await stored(env, session.call.id, 2, ended=True)
    last = data["transfers"][-1]
    refused = last["attempts"][1]
    assert (refused["destination"], refused["outcome"]) == ("+4930123456", "refused")
    assert refused["rule"] == "assistant.destinations" and refused["transfer_id"] is None
    events = {e["type"]: e for e in data["events"]}
    assert events["transfer.refused"]["destination"] == "+4930123456"
    assert events["transfer.skipped"]["rule"] == "assistant.destinations"
    assert [a["attempt"] for a in last["attempts"]] == [0, 1, 2]


async def test_a_local_fault_ends_the_chain(env: CallEnv) -> None:
    session = await env.arrive()
    env.pbx.fail["originate"] = PbxCommandFailed("ARI 500: allocation failed")
    await transfer_first(env, session)
    data = await stored(env, session.call.id, 1, ended=True)
    (only,) = data["transfers"]
    assert only["local_fault"] and only["attempts"][0]["outcome"] == "failed"
    assert len(env.pbx.verbs("originate")) == 1  # the fallbacks were not tried
    assert data["status"] == "active"


async def test_the_chain_counts_as_one_transfer(env: CallEnv) -> None:
    env.settings.transfer.max_per_call = 1
    session = await env.arrive()
    await transfer_first(env, session)
    leg1, _ = await next_leg(env, 1)
    await env.push(LegFailed(leg1, 17, "User busy", 486))
    await next_leg(env, 2)  # the fallback is not refused by max_per_call = 1
    assert session.transfers_in_call == 1


async def test_a_restart_during_an_attempt_carries_the_chain_on(env: CallEnv) -> None:
    """The chain's state travels on the stored attempt: the new daemon resumes attempt 1
    and, when it fails, tries attempt 2 (not the start of the chain)."""
    session = await env.arrive()
    await transfer_first(env, session)
    leg1, _ = await next_leg(env, 1)
    await env.push(LegFailed(leg1, 17, "User busy", 486))
    leg2, _ = await next_leg(env, 2)
    await env.push(LegRinging(leg2))
    await until(lambda: session.transfer and session.transfer.rang, "ringing")
    await env.service.stop()
    pbx = FakePbx()
    env.pbx = pbx
    env.service = env.new_service(pbx)
    await env.service.start()
    await env.push(ConnectionRestored("", callers=(env.arrival(),), legs=((leg2, False),)))
    await until(lambda: session.call.id in env.service._by_id, "resumed")
    resumed = env.service._by_id[session.call.id]
    assert resumed.transfers_in_call == 1  # two attempts stored, one transfer
    await env.push(LegFailed(leg2, 17, "User busy", 486))
    leg3, target3 = await next_leg(env, 1)
    assert target3.number == SECOND
    await env.push(LegAnswered(leg3))
    data = await stored(env, session.call.id, 3)
    assert [t["attempt"] for t in data["transfers"]] == [0, 1, 2]
    assert data["transfers"][-1]["state"] == "bridged"


async def test_a_blind_default_bridges_a_chain_and_an_explicit_blind_has_none(
    env: CallEnv,
) -> None:
    env.settings.transfer.mode = "blind"
    session = await env.arrive()
    await transfer_first(env, session)  # configured fallbacks: bridged, to see each outcome
    assert session.transfer is not None and session.transfer.mode == "bridge"
    assert session.transfer.chain_id == session.transfer.id
    leg1, _ = await next_leg(env, 1)
    await env.push(LegFailed(leg1, 17, "User busy", 486))
    await next_leg(env, 2)
    await env.push(ChannelHungUp("ch1", 16, None))
    await env.wait_status(session.call.id, CallStatus.ENDED)
    other = await env.arrive("ch2")
    await other.command(TransferCommand(type="transfer", destination=FIRST, mode="blind"))
    await until(lambda: env.pbx.verbs("blind_transfer"), "the blind hand-off")
    assert other.transfer is not None and other.transfer.chain_id is None
