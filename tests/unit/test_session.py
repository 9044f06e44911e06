"""The session core, handler by handler: a fake PBX that records verbs, a real SQLite store.

Each test pushes PBX events and commands through the service and the session's queue (as the
adapter and the API do) and asserts the stored call, its transfer (history, outcome) and
events, and the verbs the PBX was asked.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.calls.items import TimerFired
from bridge.calls.model import CallStatus, EndCallCommand, SayCommand
from bridge.calls.policy import TransferPolicy
from bridge.calls.transfer import TransferState
from bridge.errors import Conflict, PbxCommandFailed, PbxUnavailable
from bridge.pbx.ports import (
    ChannelHungUp,
    ConnectionLost,
    ConnectionRestored,
    LegAnswered,
    LegFailed,
    LegProgress,
    LegRinging,
)
from tests.support.calls import DEST, CallEnv, FakePbx, open_env, until


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[CallEnv]:
    env = await open_env(tmp_path)
    try:
        yield env
    finally:
        await env.close()


def kinds(call: dict[str, Any]) -> list[str]:
    return [e["type"] for e in call["events"]]


def states(transfer: dict[str, Any]) -> list[str]:
    return [h["state"] for h in transfer["history"]]


async def settled(env: CallEnv, call_id: str) -> dict[str, Any]:
    """The call once its last transfer reached a final state (as stored)."""

    async def check() -> dict[str, Any] | None:
        data = await env.stored(call_id)
        last = data["transfers"][-1] if data["transfers"] else None
        final = ("bridged", "failed", "cancelled", "handed_off")
        return data if last and last["state"] in final else None

    return await until(check, "transfer settled")


# --- arrival ------------------------------------------------------------------------------


async def test_arrival_answers_attaches_media_and_greets(env: CallEnv) -> None:
    session = await env.arrive()
    data = await env.stored(session.call.id)
    assert data["status"] == "active" and data["answered_at"] is not None
    assert kinds(data)[:3] == ["call.started", "call.answered", "media.attached"]
    assert env.pbx.names()[:2] == ["answer", "attach_media"]
    assert env.conversations[0].log == [("start", False)]


async def test_arrival_failure_sends_the_caller_to_the_fallback(env: CallEnv) -> None:
    env.directory.fail_find = sqlite3.OperationalError("database is locked")
    await env.push(env.arrival("ch7"))
    assert env.pbx.verbs("continue_in_dialplan") == [("ch7", "callbridge-fallback", "+31201234567")]
    assert "ch7" not in env.service._by_channel and env.service._by_id == {}


async def test_arrival_failure_when_the_store_is_locked_goes_to_the_fallback(
    env: CallEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def locked(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(env.store, "save", locked)
    await env.push(env.arrival("ch8"))
    assert [v[0] for v in env.pbx.verbs("continue_in_dialplan")] == ["ch8"]
    assert env.service._by_id == {}


# --- bridge-mode transfer -------------------------------------------------------------------


async def test_transfer_rings_answers_and_bridges_call_and_transfer_together(
    env: CallEnv,
) -> None:
    session = await env.arrive()
    conversation = env.conversations[0]
    transfer = await env.transfer(session)
    assert conversation.log[-1] == ("started", CallStatus.TRANSFERRING)
    ringback = f"cbring-{transfer.id}"
    assert env.pbx.verbs("play_tone") == [("ch1", "ring", ringback)]
    leg = transfer.leg_id
    assert leg is not None
    await env.push(LegRinging(leg))
    await env.push(LegAnswered(leg))
    data = await settled(env, session.call.id)
    assert data["status"] == "transferred"  # saved with the transfer, in one transaction
    t = data["transfers"][-1]
    assert (t["state"], t["outcome"], t["rang"]) == ("bridged", "answered", True)
    assert states(t) == ["announcing", "dialing", "ringing", "answered", "bridged"]
    names = env.pbx.names()
    # The ringback stops before the bridge (a playing tone stalls Asterisk channel ops).
    assert names.index("stop_playback") < names.index("connect")
    assert env.pbx.verbs("stop_playback") == [(ringback,)]
    assert env.pbx.verbs("connect") == [("ch1", leg)]
    assert session.media is None
    await until(lambda: conversation.log[-1][0] == "result", "result told")
    assert conversation.log[-1][:3] == ("result", TransferState.BRIDGED, CallStatus.TRANSFERRED)
    assert "transfer.completed" in kinds(data)
    assert session.transfers_in_call == 1


async def test_destination_hanging_up_after_the_bridge_ends_the_call(env: CallEnv) -> None:
    session = await env.arrive()
    transfer = await env.transfer(session)
    leg = transfer.leg_id
    assert leg is not None
    await env.push(LegAnswered(leg))
    await env.wait_status(session.call.id, CallStatus.TRANSFERRED)
    await env.push(ChannelHungUp(leg, 16, "Normal Clearing"))
    data = await env.wait_status(session.call.id, CallStatus.ENDED)
    await finished(session)
    assert data["end_reason"] == "destination hung up"
    assert "transfer.destination_hung_up" in kinds(data)
    assert ("ch1",) in env.pbx.verbs("hangup") and ("ch1",) in env.pbx.verbs("release")
    assert data["transfers"][-1]["state"] == "bridged"


async def test_caller_hanging_up_after_the_bridge_hangs_up_the_destination(env: CallEnv) -> None:
    session = await env.arrive()
    transfer = await env.transfer(session)
    leg = transfer.leg_id
    assert leg is not None
    await env.push(LegAnswered(leg))
    await env.wait_status(session.call.id, CallStatus.TRANSFERRED)
    await env.push(ChannelHungUp("ch1", 16, "Normal Clearing"))
    await env.wait_status(session.call.id, CallStatus.ENDED)
    assert (leg,) in env.pbx.verbs("hangup")


@pytest.mark.parametrize("ringing", [False, True])
async def test_caller_hangup_during_the_transfer_cancels_it_and_hangs_up_the_leg(
    env: CallEnv, ringing: bool
) -> None:
    session = await env.arrive()
    transfer = await env.transfer(session)
    leg = transfer.leg_id
    assert leg is not None
    if ringing:
        await env.push(LegRinging(leg))
    await env.push(ChannelHungUp("ch1", 16, "Normal Clearing"))
    data = await settled(env, session.call.id)
    t = data["transfers"][-1]
    assert (data["status"], t["state"], t["outcome"]) == ("ended", "cancelled", "cancelled")
    assert (leg,) in env.pbx.verbs("hangup")
    assert (f"cbring-{transfer.id}",) in env.pbx.verbs("stop_playback")
    assert kinds(data)[-2:] == ["transfer.cancelled", "call.ended"]


@pytest.mark.parametrize("ringing", [False, True])
async def test_end_call_during_the_transfer_hangs_up_the_leg_at_once(
    env: CallEnv, ringing: bool
) -> None:
    session = await env.arrive()
    transfer = await env.transfer(session)
    leg = transfer.leg_id
    assert leg is not None
    if ringing:
        await env.push(LegRinging(leg))
    reply = await session.command(EndCallCommand(type="end_call"))
    assert reply["accepted"] == "end_call"
    data = await env.wait_status(session.call.id, CallStatus.ENDED)
    t = data["transfers"][-1]
    assert (t["state"], t["outcome"]) == ("cancelled", "cancelled")
    assert (leg,) in env.pbx.verbs("hangup") and ("ch1",) in env.pbx.verbs("hangup")
    assert leg not in env.service._by_channel
    # A destination answering late is not connected to anyone: it is hung up.
    await env.push(LegAnswered(leg))
    await until(lambda: env.pbx.verbs("hangup").count((leg,)) == 2, "late answer hung up")
    stats = await env.service.transfer_stats(None)
    assert stats["by_outcome"] == {"cancelled": 1} and stats["in_progress"] == 0


async def test_ring_guard_fails_back_to_the_assistant_with_no_answer(env: CallEnv) -> None:
    session = await env.arrive()
    conversation = env.conversations[0]
    transfer = await env.transfer(session)
    leg = transfer.leg_id
    assert leg is not None
    await env.push(LegRinging(leg))
    session.post(TimerFired("ring_guard", transfer.id))
    data = await settled(env, session.call.id)
    t = data["transfers"][-1]
    assert (data["status"], t["state"], t["outcome"]) == ("active", "failed", "no_answer")
    # Back with the assistant, media attached, THEN the conversation hears the result.
    await until(lambda: conversation.log[-1][0] == "result", "result told")
    assert (leg,) in env.pbx.verbs("hangup")
    assert conversation.log[-1] == ("result", TransferState.FAILED, CallStatus.ACTIVE, True)
    await until(lambda: env.settings.transfer.no_answer_message in env.tts.texts, "said")


async def test_ring_guard_without_any_report_is_a_local_fault(env: CallEnv) -> None:
    """The PBX reported neither ringing nor an end: its report was lost, not the
    destination's doing."""
    session = await env.arrive()
    transfer = await env.transfer(session)
    session.post(TimerFired("ring_guard", transfer.id))
    t = (await settled(env, session.call.id))["transfers"][-1]
    assert (t["outcome"], t["local_fault"]) == ("failed", True)
    assert (
        t["reason"]
        == "local failure (not the destination's): the PBX reported nothing about the leg in time"
    )


