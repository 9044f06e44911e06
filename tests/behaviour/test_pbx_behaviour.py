"""Adapter-level behaviour, written once, run on Asterisk and on FreeSWITCH.

Each test drives the real daemon through its REST API, as an operator would: a caller
arrives and is greeted, a control transfer bridges the caller with the destination behind
the trunk; busy, declined, unreachable, early media only and no answer leave the caller with
the assistant (who says so, with no ringback left behind: the fast-failure race); a caller
hanging up ends the call, during ringing too (the leg is cancelled); RTP keeps flowing to a
caller while the assistant is silent; a dropped control connection loses no call.
Tests wait on conditions, never on time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from bridge.lab.rtp import tone_pcm
from bridge.pbx.ports import LegOutcome
from bridge.speech.tts import FliteTts
from tests.behaviour.backends import Backend, ringback_heard, steady_run
from tests.support.daemon import Api, wait_for
from tests.support.flows import (
    DESTINATION,
    DID,
    active_call,
    setup_directory,
    transfer_in_state,
    transfer_settled,
    transfer_warm,
)


@pytest.fixture
async def api(backend: Backend) -> AsyncIterator[Api]:
    daemon, client = await backend.start_daemon()
    backend.daemon, backend.api = daemon, client  # type: ignore[attr-defined]
    try:
        yield client
    finally:
        try:  # the daemon of the moment: a test may have restarted it
            await _end_calls(backend.api)  # type: ignore[attr-defined]
        finally:
            await backend.api.close()  # type: ignore[attr-defined]
            await backend.daemon.stop()  # type: ignore[attr-defined]


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


# 603 is `declined` once bridge/calls/outcomes.py (contract 1) is merged; `rejected` before.
DECLINED = LegOutcome.DECLINED.value
FAILURES = [
    # (destination behaviour, transfer outcome, SIP code); the first three fail at once,
    # before or just as the ringback starts: the fast-failure race of issue 7
    pytest.param("busy", "busy", 486, id="busy-486"),
    pytest.param("declined", DECLINED, 603, id="declined-603"),
    pytest.param("unreachable", "unreachable", 404, id="unreachable-404"),
    pytest.param("early_media", "no_answer", None, id="early-media-183-only"),
    pytest.param("no_answer", "no_answer", None, id="no-answer"),
]


@pytest.mark.parametrize(("behaviour", "outcome", "sip_code"), FAILURES)
async def test_failed_transfer_keeps_the_caller_with_the_assistant(
    backend: Backend, api: Api, behaviour: str, outcome: str, sip_code: int | None
) -> None:
    dest = await backend.destination(behaviour)
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
    failed_at = caller.mark()
    transfer = done["transfers"][-1]
    assert transfer["state"] == "failed", transfer
    assert (transfer["outcome"], transfer["sip_code"]) == (outcome, sip_code), transfer
    assert dest.invited()
    # The caller is back with the assistant (the call's status follows the transfer's) ...
    await wait_for(lambda: _is_status(api, call["id"], "active"), "the call to be active")
    # ... and hears it say why, and no ringback any more (not merely "some audio": ringback
    # is audio too, and it is what a lost uuid_break leaves the caller with).
    await caller.heard_words(since=failed_at)
    await caller.no_ringback_after(failed_at)
    assert caller.connected()
    await api.ok(
        "POST", f"/calls/{call['id']}/control", {"type": "end_call", "message": "Goodbye."}
    )
    assert await caller.wait_bye()


async def test_caller_hangup_while_the_destination_rings_cancels_the_leg(
    backend: Backend, api: Api
) -> None:
    dest = await backend.destination("no_answer")
    await setup_directory(api, _Trunk(dest.port), auth=False)  # type: ignore[arg-type]
    caller = await backend.caller(DID, hold_ms=8000)
    call = await active_call(api)
    await api.ok(
        "POST",
        f"/calls/{call['id']}/control",
        {"type": "transfer", "destination": DESTINATION, "ring_timeout": 30},
    )

    async def ringing() -> bool:
        data = await api.ok("GET", f"/calls/{call['id']}")
        return bool(data["transfers"]) and data["transfers"][-1]["state"] == "ringing"

    await wait_for(ringing, "the destination to ring", 7)
    await caller.hang_up()
    final = await wait_for(lambda: _ended(api, call["id"]), "the call to end", 15)
    assert final["end_reason"] == "caller hung up", final
    transfer = final["transfers"][-1]
    assert (transfer["state"], transfer["outcome"]) == ("cancelled", "cancelled"), transfer
    await wait_for(lambda: _is(dest.cancelled()), "the ringing leg to be cancelled", 10)


async def test_rtp_keeps_flowing_while_the_assistant_is_silent(backend: Backend, api: Api) -> None:
    """Carriers hang up calls whose RTP stops (inactivity timers): once the greeting is over
    and nobody speaks, the caller still gets a packet every 20 ms."""
    await setup_directory(api, None)
    caller = await backend.caller(DID)
    await active_call(api)
    await caller.quiet(since=0)  # the greeting was spoken and has ended
    silent_from = caller.mark()
    frames = 100  # 2 s of silence, without one gap over 60 ms
    await wait_for(
        lambda: _is(steady_run(caller.packet_times(silent_from), frames)),
        f"{frames} consecutive packets (20 ms apart) while the assistant is silent",
        15,
    )


async def _ended(api: Api, call_id: str) -> dict[str, Any] | None:
    data = await api.ok("GET", f"/calls/{call_id}")
    return data if data["status"] == "ended" else None


async def test_end_call_without_a_message_hangs_up(backend: Backend, api: Api) -> None:
    """The adapter frees what it made for the call (`release`) and answers: it once had no
    release() on FreeSWITCH, and this request answered 500."""
    await setup_directory(api, None)
    caller = await backend.caller(DID)
    call = await active_call(api)
    status, body = await api.request("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
    assert status == 202, body
    final = await wait_for(lambda: _ended(api, call["id"]), "the call to end", 15)
    assert final["end_reason"] == "ended by command", final
    assert await caller.wait_bye()


async def test_caller_hangup_ends_the_call(backend: Backend, api: Api) -> None:
    await setup_directory(api, None)
    caller = await backend.caller(DID, hold_ms=3000)
    call = await active_call(api)
    await caller.hang_up()

    final = await wait_for(lambda: _ended(api, call["id"]), "the call to end")
    assert final["end_reason"] == "caller hung up"


async def test_dropped_connection_keeps_the_call(backend: Backend, api: Api) -> None:
    daemon = backend.daemon  # type: ignore[attr-defined]
    await setup_directory(api, None)
    caller = await backend.caller(DID)
    call = await active_call(api)
    await caller.heard_speech(since=0)

    backend.cut()
    await wait_for(lambda: _is(not daemon.calls.connected), "the daemon to see the drop", 5)
    assert backend.proxy is not None
    refused = backend.proxy.refused
    # An outage: the daemon's reconnects are turned away twice while the caller stays up.
    await wait_for(lambda: _is(backend.proxy.refused >= refused + 2), "reconnects refused", 15)
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
    await caller.quiet(since=0)  # the greeting is over: the assistant listens
    words = await FliteTts().synthesize("I'd like to talk to a human about my problem please.")
    await caller.speak(words + bytes(16000))
    done = await transfer_settled(api, call["id"], timeout=40)
    transfer = done["transfers"][-1]
    assert (transfer["source"], transfer["state"]) == ("assistant", "bridged"), transfer
    assert transfer["destination"] == DESTINATION
    assert dest.invited()
    roles = [e["role"] for e in done["events"] if e["type"] == "transcript"]
    assert roles[:3] == ["assistant", "caller", "tool_call"], roles


def test_ringback_detector() -> None:
    """The detector the no-ringback checks rely on: ringback yes, speech and silence no."""
    ring = (tone_pcm(440, 1.0, 0.2), tone_pcm(480, 1.0, 0.2))
    mixed = (np.frombuffer(ring[0], "<i2").astype(np.int32) + np.frombuffer(ring[1], "<i2")).astype(
        "<i2"
    )
    assert ringback_heard(mixed.tobytes())
    assert not ringback_heard(bytes(16000))
    assert not ringback_heard(tone_pcm(1000, 1.0))


# --- warm transfer (issue 9 §2) ----------------------------------------------------------------


async def warm_call(backend: Backend, api: Api, **fields: Any) -> tuple[Any, Any, str]:
    """A greeted caller, warm-transferred (`fields` as `transfer_warm`) to a destination that
    answers, once it has been briefed: (destination, caller, call id)."""
    dest = await backend.destination("answer")
    await setup_directory(api, _Trunk(dest.port), auth=False)  # type: ignore[arg-type]
    caller = await backend.caller(DID)
    call = await active_call(api)
    await caller.heard_speech(since=0)
    await transfer_warm(api, call["id"], **fields)
    await transfer_in_state(api, call["id"], "awaiting_accept", "failed")
    return dest, caller, call["id"]


@pytest.mark.parametrize(
    ("key", "state", "outcome"),
    [("1", "bridged", "answered"), ("2", "failed", DECLINED)],
    ids=["accepted-1", "declined-2"],
)
async def test_warm_transfer_holds_briefs_and_takes_the_agents_key(
    backend: Backend, api: Api, key: str, state: str, outcome: str
) -> None:
    """The caller hears music on hold, the answered destination the brief (on its own
    media), and its key decides: 1 bridges, 2 returns the caller to the assistant."""
    dest, caller, call_id = await warm_call(backend, api)
    assert dest.heard_brief(), "the destination did not hear the brief"
    await wait_for(caller.on_hold, "the caller on hold music", 10)
    mark = caller.mark()
    await dest.press(key)
    done = await transfer_settled(api, call_id)
    transfer = done["transfers"][-1]
    assert (transfer["state"], transfer["outcome"], transfer["mode"]) == (state, outcome, "warm")
    kinds = [e["type"] for e in done["events"]]
    assert ("transfer.warm_accepted" if key == "1" else "transfer.warm_declined") in kinds
    if state == "bridged":
        await dest.assert_bridged(caller)
    else:
        await wait_for(lambda: not caller.on_hold(), "the hold music to stop", 10)
        await caller.heard_words(since=mark)  # the assistant again
        assert done["status"] == "active"


async def test_warm_transfer_no_key_in_time_is_voicemail(backend: Backend, api: Api) -> None:
    """Answered, briefed, nobody presses a key: the leg is hung up, the music stops and the
    caller is back with the assistant (outcome `voicemail`)."""
    dest, caller, call_id = await warm_call(backend, api, brief="A caller.", accept_timeout=1)
    done = await transfer_settled(api, call_id)
    transfer = done["transfers"][-1]
    assert (transfer["state"], transfer["outcome"]) == ("failed", "voicemail"), transfer
    assert dest.heard_brief()
    await wait_for(dest.hung_up, "the leg hung up", 10)
    await wait_for(lambda: not caller.on_hold(), "the hold music to stop", 10)
    await caller.heard_words(since=caller.mark())


async def test_warm_caller_hanging_up_during_the_brief_leaves_no_leg(
    backend: Backend, api: Api
) -> None:
    dest, _caller, call_id = await warm_call(backend, api, accept_timeout=60)
    call = await api.ok("GET", f"/calls/{call_id}")
    assert await backend.legs_left(), "no leg while the destination is asked"
    await backend.drop_caller(call["channel_id"])

    async def ended() -> bool:
        return await call_status(api, call["id"]) == "ended"

    await wait_for(ended, "the call to end", 15)
    done = await api.ok("GET", f"/calls/{call['id']}")
    assert done["transfers"][-1]["state"] == "cancelled"
    await wait_for(dest.hung_up, "the leg hung up", 10)

    async def nothing_left() -> bool:
        return not await backend.legs_left()

    await wait_for(nothing_left, "no leg left in the PBX", 10)
