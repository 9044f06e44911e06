"""The transfer as its own object: `TransferRun` driven with a minimal host (no session, no
store), to show its dependencies are the ones it declares and its result is typed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.calls.items import SpeechDone, TimerFired
from bridge.calls.model import Call, CallEvent, CallStatus
from bridge.calls.transfer import Transfer, TransferState
from bridge.calls.transferring import TransferDeps, TransferRun
from bridge.log import get_logger
from bridge.pbx.ports import (
    ChannelHungUp,
    DialTarget,
    LegAnswered,
    LegFailed,
    LegOutcome,
    LegRinging,
)
from tests.support.calls import FakePbx


class Host:
    """Implements `TransferHost` with lists: what the transfer asked of its call."""

    def __init__(self) -> None:
        self.call = Call("c1", "asterisk", "ch1", CallStatus.TRANSFERRING, datetime.now(UTC))
        self.log = get_logger("test")
        self.has_media = True
        self.saved: list[tuple[str | None, bool, str]] = []
        self.posted: list[Any] = []
        self.said: list[str] = []
        self.timers: dict[str, tuple[float, str]] = {}
        self.done: list[Transfer] = []
        self.ended: list[str] = []
        self.media_dropped = False
        self.started = False
        self.recorded = False  # transfer_recorded: the command may be answered

    def say(self, text: str, *, token: str = "", interruptible: bool = True) -> asyncio.Task[None]:
        self.said.append(text)
        self.posted.append(SpeechDone(token, True))
        return asyncio.get_running_loop().create_task(asyncio.sleep(0))

    def post(self, item: Any) -> None:
        self.posted.append(item)

    async def record(self, kind: str, **data: Any) -> None:
        self.saved.append((kind, False, ""))

    async def save(
        self,
        transfer: Transfer,
        *,
        call: bool = False,
        event: CallEvent | None = None,
        events: list[CallEvent] | None = None,
    ) -> None:
        batch = [*([event] if event else []), *(events or [])]
        for item in batch or [None]:
            self.saved.append((item.kind if item else None, call, transfer.state.value))

    def set_timer(self, name: str, delay: float, ref: str) -> None:
        self.timers[name] = (delay, ref)

    def cancel_timer(self, name: str) -> None:
        self.timers.pop(name, None)

    async def quietly(self, what: str, step: Awaitable[Any]) -> None:
        await step

    async def end(self, reason: str) -> None:
        self.ended.append(reason)

    async def hang_up(self, reason: str) -> None:
        self.ended.append(f"hung up: {reason}")

    def transfer_started(self) -> None:
        self.started = True

    def drop_media(self) -> None:
        self.media_dropped = True

    async def transfer_done(self, transfer: Transfer) -> None:
        self.done.append(transfer)

    async def return_on_destination_hangup(self, run: TransferRun) -> bool:
        return False  # hand back (issue 9 §5) is off: tests/unit/test_handback.py has it on

    def transfer_recorded(self) -> None:
        self.recorded = True


def make_run(mode: str = "bridge") -> tuple[TransferRun, Host, FakePbx, list[str]]:
    host, pbx, tracked = Host(), FakePbx(), []
    deps = TransferDeps(
        pbx=pbx,
        policy=None,
        track_leg=tracked.append,
        untrack_leg=lambda leg, keep: None if keep else tracked.remove(leg),
        caller_id="+31201234567",
        sip_headers={"X-CallBridge-Call-Id": "call_id", "X-Why": "summary"},
    )
    transfer = Transfer(
        id="t1",
        call_id="c1",
        source="api",
        destination="+31612345678",
        target=DialTarget(number="+31612345678", route="PJSIP/{number}@carrier"),
        mode=mode,
        ring_timeout=20,
        message="Connecting you now.",
        summary="Caller wants a refund, order 12\n{x},'y' – café",
    )
    return TransferRun(host, deps, transfer), host, pbx, tracked


async def start(run: TransferRun) -> str:
    await run.begin()
    await run.on_announced()
    assert run.transfer.leg_id is not None
    return run.transfer.leg_id


async def test_bridged_transfer_yields_a_typed_result() -> None:
    run, host, pbx, tracked = make_run()
    leg = await start(run)
    assert host.started and host.said == ["Connecting you now."]
    assert leg == "cbleg-t1"  # derived from the transfer: a restarted daemon finds it
    assert tracked == [leg] and pbx.names() == ["originate", "play_tone"]
    await run.on_leg_event(LegRinging(leg))
    await run.on_leg_event(LegAnswered(leg))
    assert pbx.verbs("connect") == [("ch1", leg)]
    assert ("stop_playback", "cbring-t1") in pbx.calls
    result = run.transfer.result()
    assert result.transferred and result.outcome is LegOutcome.ANSWERED and not result.caller_back
    assert host.call.status is CallStatus.TRANSFERRED and host.media_dropped
    assert host.done == [run.transfer] and "ring_guard" not in host.timers
    # Context into the PBX's artefacts: leg variables, INVITE headers, the CDR's outcome.
    variables, headers = pbx.leg_context[leg]
    assert variables["CALLBRIDGE_CALL_ID"] == "c1" and variables["CALLBRIDGE_TRANSFER_ID"] == "t1"
    assert variables["CALLBRIDGE_SUMMARY"] == "Caller wants a refund order 12 x y cafe"
    assert headers == {"X-CallBridge-Call-Id": "c1", "X-Why": variables["CALLBRIDGE_SUMMARY"]}
    assert pbx.verbs("record_outcome") == [
        ("ch1", {"transfer_id": "t1", "outcome": "answered", "destination": "+31612345678"})
    ]
    assert [k for k, _, _ in host.saved if k] == [
        "transfer.requested",
        "transfer.dialing",
        "transfer.ringing",
        "transfer.answered",
        "transfer.completed",
    ]


async def test_busy_gives_the_caller_back_with_a_typed_outcome() -> None:
    run, host, pbx, tracked = make_run()
    leg = await start(run)
    await run.on_leg_event(LegRinging(leg))
    await run.on_leg_event(LegFailed(leg, 17, "USER_BUSY", 486))
    result = run.transfer.result()
    assert result.caller_back and not result.transferred
    assert result.outcome is LegOutcome.BUSY and result.sip_code == 486
    assert pbx.verbs("record_outcome")[0][1]["outcome"] == "busy"
    assert host.call.status is CallStatus.ACTIVE and tracked == [] and host.done
    assert ("stop_playback", "cbring-t1") in pbx.calls


async def test_ring_guard_without_any_report_is_a_local_failure() -> None:
    run, host, pbx, _ = make_run()
    leg = await start(run)
    assert host.timers["ring_guard"][1] == "t1"
    await run.on_timer(TimerFired("ring_guard", "t1"))
    result = run.transfer.result()
    assert result.outcome is LegOutcome.FAILED and result.local_fault
    assert pbx.verbs("hangup") == [(leg,)]


async def test_close_cancels_an_open_transfer_and_hangs_up_its_leg() -> None:
    run, _host, pbx, tracked = make_run()
    leg = await start(run)
    event = await run.close("caller hung up")
    assert event is not None and event.kind == "transfer.cancelled"
    assert run.transfer.state is TransferState.CANCELLED
    assert pbx.verbs("hangup") == [(leg,)] and tracked == []
    assert await run.close("again") is None  # final: nothing more to settle


async def test_destination_hangup_after_the_bridge_ends_the_call() -> None:
    run, host, _pbx, _ = make_run()
    leg = await start(run)
    await run.on_leg_event(LegAnswered(leg))
    await run.on_leg_hangup(ChannelHungUp(leg, 16, "Normal Clearing"))
    assert host.ended == ["hung up: destination hung up"]


async def test_blind_mode_hands_off_and_ends_the_call() -> None:
    run, host, pbx, _ = make_run("blind")
    await run.begin()
    await run.on_announced()
    assert pbx.verbs("blind_transfer")[0][0] == "ch1" and pbx.verbs("originate") == []
    assert run.transfer.result().transferred and run.transfer.state is TransferState.HANDED_OFF
    assert host.media_dropped and host.ended == ["handed off to the PBX (blind transfer)"]


async def test_without_a_message_the_originate_goes_before_any_record() -> None:
    """Issue 8 section 4 kept by the run: nothing recorded before the originate, then the
    request and the dial in one commit, then the ringback."""
    run, host, pbx, _ = make_run()
    run.transfer.message = None
    seen: list[tuple[str, int]] = []
    originate = pbx.originate

    async def spy(*args: Any, **kwargs: Any) -> None:
        seen.append(("originate", len(host.saved)))
        await originate(*args, **kwargs)

    pbx.originate = spy  # type: ignore[method-assign]
    await run.begin()
    assert seen == [("originate", 0)]
    assert [k for k, _, _ in host.saved] == ["transfer.requested", "transfer.dialing"]
    assert pbx.names()[-1] == "play_tone" and "ring_guard" in host.timers


async def test_dtmf_goes_to_the_answered_leg_before_the_bridge() -> None:
    """Issue 9 §4: answer -> send_dtmf -> (the digits play, ringback goes on) -> bridge."""
    run, host, pbx, _ = make_run()
    run.transfer.dtmf = "ww12#"
    leg = await start(run)
    await run.on_leg_event(LegAnswered(leg))
    assert pbx.verbs("send_dtmf") == [(leg, "ww12#")] and pbx.verbs("connect") == []
    assert host.timers["dtmf_done"] == (pytest.approx(1.6), "t1")
    assert "ring_guard" not in host.timers
    assert ("stop_playback", "cbring-t1") not in pbx.calls  # the caller still hears ringback
    assert [k for k, _, _ in host.saved][-1] == "transfer.dtmf_sent"
    await run.on_timer(TimerFired("dtmf_done", "t1"))
    assert pbx.verbs("connect") == [("ch1", leg)] and run.transfer.state is TransferState.BRIDGED
    assert pbx.verbs("send_dtmf") == [(leg, "ww12#")]  # once


async def test_leg_hangup_while_dtmf_plays_gives_the_caller_back() -> None:
    run, host, pbx, _ = make_run()
    run.transfer.dtmf = "1"
    leg = await start(run)
    await run.on_leg_event(LegAnswered(leg))
    await run.on_leg_hangup(ChannelHungUp(leg, 16, "Normal Clearing"))
    assert run.transfer.state is TransferState.FAILED and host.call.status is CallStatus.ACTIVE
    assert "dtmf_done" not in host.timers and pbx.verbs("connect") == []