async def test_603_is_declined(env: CallEnv) -> None:
    session = await env.arrive()
    transfer = await env.transfer(session)
    leg = transfer.leg_id
    assert leg is not None
    await env.push(LegRinging(leg))
    await env.push(LegFailed(leg, 21, "Call Rejected", 603))
    t = (await settled(env, session.call.id))["transfers"][-1]
    assert (t["state"], t["outcome"], t["sip_code"], t["cause"]) == ("failed", "declined", 603, 21)


async def test_busy_is_busy_with_its_sip_code(env: CallEnv) -> None:
    session = await env.arrive()
    transfer = await env.transfer(session)
    assert transfer.leg_id is not None
    await env.push(LegFailed(transfer.leg_id, 17, "User busy", 486))
    data = await settled(env, session.call.id)
    t = data["transfers"][-1]
    assert (data["status"], t["outcome"], t["sip_code"]) == ("active", "busy", 486)
    await until(lambda: env.settings.transfer.busy_message in env.tts.texts, "busy message")


@pytest.mark.parametrize(("progress", "outcome"), [(True, "no_answer"), (False, "unreachable")])
async def test_183_only_then_timeout_is_no_answer_not_never_rang(
    env: CallEnv, progress: bool, outcome: str
) -> None:
    session = await env.arrive()
    transfer = await env.transfer(session)
    leg = transfer.leg_id
    assert leg is not None
    if progress:
        await env.push(LegProgress(leg))
    await env.push(LegFailed(leg, 19, "No Answer", None))
    data = await settled(env, session.call.id)
    t = data["transfers"][-1]
    assert t["outcome"] == outcome and t["early_media"] is progress
    if progress:
        assert states(t) == ["announcing", "dialing", "ringing", "failed"]
        assert "transfer.progress" in kinds(data)


