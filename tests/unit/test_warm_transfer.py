"""Warm transfer (issue 9 §2) through a real session and store, the PBX faked: what the
caller hears (hold music, not ringback), what the destination hears (the brief on its own
media), DTMF accept / decline, no key in time, hang-ups during the brief, the restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.calls.items import Resume
from bridge.calls.model import CallStatus, TransferCommand
from bridge.calls.session import CallSession
from bridge.calls.transfer import Transfer, TransferState
from bridge.calls.warm import SPEECH_FRAMES
from bridge.lab.rtp import tone_pcm
from bridge.pbx.ports import ChannelHungUp, DtmfReceived, LegAnswered, LegRinging
from tests.support.calls import CallEnv, open_env, until


@pytest.fixture
async def env(tmp_path: Path):
    env = await open_env(tmp_path)
    yield env
    await env.close()


async def warm(env: CallEnv, session: CallSession, **fields: Any) -> Transfer:
    fields = {"mode": "warm", "require_accept": True, **fields}
    transfer = await env.transfer(session, **fields)
    assert transfer.leg_id is not None
    await env.push(LegRinging(transfer.leg_id))
    await env.push(LegAnswered(transfer.leg_id))
    await until(lambda: transfer.state is TransferState.AWAITING_ACCEPT, "briefed")
    return transfer


async def back_with_assistant(env: CallEnv, session: CallSession) -> tuple[Any, ...]:
    """Wait until the conversation was told the result; return what it was told."""

    def told() -> tuple[Any, ...] | None:
        log = env.conversations[-1].log
        return log[-1] if log and log[-1][0] == "result" else None

    result = await until(told, "the conversation told the result")
    assert session.call.status is CallStatus.ACTIVE and session.media is not None
    return result


def kinds(stored: dict[str, Any]) -> list[str]:
    return [e["type"] for e in stored["events"]]


async def test_caller_hears_hold_music_not_ringback_and_the_brief_goes_to_the_leg(
    env: CallEnv,
) -> None:
    session = await env.arrive()
    transfer = await warm(env, session, brief="Caller asks about invoice 42.", moh_class="jazz")
    assert env.pbx.verbs("start_hold") == [("ch1", "jazz")]
    assert env.pbx.verbs("play_tone") == []  # no ringback
    assert session.media is None  # the caller left the assistant's media
    assert ("attach_media", transfer.leg_id) in env.pbx.calls  # our media on the leg alone
    assert env.tts.texts[-1] == (
        "Caller asks about invoice 42. Press 1 to take the call, or 2 to decline."
    )
    assert env.pbx.verbs("connect") == []  # the caller is not connected before the key


async def test_dtmf_1_accepts_the_caller_joins_and_every_step_is_recorded(env: CallEnv) -> None:
    session = await env.arrive()
    transfer = await warm(env, session)
    assert transfer.leg_id is not None
    await env.push(DtmfReceived(transfer.leg_id, "1"))
    stored = await env.wait_status(session.call.id, CallStatus.TRANSFERRED)
    names = env.pbx.names()
    # The brief's media leaves the leg and the music stops before the bridge.
    assert names.index("end_brief") < names.index("connect")
    assert names.index("stop_hold") < names.index("connect")
    t = stored["transfers"][-1]
    assert t["state"] == "bridged" and t["outcome"] == "answered" and t["mode"] == "warm"
    assert [h["state"] for h in t["history"]][-4:] == [
        "answered",
        "briefing",
        "awaiting_accept",
        "bridged",
    ]
    for kind in ("transfer.warm_hold", "transfer.warm_briefing", "transfer.warm_briefed"):
        assert kind in kinds(stored)
    assert "transfer.warm_accepted" in kinds(stored)


async def test_dtmf_2_declines_the_caller_goes_back_to_the_assistant(env: CallEnv) -> None:
    session = await env.arrive()
    transfer = await warm(env, session)
    assert transfer.leg_id is not None
    await env.push(DtmfReceived(transfer.leg_id, "2"))
    result = await back_with_assistant(env, session)
    assert transfer.state is TransferState.FAILED
    assert transfer.result_for_assistant()["outcome"] == "declined"
    assert ("hangup", transfer.leg_id) in env.pbx.calls
    names = env.pbx.names()
    assert names.index("stop_hold") < len(names) - 1 - names[::-1].index("attach_media")
    assert env.pbx.verbs("connect") == []
    assert result[2] is CallStatus.ACTIVE and result[3] is True  # media before the result
    stored = await env.stored(session.call.id)
    assert "transfer.warm_declined" in kinds(stored)


async def test_no_key_in_time_is_voicemail(env: CallEnv) -> None:
    session = await env.arrive()
    transfer = await warm(env, session, accept_timeout=0.05)
    await back_with_assistant(env, session)
    assert transfer.outcome is not None and transfer.outcome.value == "voicemail"
    assert ("hangup", transfer.leg_id) in env.pbx.calls
    stored = await env.stored(session.call.id)
    assert "transfer.warm_timeout" in kinds(stored)


async def test_without_acceptance_the_caller_joins_after_the_brief(env: CallEnv) -> None:
    session = await env.arrive()
    transfer = await env.transfer(session, mode="warm")
    assert transfer.leg_id is not None
    await env.push(LegAnswered(transfer.leg_id))
    await env.wait_status(session.call.id, CallStatus.TRANSFERRED)
    assert env.tts.texts[-1].startswith("A caller from +31655501234 is being transferred")
    assert "Press 1" not in env.tts.texts[-1]


async def test_destination_hangs_up_during_the_brief(env: CallEnv) -> None:
    session = await env.arrive()
    transfer = await warm(env, session)
    assert transfer.leg_id is not None
    await env.push(ChannelHungUp(transfer.leg_id, 16, "NORMAL_CLEARING"))
    await back_with_assistant(env, session)
    assert transfer.state is TransferState.FAILED
    assert transfer.reason == "the destination hung up during the brief"
    assert ("end_brief", transfer.leg_id) in env.pbx.calls


async def test_caller_hangs_up_during_the_brief_leaves_no_leg(env: CallEnv) -> None:
    session = await env.arrive()
    transfer = await warm(env, session)
    await env.push(ChannelHungUp("ch1", 16, "NORMAL_CLEARING"))
    await env.wait_status(session.call.id, CallStatus.ENDED)
    assert transfer.state is TransferState.CANCELLED
    assert ("hangup", transfer.leg_id) in env.pbx.calls
    assert ("end_brief", transfer.leg_id) in env.pbx.calls


async def test_reconnect_during_the_brief_returns_the_caller(env: CallEnv) -> None:
    session = await env.arrive()
    transfer = await warm(env, session)
    assert transfer.leg_id is not None
    leg = frozenset({transfer.leg_id})
    session.post(Resume(live_legs=leg, answered_legs=leg))
    await back_with_assistant(env, session)
    assert transfer.state is TransferState.FAILED and transfer.local_fault
    assert ("hangup", transfer.leg_id) in env.pbx.calls


async def test_a_destination_configured_warm_is_warm(env: CallEnv) -> None:
    session = await env.arrive()
    dest = env.directory.assistant.destinations()[0]
    configured = dest.model_copy(
        update={"transfer_mode": "warm", "brief": "Billing question.", "require_accept": True}
    )
    env.directory.assistant.llm_config.tools[0].destinations[0] = configured
    transfer = await env.transfer(session)
    assert transfer.mode == "warm" and transfer.warm is not None
    assert transfer.warm.brief == "Billing question." and transfer.warm.require_accept


def test_a_bad_moh_class_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="moh_class"):
        TransferCommand.model_validate(
            {"type": "transfer", "destination": "+31612345678", "mode": "warm", "moh_class": "x y"}
        )


async def test_the_default_brief_says_who_why_and_the_callers_own_words(env: CallEnv) -> None:
    session = await env.arrive()
    await session.record("transcript", role="caller", text="Hello.")
    await session.record("transcript", role="assistant", text="How can I help?")
    await session.record("transcript", role="caller", text="My invoice 42 is wrong.")
    transfer = await env.transfer(session, mode="warm", summary="Billing dispute")
    assert transfer.warm is not None
    assert transfer.warm.brief == (
        "A caller from +31655501234 is being transferred to you. About: Billing dispute. "
        "They said: Hello. My invoice 42 is wrong."
    )


async def test_wait_for_speech_briefs_once_the_destination_spoke(env: CallEnv) -> None:
    session = await env.arrive()
    transfer = await env.transfer(session, mode="warm", wait_for_speech=True, brief="Hi there.")
    assert transfer.leg_id is not None and session.run is not None
    warm_steps = session.run.warm
    assert warm_steps is not None
    await env.push(LegAnswered(transfer.leg_id))
    await until(lambda: warm_steps.media is not None, "our media on the leg")
    await until(lambda: transfer.state is TransferState.BRIEFING, "briefing, waiting for speech")
    assert "Hi there." not in env.tts.texts  # nothing said before the destination spoke
    hello = tone_pcm(300, 0.02, 0.3)  # 20 ms frames, well above SPEECH_RMS
    for _ in range(SPEECH_FRAMES):
        warm_steps._on_leg_audio(hello)
    await env.wait_status(session.call.id, CallStatus.TRANSFERRED)
    assert "Hi there." in env.tts.texts
    stored = await env.stored(session.call.id)
    briefing = [e for e in stored["events"] if e["type"] == "transfer.warm_briefing"]
    assert briefing and briefing[0]["spoke_first"] is True
    assert "transfer.warm_waiting_for_speech" in kinds(stored)
