"""Adapter-level behaviour, written once, run on Asterisk and on FreeSWITCH.

Each test drives the real daemon through its REST API, as an operator would: a caller
arrives and is greeted, a control transfer bridges the caller with the destination behind
the trunk, busy and no answer leave the caller with the assistant, a caller hanging up ends
the call, a dropped control connection loses no call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.speech.tts import FliteTts
from tests.behaviour.backends import Backend
from tests.support.daemon import Api, wait_for
from tests.support.flows import DESTINATION, DID, active_call, setup_directory, transfer_settled


@pytest.fixture
async def api(backend: Backend) -> AsyncIterator[Api]:
    daemon, client = await backend.start_daemon()
    backend.daemon = daemon  # type: ignore[attr-defined]
    try:
        yield client
    finally:
        try:
            await _end_calls(client)
        finally:
            await client.close()
            await daemon.stop()


async def _end_calls(api: Api) -> None:
    """Hang up what a test left up, so the next daemon on this PBX adopts nothing."""
    for status in ("active", "transferring", "transferred"):
        for call in (await api.ok("GET", f"/calls?status={status}"))["data"]:
            await api.request("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
    await wait_for(lambda: _no_live_calls(api), "the calls to end", 10)


async def _no_live_calls(api: Api) -> bool:
    calls = (await api.ok("GET", "/calls"))["data"]
    return all(c["status"] == "ended" for c in calls)


class _Trunk:
    """What setup_directory needs of a destination: the port its trunk points at."""

    def __init__(self, port: int) -> None:
        self.local_port = port


async def call_status(api: Api, call_id: str) -> str:
    return str((await api.ok("GET", f"/calls/{call_id}"))["status"])


async def event_types(api: Api, call_id: str) -> list[str]:
    return [e["type"] for e in (await api.ok("GET", f"/calls/{call_id}"))["events"]]


async def test_caller_is_attached_and_greeted(backend: Backend, api: Api) -> None:
    await setup_directory(api, None)
    caller = await backend.caller(DID)
    call = await active_call(api)
    assert call["number"] == DID
    assert call["caller_number"] == "sipp-caller"
    await caller.heard_speech(since=0)
    kinds = await event_types(api, call["id"])
    for kind in ("call.started", "call.answered", "media.attached", "assistant.said"):
        assert kind in kinds, kinds


async def test_control_transfer_bridges_caller_and_destination(backend: Backend, api: Api) -> None:
    dest = await backend.destination("answer")
    await setup_directory(api, _Trunk(dest.port), auth=False)  # type: ignore[arg-type]
    caller = await backend.caller(DID)
    call = await active_call(api)
    await caller.heard_speech(since=0)
    status, accepted = await api.request(
        "POST",
        f"/calls/{call['id']}/control",
        {"type": "transfer", "destination": DESTINATION, "message": "One moment please."},
    )
    assert status == 202, accepted
    done = await transfer_settled(api, call["id"])
    transfer = done["transfers"][-1]
    assert transfer["state"] == "bridged", transfer
    assert transfer["outcome"] == "answered"
    assert [h["state"] for h in transfer["history"]][:2] == ["announcing", "dialing"]
    assert done["status"] == "transferred"
    assert dest.invited(), "the destination behind the trunk got no INVITE for the number"
    await dest.assert_bridged(caller)


@pytest.mark.parametrize(("outcome", "sip_code"), [("busy", 486), ("no_answer", None)])
async def test_failed_transfer_keeps_the_caller_with_the_assistant(
    backend: Backend, api: Api, outcome: str, sip_code: int | None
) -> None:
    dest = await backend.destination(outcome)
    await setup_directory(api, _Trunk(dest.port), auth=False)  # type: ignore[arg-type]
    caller = await backend.caller(DID)
    call = await active_call(api)
    await caller.heard_speech(since=0)
    await api.ok(
        "POST",
        f"/calls/{call['id']}/control",
        {"type": "transfer", "destination": DESTINATION, "ring_timeout": 3},
    )
    done = await transfer_settled(api, call["id"])
    transfer = done["transfers"][-1]
    assert transfer["state"] == "failed", transfer
    assert transfer["outcome"] == outcome
    if sip_code is not None:
        assert transfer["sip_code"] in (sip_code, None)  # Asterisk may not report it
    # The caller is back with the assistant (the call's status follows the transfer's).
    await wait_for(lambda: _is_status(api, call["id"], "active"), "the call to be active")
    mark = caller.mark()
    await caller.heard_speech(since=mark)  # the assistant explains
    assert caller.connected()
    await api.ok(
        "POST", f"/calls/{call['id']}/control", {"type": "end_call", "message": "Goodbye."}
    )
    assert await caller.wait_bye()


async def test_caller_hangup_ends_the_call(backend: Backend, api: Api) -> None:
    await setup_directory(api, None)
    caller = await backend.caller(DID, hold_ms=3000)
    call = await active_call(api)
    await caller.hang_up()

    async def ended() -> dict[str, Any] | None:
        data = await api.ok("GET", f"/calls/{call['id']}")
        return data if data["status"] == "ended" else None

    final = await wait_for(ended, "the call to end")
    assert final["end_reason"] == "caller hung up"


async def test_dropped_connection_keeps_the_call(backend: Backend, api: Api) -> None:
    daemon = backend.daemon  # type: ignore[attr-defined]
    await setup_directory(api, None)
    caller = await backend.caller(DID)
    call = await active_call(api)
    await caller.heard_speech(since=0)

    backend.cut()
    await wait_for(lambda: _is(not daemon.calls.connected), "the daemon to see the drop", 5)
    await asyncio.sleep(1.0)  # an outage: the caller stays up meanwhile
    backend.restore()
    await wait_for(lambda: _is(daemon.calls.connected), "the reconnect", 15)

    assert await call_status(api, call["id"]) == "active"
    assert caller.connected()
    mark = caller.mark()
    await api.ok("POST", f"/calls/{call['id']}/control", {"type": "say", "message": "Still here."})
    await caller.heard_speech(since=mark)
    assert "call.resumed" in await event_types(api, call["id"])


async def _is(value: bool) -> bool:
    return value


async def _is_status(api: Api, call_id: str, status: str) -> bool:
    return await call_status(api, call_id) == status


async def test_assistant_transfers_on_the_callers_words(backend: Backend, api: Api) -> None:
    """The caller asks for sales in real (flite) speech; the offline assistant hears it, and
    its transfer_call takes the same path as a control transfer, to a bridge."""
    dest = await backend.destination("answer")
    await setup_directory(api, _Trunk(dest.port), auth=False)  # type: ignore[arg-type]
    caller = await backend.caller(DID)
    call = await active_call(api)
    await caller.heard_speech(since=caller.mark())
    await asyncio.sleep(3.5)  # let the greeting finish
    words = await FliteTts().synthesize("I'd like to talk to a human about my problem please.")
    await caller.speak(words + bytes(16000))
    done = await transfer_settled(api, call["id"], timeout=40)
    transfer = done["transfers"][-1]
    assert (transfer["source"], transfer["state"]) == ("assistant", "bridged"), transfer
    assert transfer["destination"] == DESTINATION
    assert dest.invited()
    roles = [e["role"] for e in done["events"] if e["type"] == "transcript"]
    assert roles[:3] == ["assistant", "caller", "tool_call"], roles