async def test_a_local_leg_failure_is_failed_never_unreachable(env: CallEnv) -> None:
    session = await env.arrive()
    conversation = env.conversations[0]
    transfer = await env.transfer(session)
    assert transfer.leg_id is not None
    await env.push(LegFailed(transfer.leg_id, 66, "no such endpoint", None, local=True))
    t = (await settled(env, session.call.id))["transfers"][-1]
    assert t["outcome"] == "failed" and t["reason"].startswith("local failure")
    await until(lambda: conversation.log[-1][0] == "result", "result told")
    assert conversation.log[-1] == ("result", TransferState.FAILED, CallStatus.ACTIVE, True)
    stats = await env.service.transfer_stats(None)
    assert (stats["by_outcome"], stats["local_faults"]) == ({"failed": 1}, 1)
    [dest] = stats["by_destination"]
    assert (dest["attempts"], dest["local_faults"]) == (0, 1)  # not held against it


@pytest.mark.parametrize("error", [PbxCommandFailed("422 bad route"), ValueError("bad template")])
async def test_an_originate_the_pbx_refuses_is_a_local_failure(
    env: CallEnv, error: Exception
) -> None:
    session = await env.arrive()
    env.pbx.fail["originate"] = [error]
    await env.transfer(session)
    data = await settled(env, session.call.id)
    t = data["transfers"][-1]
    assert (data["status"], t["outcome"]) == ("active", "failed")
    assert "local failure" in t["reason"] and "unreachable" not in str(kinds(data))


