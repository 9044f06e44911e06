"""Warm transfer (issue 9 §2) on the real Asterisk, SIPp peers and real audio.

The caller (SIPp + RtpPeer) is transferred warm through the number's trunk to a SIPp UAS whose
media is a Python RtpPeer (the agent's phone): it presses keys as RFC 4733 telephone-events.
What each side heard is checked by content: the lab's music on hold is a steady LAB_MOH_HZ
tone (dialplan/musiconhold.conf), which ringback (440+480 Hz), speech and silence are not;
the brief is flite speech.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.lab.asterisk import LAB_MOH_HZ
from bridge.lab.rtp import (
    RtpPeer,
    band_share,
    dominant_frequency,
    ringback_windows,
    rms,
    speech_like,
)
from tests.integration.test_asterisk_transfer import daemon_api  # noqa: F401 (fixture)
from tests.support.daemon import Api, start_daemon, wait_for
from tests.support.flows import (
    LabCall,
    heard_speech,
    setup_directory,
    transfer_in_state,
    transfer_settled,
    transfer_warm,
)

pytestmark = pytest.mark.asterisk

BRIEF = "Caller Jane Doe asks about invoice forty two. She is a premium customer."
WINDOW_BYTES = 8000  # 0.5 s of 8 kHz 16-bit PCM


def hold_music_only(pcm: bytes) -> bool:
    """Every 0.5 s of `pcm` is the lab's hold music: loud, nearly all of it at LAB_MOH_HZ
    (speech mixed in, ringback or silence would fail a window)."""
    windows = [
        pcm[i : i + WINDOW_BYTES] for i in range(0, len(pcm) - WINDOW_BYTES + 1, WINDOW_BYTES)
    ]
    return bool(windows) and all(
        rms(w) > 300 and band_share(w, (LAB_MOH_HZ,)) > 0.8 for w in windows
    )


def events(call: dict[str, Any]) -> list[str]:
    return [e["type"] for e in call["events"]]


def leftovers(lab: Any) -> list[str]:
    """Transfer legs, their media channels and bridges still in Asterisk."""
    _, channels = lab.ari("GET", "/channels")
    _, bridges = lab.ari("GET", "/bridges")
    return [c["id"] for c in channels if "cbleg-" in c["id"]] + [
        b["id"] for b in bridges if "cbleg-" in b["id"]
    ]


class WarmCall:
    """A call in, greeted, then transferred warm; the caller and agent RtpPeers to check."""

    def __init__(self, lab_call: LabCall, call: dict[str, Any]) -> None:
        self.lab_call = lab_call
        self.call = call
        self.caller: RtpPeer = lab_call.caller_rtp
        self.agent: RtpPeer = lab_call.dest_rtp


@pytest.fixture
async def warm(asterisk_lab: Any, daemon_api: Any) -> AsyncIterator[Any]:  # noqa: F811
    """`await warm(**fields)`: a greeted call, transferred warm with `fields`; the UAS
    rings 2.5 s before it answers (the hold music is heard meanwhile)."""
    _, api = daemon_api
    async with LabCall(asterisk_lab, api, ring_ms=2500) as lab_call:
        await setup_directory(api, lab_call.uas, auth=False)

        async def start(**fields: Any) -> WarmCall:
            call = await lab_call.dial(hold_ms=60000)
            await heard_speech(lab_call.caller_rtp, since=0)  # the greeting
            await transfer_warm(api, call["id"], **{"brief": BRIEF, **fields})
            return WarmCall(lab_call, call)

        yield start
    await wait_for(lambda: not leftovers(asterisk_lab), "no leg left in Asterisk", timeout=10)


async def briefed(api: Api, w: WarmCall) -> float:
    """Hold music at the caller while the destination rings; then the brief at the agent
    and still only hold music at the caller. Returns once the brief has played."""
    ringing = await transfer_in_state(api, w.call["id"], "ringing", "briefing", "awaiting_accept")
    assert ringing["transfers"][-1]["state"] == "ringing", "answered before it rang"
    since = time.monotonic()
    await wait_for(
        lambda: len(w.caller.received_pcm(since=since)) >= 2 * WINDOW_BYTES,
        "a second of audio at the caller while it rings",
    )
    while_ringing = w.caller.received_pcm(since=since)
    assert hold_music_only(while_ringing), "the caller did not hear (only) hold music"
    assert ringback_windows(while_ringing) == 0
    await transfer_in_state(api, w.call["id"], "briefing", "awaiting_accept")
    answered = time.monotonic()

    def brief_heard() -> bool:
        pcm = w.agent.received_pcm(since=answered)
        return len(pcm) >= 16000 and speech_like(pcm, min_active=0.4)

    await wait_for(brief_heard, "the brief at the agent", timeout=20)
    await transfer_in_state(api, w.call["id"], "awaiting_accept")  # the whole brief played
    heard = w.agent.received_pcm(since=answered)
    assert band_share(heard, (LAB_MOH_HZ,)) < 0.2, "the agent heard the hold music"
    # Meanwhile the caller heard hold music only: no word of the brief.
    assert hold_music_only(w.caller.received_pcm(since=answered))
    return time.monotonic()


async def caller_hears_agent(w: WarmCall, since: float) -> float:
    """The agent talks (a 1000 Hz tone, continuously, as a phone sends RTP); returns when
    the caller heard it, and checks the hold music stopped."""

    def heard() -> bool:
        pcm = w.caller.received_pcm(since=since)
        return len(pcm) >= 1600 and abs(dominant_frequency(pcm[-1600:]) - 1000) < 30

    await wait_for(heard, "the agent at the caller", timeout=15, every=0.005)
    return time.monotonic()


async def test_accepted_by_dtmf_1_the_caller_joins_the_agent(warm: Any, daemon_api: Any) -> None:  # noqa: F811
    _, api = daemon_api
    w = await warm()
    await briefed(api, w)
    talking = asyncio.create_task(w.agent.send_tone(1000, 30.0))
    try:
        pressed = time.monotonic()
        await w.agent.send_dtmf("1")
        done = await transfer_settled(api, w.call["id"])
        transfer = done["transfers"][-1]
        assert (transfer["state"], transfer["outcome"], transfer["mode"]) == (
            "bridged",
            "answered",
            "warm",
        )
        assert [h["state"] for h in transfer["history"]][-4:] == [
            "answered",
            "briefing",
            "awaiting_accept",
            "bridged",
        ]
        kinds = events(done)
        for kind in ("transfer.warm_hold", "transfer.warm_briefing", "transfer.warm_briefed"):
            assert kind in kinds
        assert kinds.index("transfer.warm_accepted") < kinds.index("transfer.completed")
        await caller_hears_agent(w, pressed)
        await moh_stopped(w.caller)
    finally:
        talking.cancel()
    await api.ok("POST", f"/calls/{w.call['id']}/control", {"type": "end_call"})


async def moh_stopped(peer: RtpPeer) -> None:
    """Wait until the last 0.5 s the caller heard is no longer hold music."""

    def stopped() -> bool:
        last = peer.received_pcm()[-WINDOW_BYTES:]
        return len(last) == WINDOW_BYTES and band_share(last, (LAB_MOH_HZ,)) < 0.1

    await wait_for(stopped, "the hold music to stop at the caller", every=0.02)


async def back_with_the_assistant(api: Api, w: WarmCall, outcome: str) -> dict[str, Any]:
    """The transfer failed with `outcome`; the caller hears the assistant again (speech,
    not hold music) and no leg is left in Asterisk."""
    done = await transfer_settled(api, w.call["id"])
    transfer = done["transfers"][-1]
    assert (transfer["state"], transfer["outcome"]) == ("failed", outcome), transfer
    assert done["status"] == "active"
    await moh_stopped(w.caller)
    since = time.monotonic()
    await heard_speech(w.caller, since=since)
    spoke = w.caller.loud_since(since)
    assert spoke is not None
    # From the assistant's first word on: speech, no hold music under it.
    assert band_share(w.caller.received_pcm(since=spoke), (LAB_MOH_HZ,)) < 0.1
    assert w.lab_call.uas is not None
    await wait_for(lambda: w.lab_call.uas.received_requests("BYE"), "the leg hung up")
    return done


async def test_declined_by_dtmf_2_the_caller_is_back_with_the_assistant(
    warm: Any,
    daemon_api: Any,  # noqa: F811
) -> None:
    _, api = daemon_api
    w = await warm()
    await briefed(api, w)
    await w.agent.send_dtmf("2")
    done = await back_with_the_assistant(api, w, "declined")
    assert "transfer.warm_declined" in events(done)


async def test_no_key_in_time_is_voicemail(warm: Any, daemon_api: Any) -> None:  # noqa: F811
    _, api = daemon_api
    w = await warm(accept_timeout=2)
    await briefed(api, w)
    done = await back_with_the_assistant(api, w, "voicemail")
    assert "transfer.warm_timeout" in events(done)


async def test_caller_hangs_up_during_the_brief_leaves_no_leg(
    asterisk_lab: Any,
    warm: Any,
    daemon_api: Any,  # noqa: F811
) -> None:
    _, api = daemon_api
    w = await warm()
    await briefed(api, w)
    caller = w.lab_call.caller
    assert caller is not None and caller.call_id() is not None
    assert asterisk_lab.hangup_sip_call(caller.call_id())
    ended = await wait_for(lambda: _ended(api, w.call["id"]), "the call to end", timeout=15)
    assert ended["transfers"][-1]["state"] == "cancelled"
    assert w.lab_call.uas is not None
    await wait_for(lambda: w.lab_call.uas.received_requests("BYE"), "the leg hung up")
    await wait_for(lambda: not leftovers(asterisk_lab), "no leg, media or bridge left")


async def _ended(api: Api, call_id: str) -> dict[str, Any] | None:
    call = await api.ok("GET", f"/calls/{call_id}")
    return call if call["status"] == "ended" else None


async def test_wait_for_speech_briefs_once_the_agent_said_hello(
    warm: Any,
    daemon_api: Any,  # noqa: F811
) -> None:
    """`wait_for_speech`: the answered agent hears nothing until it speaks; then the brief,
    then (no acceptance asked) the caller joins."""
    _, api = daemon_api
    w = await warm(wait_for_speech=True, require_accept=False)

    async def waiting() -> bool:
        return "transfer.warm_waiting_for_speech" in events(
            await api.ok("GET", f"/calls/{w.call['id']}")
        )

    await wait_for(waiting, "the brief waiting for the agent to speak", timeout=20)
    assert await w.agent.wait_for_packet(), "no media on the leg"
    assert not speech_like(w.agent.received_pcm()), "the agent heard something before speaking"
    hello = time.monotonic()
    await w.agent.send_tone(300, 0.5)  # "hello?"

    def brief_heard() -> bool:
        return speech_like(w.agent.received_pcm(since=hello), min_active=0.3)

    await wait_for(brief_heard, "the brief after the agent spoke", timeout=20)
    done = await transfer_settled(api, w.call["id"])
    assert done["transfers"][-1]["state"] == "bridged"
    (briefing,) = [e for e in done["events"] if e["type"] == "transfer.warm_briefing"]
    assert briefing["spoke_first"] is True
    await api.ok("POST", f"/calls/{w.call['id']}/control", {"type": "end_call"})


async def test_restart_during_the_brief_returns_the_caller_and_leaves_nothing(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    """The daemon stops while the agent is asked; the next one cannot know what the agent
    pressed meanwhile and has lost the brief's media: it hangs the leg up, stops the hold
    music and gives the caller back to the assistant (recorded as a local failure)."""
    policy = {"allowed_prefixes": ["+31"], "allowed_sip_domains": ["127.0.0.1"]}
    daemon, api = await start_daemon(asterisk_lab, tmp_path, transfer=policy)
    try:
        async with LabCall(asterisk_lab, api) as lab_call:
            await setup_directory(api, lab_call.uas, auth=False)
            call = await lab_call.dial(hold_ms=60000)
            await heard_speech(lab_call.caller_rtp, since=0)
            await transfer_warm(api, call["id"], brief=BRIEF, accept_timeout=60)
            await transfer_in_state(api, call["id"], "awaiting_accept")
            await api.close()
            await daemon.stop()
            daemon, api = await start_daemon(asterisk_lab, tmp_path, transfer=policy)
            lab_call.api = api
            w = WarmCall(lab_call, call)
            done = await back_with_the_assistant(api, w, "failed")
            transfer = done["transfers"][-1]
            assert transfer["local_fault"] is True
            assert "during the warm brief" in transfer["reason"]
            await wait_for(lambda: not leftovers(asterisk_lab), "no leg, media or bridge left")
            await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
    finally:
        await api.close()
        await daemon.stop()