async def test_an_originate_during_a_pbx_outage_waits_and_redials(env: CallEnv) -> None:
    session = await env.arrive()
    env.pbx.fail["originate"] = [PbxUnavailable("ARI connection refused")]
    transfer = await env.transfer(session)
    data = await until(
        lambda: _has_event(env, session.call.id, "transfer.pbx_unavailable"), "outage recorded"
    )
    assert data["transfers"][-1]["state"] == "dialing" and data["status"] == "transferring"
    await env.push(ConnectionLost(""))
    await env.push(ConnectionRestored("", callers=(env.arrival(),), legs=()))
    await until(lambda: len(env.pbx.verbs("originate")) == 2, "redial")
    leg = transfer.leg_id
    assert leg is not None and env.pbx.verbs("originate")[1][0] == leg
    await env.push(LegAnswered(leg))
    t = (await settled(env, session.call.id))["transfers"][-1]
    assert (t["state"], t["outcome"]) == ("bridged", "answered")


async def test_an_outage_longer_than_the_ring_timeout_is_a_local_failure(env: CallEnv) -> None:
    session = await env.arrive()
    env.pbx.fail["originate"] = [PbxUnavailable("ARI connection refused")]
    transfer = await env.transfer(session)
    await until(lambda: _has_event(env, session.call.id, "transfer.pbx_unavailable"), "outage")
    session.post(TimerFired("ring_guard", transfer.id))
    data = await settled(env, session.call.id)
    t = data["transfers"][-1]
    assert (data["status"], t["outcome"]) == ("active", "failed")
    assert "unreachable for the whole ring timeout" in t["reason"]
    assert len(env.pbx.verbs("originate")) == 1


async def test_stats_count_only_final_outcomes(env: CallEnv) -> None:
    first = await env.arrive("ch1")
    t1 = await env.transfer(first)
    assert t1.leg_id is not None
    await env.push(LegFailed(t1.leg_id, 17, "User busy", 486))
    await settled(env, first.call.id)
    second = await env.arrive("ch2")
    t2 = await env.transfer(second)
    assert t2.leg_id is not None
    await env.push(LegRinging(t2.leg_id))
    await until(lambda: t2.state is TransferState.RINGING, "ringing")
    stats = await env.service.transfer_stats(None)
    assert stats["by_outcome"] == {"busy": 1}
    assert (stats["transfers"], stats["in_progress"]) == (1, 1)
    assert [d["attempts"] for d in stats["by_destination"]] == [1]


async def test_blind_transfer_hands_the_caller_off(env: CallEnv) -> None:
    session = await env.arrive()
    await session.command(
        _transfer_command(mode="blind"),
    )
    data = await env.wait_status(session.call.id, CallStatus.ENDED)
    t = data["transfers"][-1]
    assert t["state"] == "handed_off" and env.pbx.verbs("blind_transfer")[0][0] == "ch1"
    assert env.pbx.verbs("originate") == []


async def test_a_second_transfer_while_one_runs_is_refused(env: CallEnv) -> None:
    session = await env.arrive()
    await env.transfer(session)
    with pytest.raises(Conflict):
        await session.command(_transfer_command())


# --- a call that always finishes ------------------------------------------------------------


async def test_a_broken_store_still_ends_the_call_and_fails_pending_commands(
    env: CallEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = await env.arrive()
    conversation = env.conversations[0]

    async def locked(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    for name in ("save", "save_state", "save_transfer", "add_event"):
        monkeypatch.setattr(env.store, name, locked)
    with pytest.raises(sqlite3.OperationalError):
        await session.command(_transfer_command())
    assert session._task is not None
    await until(session._task.done, "session task finished")
    assert session.ended and session.media is None
    assert env.service._by_id == {} and "ch1" not in env.service._by_channel
    assert ("ch1",) in env.pbx.verbs("release")
    # Not left in the PBX with no session: sent to the fallback.
    assert [v[0] for v in env.pbx.verbs("continue_in_dialplan")] == ["ch1"]
    await until(lambda: ("close",) in conversation.log, "conversation closed")
    with pytest.raises(Conflict):
        await env.service.control(session.call.id, SayCommand(type="say", message="hi"))
    with pytest.raises(Conflict):  # the conversation still holds the session: no hang
        await session.command(SayCommand(type="say", message="hi"), source="assistant")


async def test_end_survives_a_failing_release_and_hangup(env: CallEnv) -> None:
    session = await env.arrive()
    transfer = await env.transfer(session)
    env.pbx.fail["release"] = RuntimeError("ARI 500")
    env.pbx.fail["hangup"] = RuntimeError("ARI 500")
    env.pbx.fail["stop_playback"] = RuntimeError("ARI 500")
    await env.push(ChannelHungUp("ch1", 16, None))
    data = await env.wait_status(session.call.id, CallStatus.ENDED)
    assert data["transfers"][-1]["state"] == "cancelled"
    assert session._task is not None
    await until(session._task.done, "session task finished")
    assert env.service._by_id == {}
    assert (transfer.leg_id,) in env.pbx.verbs("hangup")


# --- reconnects and restarts ----------------------------------------------------------------


async def _ringing_then_restart(env: CallEnv) -> tuple[Any, str, Any, FakePbx]:
    session = await env.arrive()
    transfer = await env.transfer(session)
    leg = transfer.leg_id
    assert leg is not None
    await env.push(LegRinging(leg))
    await until(lambda: transfer.state is TransferState.RINGING, "ringing")
    await env.service.stop()  # the daemon stops (or dies); the caller stays in the PBX
    pbx = FakePbx()
    env.service = env.new_service(pbx)
    await env.service.start()
    return session.call.id, leg, transfer, pbx


async def test_restart_during_ringing_resumes_and_bridges(env: CallEnv) -> None:
    call_id, leg, transfer, pbx = await _ringing_then_restart(env)
    await env.push(ConnectionRestored("", callers=(env.arrival(),), legs=((leg, False),)))
    await until(lambda: call_id in env.service._by_id, "resumed")
    await env.push(LegAnswered(leg))
    data = await settled(env, call_id)
    assert (data["status"], data["transfers"][-1]["state"]) == ("transferred", "bridged")
    # The new process stops the ringback its predecessor started, before connecting.
    assert pbx.verbs("stop_playback") == [(f"cbring-{transfer.id}",)]
    assert pbx.names().index("stop_playback") < pbx.names().index("connect")
    assert len(await env.store.list()) == 1  # no second call record


async def test_restart_with_a_leg_answered_meanwhile_connects_it(env: CallEnv) -> None:
    call_id, leg, transfer, pbx = await _ringing_then_restart(env)
    await env.push(ConnectionRestored("", callers=(env.arrival(),), legs=((leg, True),)))
    data = await settled(env, call_id)
    assert (data["status"], data["transfers"][-1]["state"]) == ("transferred", "bridged")
    assert pbx.verbs("stop_playback") == [(f"cbring-{transfer.id}",)]


async def test_restart_with_the_leg_gone_takes_its_late_failure(env: CallEnv) -> None:
    call_id, leg, transfer, pbx = await _ringing_then_restart(env)
    await env.push(ConnectionRestored("", callers=(env.arrival(),), legs=()))
    await until(lambda: call_id in env.service._by_id, "resumed")
    await env.push(LegFailed(leg, 17, "User busy", 486))  # the adapter's late report
    data = await settled(env, call_id)
    t = data["transfers"][-1]
    assert (data["status"], t["outcome"], t["sip_code"]) == ("active", "busy", 486)
    # Back with the assistant in the new process: ringback stopped, media, conversation.
    conversation = await until(lambda: _resumed_conversation(env), "conversation resumed")
    await until(lambda: len(conversation.log) == 2, "transfer result told")
    assert pbx.verbs("stop_playback") == [(f"cbring-{transfer.id}",)]
    assert pbx.verbs("attach_media") == [("ch1",)]
    assert conversation.log == [
        ("start", True),
        ("result", TransferState.FAILED, CallStatus.ACTIVE, True),
    ]


async def test_restart_with_the_leg_gone_and_no_news_fails_back(env: CallEnv) -> None:
    call_id, _, transfer, pbx = await _ringing_then_restart(env)
    await env.push(ConnectionRestored("", callers=(env.arrival(),), legs=()))
    session = await until(lambda: env.service._by_id.get(call_id), "resumed")
    session.post(TimerFired("leg_lost", transfer.id))
    data = await settled(env, call_id)
    t = data["transfers"][-1]
    assert (data["status"], t["outcome"]) == ("active", "failed")
    assert "lost while callbridge was disconnected" in t["reason"]
    await until(lambda: env.conversations[-1].log[-1][0] == "result", "result told")
    assert pbx.verbs("stop_playback") == [(f"cbring-{transfer.id}",)]


async def test_restart_with_the_caller_gone_settles_the_transfer(env: CallEnv) -> None:
    call_id, leg, _, pbx = await _ringing_then_restart(env)
    await env.push(ConnectionRestored("", callers=(), legs=((leg, False),)))
    data = await env.wait_status(call_id, CallStatus.ENDED)
    assert data["transfers"][-1]["state"] == "cancelled"
    assert pbx.verbs("hangup") == [(leg,)]  # the orphan leg


async def test_reconcile_never_adopts_a_channel_it_has_a_record_for(env: CallEnv) -> None:
    session = await env.arrive()
    env.pbx.fail["continue_in_dialplan"] = [PbxCommandFailed("stuck")]  # first fallback fails
    await session.command(EndCallCommand(type="end_call"))
    await env.wait_status(session.call.id, CallStatus.ENDED)
    # The channel is still in our application after the restart: never a second call.
    await env.service.stop()
    pbx = FakePbx()
    env.service = env.new_service(pbx)
    await env.service.start()
    await env.push(ConnectionRestored("", callers=(env.arrival(),), legs=()))
    assert pbx.verbs("continue_in_dialplan") == [("ch1", "callbridge-fallback", "+31201234567")]
    assert len(await env.store.list()) == 1 and env.service._by_id == {}


async def test_reconcile_goes_on_when_one_call_fails(
    env: CallEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await env.arrive("ch1")
    second = await env.arrive("ch2")
    await env.service.stop()
    pbx = FakePbx()
    env.service = env.new_service(pbx)
    await env.service.start()
    real = env.store.transfers

    async def broken(call_id: str) -> Any:
        if call_id == first.call.id:
            raise sqlite3.OperationalError("disk I/O error")
        return await real(call_id)

    monkeypatch.setattr(env.store, "transfers", broken)
    callers = (env.arrival("ch1"), env.arrival("ch2"))
    await env.push(ConnectionRestored("", callers=callers, legs=(("cbleg-orphan", False),)))
    await until(lambda: second.call.id in env.service._by_id, "second call resumed")
    assert ("cbleg-orphan",) in pbx.verbs("hangup")
    await until(lambda: ("ch2",) in pbx.verbs("attach_media"), "second call has media again")
    # The call that could not be resumed is not left in Stasis: it goes to the fallback.
    assert [v[0] for v in pbx.verbs("continue_in_dialplan")] == ["ch1"]
    assert (await env.store.get(first.call.id)).status is CallStatus.ENDED  # type: ignore[union-attr]


async def finished(session: Any) -> None:
    """The session's task has run to its end (everything it does on the way out is done)."""
    assert session._task is not None
    await until(session._task.done, "session task finished")


def _resumed_conversation(env: CallEnv) -> Any:
    return next((c for c in env.conversations if ("start", True) in c.log), None)


async def _has_event(env: CallEnv, call_id: str, kind: str) -> dict[str, Any] | None:
    data = await env.stored(call_id)
    return data if kind in kinds(data) else None


def _transfer_command(**fields: Any) -> Any:
    from bridge.calls.model import TransferCommand

    return TransferCommand(type="transfer", destination=DEST, **fields)


# --- the per-trunk leg cap hook and the destination tester ----------------------------------


class RecordingPolicy(TransferPolicy):
    """The real dial-safety policy, its leg accounting recorded."""

    def __init__(self, policy: TransferPolicy) -> None:
        super().__init__(policy.settings, policy.directory)
        self.claimed: list[Any] = []
        self.released: list[Any] = []

    def claim_leg(self, target: Any) -> None:
        super().claim_leg(target)
        self.claimed.append(target)

    def release_leg(self, target: Any) -> None:
        super().release_leg(target)
        self.released.append(target)


async def test_each_leg_is_claimed_and_released_once(env: CallEnv) -> None:
    policy = RecordingPolicy(env.service.policy)
    env.service.policy = policy
    session = await env.arrive()
    first = await env.transfer(session)
    assert first.leg_id is not None
    await env.push(LegFailed(first.leg_id, 17, "User busy", 486))
    await settled(env, session.call.id)
    assert len(policy.claimed) == 1 and policy.released == policy.claimed
    second = await env.transfer(session)
    assert second.leg_id is not None and session.transfers_in_call == 2
    await env.push(LegAnswered(second.leg_id))
    await env.wait_status(session.call.id, CallStatus.TRANSFERRED)
    assert len(policy.released) == 1  # the bridged leg is still up
    await env.push(ChannelHungUp("ch1", 16, None))
    await env.wait_status(session.call.id, CallStatus.ENDED)
    await finished(session)
    assert len(policy.claimed) == 2 and policy.released == policy.claimed


@pytest.mark.parametrize(
    ("events", "outcome"),
    [
        ([LegProgress, (19, "No Answer", None)], "no_answer"),
        ([(19, "No Answer", None)], "unreachable"),
        ([LegRinging, (21, "Call Rejected", 603)], "declined"),
        ([(66, "no such endpoint", None, True)], "failed"),
    ],
)
async def test_destination_test_classifies_like_a_transfer(
    env: CallEnv, events: list[Any], outcome: str
) -> None:
    import asyncio

    probe = asyncio.create_task(env.service.test_destination(DEST, None, 5))
    await until(lambda: env.pbx.verbs("originate"), "probe placed")
    leg = env.pbx.verbs("originate")[0][0]
    for item in events:
        if isinstance(item, tuple):
            await env.push(LegFailed(leg, *item))
        else:
            await env.push(item(leg))
    result = await probe
    assert result["outcome"] == outcome


async def test_destination_test_with_the_pbx_down_is_a_local_failure(env: CallEnv) -> None:
    env.pbx.fail["originate"] = PbxUnavailable("ARI connection refused")
    result = await env.service.test_destination(DEST, None, 5)
    assert result["outcome"] == "failed" and result["reason"].startswith("local failure")


# --- media while the PBX is briefly unreachable ---------------------------------------------


async def test_media_that_cannot_attach_during_an_outage_attaches_after_it(env: CallEnv) -> None:
    env.pbx.fail["attach_media"] = [PbxUnavailable("ARI connection refused")]
    await env.push(env.arrival())
    session = env.service.routes["ch1"]
    await until(lambda: _has_event(env, session.call.id, "call.media_waiting"), "waiting")
    assert session.call.status is CallStatus.ACTIVE and env.pbx.verbs("continue_in_dialplan") == []
    await env.push(ConnectionRestored("", callers=(env.arrival(),), legs=()))
    await until(lambda: session.media is not None, "media attached after the reconnect")
    conversation = await until(lambda: env.conversations and env.conversations[0], "conv")
    await until(lambda: conversation.log, "conversation started")
    assert conversation.log == [("start", False)]  # never greeted yet: it greets now


@pytest.mark.parametrize(
    ("verb", "waiting", "reason"),
    [
        ("attach_media", "call.media_waiting", "media could not be attached"),
        ("answer", "call.answer_waiting", "the caller could not be answered"),
    ],
)
async def test_a_pbx_that_stays_unreachable_sends_the_caller_to_the_fallback(
    env: CallEnv, verb: str, waiting: str, reason: str
) -> None:
    """The answer or the media attach waited for the PBX, which did not come back in time."""
    env.pbx.fail[verb] = PbxUnavailable("ARI connection refused")
    await env.push(env.arrival())
    session = env.service.routes["ch1"]
    await until(lambda: _has_event(env, session.call.id, waiting), "waiting")
    session.post(TimerFired("media_wait", session.call.id))
    data = await env.wait_status(session.call.id, CallStatus.ENDED)
    assert data["end_reason"] == (
        f"{reason} (the PBX stayed unreachable): sent to the dialplan fallback"
    )
    assert [v[0] for v in env.pbx.verbs("continue_in_dialplan")] == ["ch1"]


async def test_a_failed_transfer_after_a_restart_during_an_outage_is_told_on_reconnect(
    env: CallEnv,
) -> None:
    call_id, leg, _, pbx = await _ringing_then_restart(env)
    await env.push(ConnectionRestored("", callers=(env.arrival(),), legs=((leg, False),)))
    session = await until(lambda: env.service.session(call_id), "resumed")
    pbx.fail["attach_media"] = [PbxUnavailable("ARI connection refused")]
    await env.push(LegFailed(leg, 17, "User busy", 486))
    await until(lambda: _has_event(env, call_id, "call.media_waiting"), "media waits")
    assert env.settings.transfer.busy_message not in env.tts.texts
    await env.push(ConnectionRestored("", callers=(env.arrival(),), legs=()))
    conversation = await until(lambda: _resumed_conversation(env), "conversation resumed")
    await until(lambda: len(conversation.log) == 2, "transfer result told")
    assert conversation.log[1] == ("result", TransferState.FAILED, CallStatus.ACTIVE, True)
    assert session.media is not None
    await until(lambda: env.settings.transfer.busy_message in env.tts.texts, "busy said")


async def test_a_caller_the_outage_kept_from_answering_is_answered_after_it(env: CallEnv) -> None:
    """ARI drops as the caller arrives: the answer fails with the PBX unreachable. The caller
    still rings in the PBX, so the call waits for the reconnect and is answered and greeted
    then (it was recorded ended with the caller left in Stasis)."""
    env.pbx.fail["answer"] = [PbxUnavailable("ARI connection reset")]
    await env.push(env.arrival())
    session = env.service.routes["ch1"]
    await until(lambda: _has_event(env, session.call.id, "call.answer_waiting"), "waiting")
    assert session.call.status is CallStatus.ACTIVE and session.call.answered_at is None
    assert env.pbx.verbs("continue_in_dialplan") == [] and env.pbx.verbs("hangup") == []
    await env.push(ConnectionRestored("", callers=(env.arrival(),), legs=()))
    await until(lambda: session.media is not None, "answered and attached after the reconnect")
    assert len(env.pbx.verbs("answer")) == 2 and session.call.answered_at is not None
    conversation = await until(lambda: env.conversations and env.conversations[0], "conv")
    await until(lambda: conversation.log, "conversation started")
    assert conversation.log == [("start", False)]  # greeted once, now
