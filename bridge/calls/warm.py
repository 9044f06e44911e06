"""Warm transfer (issue 9 §2): the caller hears the PBX's music on hold while the destination
is dialled; once it answers it hears a brief (the caller does not), optionally only after it
spoke first, and optionally must accept (DTMF 1) before the caller joins. A decline (2), no
key in time, or a hang-up during the brief hands the caller back to the assistant through the
one failure path (`TransferRun.fail` -> host `transfer_done`), with a typed outcome.

`WarmSteps` is owned by the transfer's `TransferRun` (which keeps dialling, ringing, the ring
timeout and the end); PBX-neutral: the adapters give hold music (`start_hold`), our media on
the leg alone (`attach_media(leg)` / `end_brief(leg)`) and the leg's DTMF.

Steps recorded as call events: `transfer.warm_hold`, `transfer.warm_waiting_for_speech`,
`transfer.warm_briefing`, `transfer.warm_briefed`, `transfer.warm_accepted`,
`transfer.warm_declined`, `transfer.warm_timeout`; the states (`briefing`,
`awaiting_accept`) are in the transfer's history.
"""

from __future__ import annotations

import asyncio
from array import array
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bridge.calls.context import safe_value
from bridge.calls.items import TimerFired
from bridge.calls.model import CallEvent, utcnow
from bridge.calls.outcomes import local_reason
from bridge.calls.transfer import TransferEvent, TransferState, WarmPlan
from bridge.errors import BridgeError
from bridge.llm.brief import speakable_brief
from bridge.pbx.ports import ChannelGone, LegOutcome

if TYPE_CHECKING:
    from bridge.calls.model import Call, TransferCommand
    from bridge.calls.transferring import TransferRun
    from bridge.config import TransferSettings
    from bridge.media.rtp import RtpStream

# The destination "spoke" once this much of its audio was louder than SPEECH_RMS: a cheap
# energy check (a "hello?" is 0.3-0.6 s), not a VAD.
SPEECH_RMS = 500.0
SPEECH_FRAMES = 10  # 20 ms frames: 0.2 s

WAITING = (TransferState.BRIEFING, TransferState.AWAITING_ACCEPT)
BRIEF_WORDS = 200  # characters of the caller's own words in a default brief


def warm_plan(
    command: TransferCommand,
    configured: object | None,
    settings: TransferSettings,
    call: Call,
    summary: str | None,
    caller_said: list[str] | None = None,
) -> WarmPlan:
    """The plan of a warm transfer: the command's fields, else the assistant's destination's
    (`configured`), else `[transfer]`'s. Without a brief the destination hears who is coming
    and why (the transfer's summary or the destination's description), unless the
    assistant's model writes a better one in time (`WarmSteps.start_summary`)."""

    def pick(name: str) -> object:
        value = getattr(command, name, None)
        return getattr(configured, name, None) if value is None else value

    require_accept = bool(pick("require_accept"))
    timeout = pick("accept_timeout")
    configured_brief = pick("brief")
    return WarmPlan(
        brief=str(configured_brief or default_brief(call, summary, caller_said)),
        brief_source="configured" if configured_brief else "transcript",
        summary_timeout=settings.brief_summary_timeout,
        require_accept=require_accept,
        accept_timeout=timeout if isinstance(timeout, int | float) else settings.accept_timeout,
        wait_for_speech=bool(pick("wait_for_speech")),
        moh_class=str(pick("moh_class") or settings.moh_class),
        prompt=settings.accept_prompt if require_accept else None,
        speech_wait=settings.speech_wait,
    )


def default_brief(call: Call, summary: str | None, caller_said: list[str] | None = None) -> str:
    """What the destination hears when no brief was configured: who is coming, why (the
    transfer's summary or the destination's description) and, from the transcript, the
    caller's own last words (up to BRIEF_WORDS characters): a summary made without a model."""
    caller = safe_value(call.caller_number, 64)
    who = f"A caller from {caller}" if caller else "A caller"
    parts = [f"{who} is being transferred to you."]
    why = safe_value(summary)
    if why:
        parts.append(f"About: {why}.")
    said = safe_value(" ".join(caller_said[-2:]) if caller_said else "", BRIEF_WORDS)
    if said:
        parts.append(f"They said: {said}")
    return " ".join(parts)


class WarmSteps:
    """The warm part of one transfer; every method runs in the call's task."""

    def __init__(self, run: TransferRun) -> None:
        self.run = run
        self.holding = False  # the caller hears music on hold (ours to stop)
        self.media: RtpStream | None = None  # our media on the leg, during the brief
        self.on_leg = False  # the PBX has our brief media on the leg (ours to take off)
        self.spoke = False
        self._loud_frames = 0
        self._briefing: asyncio.Task[None] | None = None
        self._summary: asyncio.Task[str | None] | None = None  # the model's brief, if asked
        self._awaiting_summary = False  # answered before the model's brief was ready

    # --- the brief by the assistant's model -----------------------------------------------

    def start_summary(self) -> None:
        """Without a configured brief, ask the assistant's model for one as the transfer
        starts, so that it is usually written while the destination rings. The task ends
        within `summary_timeout` of now, whatever the model does."""
        budget = self.plan.summary_timeout
        if self.plan.brief_source != "transcript" or budget <= 0:
            return
        self._summary = asyncio.get_running_loop().create_task(self._summarize(budget))

    async def _summarize(self, budget: float) -> str | None:
        async with asyncio.timeout(budget):
            return speakable_brief(await self.run.host.brief_summary())

    def _written(self, task: asyncio.Task[str | None]) -> tuple[str | None, str | None]:
        """The model's brief, or why there is none (recorded with the brief used)."""
        if task.cancelled():
            return None, "cancelled"
        exc = task.exception()
        if isinstance(exc, TimeoutError):
            return None, f"no brief from the model within {self.plan.summary_timeout:g} s"
        if exc is not None:
            return None, f"{type(exc).__name__}: {exc}"
        written = task.result()
        return (written, None) if written else (None, "the model gave no usable brief")

    @property
    def plan(self) -> WarmPlan:
        assert self.run.transfer.warm is not None
        return self.run.transfer.warm

    # --- while the destination is dialled -----------------------------------------------------

    async def hold(self) -> None:
        """The caller leaves the assistant's media and hears music on hold (never silence: a
        PBX that refuses the class plays ringback instead). Raises `ChannelGone`."""
        run, host = self.run, self.run.host
        transfer = run.transfer
        host.drop_media()
        try:
            await run.deps.pbx.start_hold(host.call.channel_id, self.plan.moh_class)
            self.holding = True
            await host.record(
                "transfer.warm_hold", transfer_id=transfer.id, moh_class=self.plan.moh_class
            )
        except BridgeError as exc:
            host.log.warning("transfer.hold_failed", error=str(exc))
            await host.record("transfer.warm_hold", transfer_id=transfer.id, error=str(exc))
            await run.deps.pbx.play_tone(host.call.channel_id, "ring", transfer.ringback_id)
            run.ringback = transfer.ringback_id

    # --- once the destination answered --------------------------------------------------------

    async def answered(self) -> None:
        """The leg answered (its DTMF, if any, sent): our media on the leg alone, then the
        brief, or first wait for the destination to speak."""
        run, host = self.run, self.run.host
        transfer = run.transfer
        assert transfer.leg_id is not None
        transfer.apply(TransferEvent.BRIEF)
        await host.save(transfer)
        try:
            self.on_leg = True
            self.media = await host.open_leg_media(transfer.leg_id, self._on_leg_audio)
        except ChannelGone:
            await self._gone()
            return
        except (BridgeError, OSError) as exc:
            await run.fail(
                TransferEvent.ERROR,
                LegOutcome.FAILED,
                reason=local_reason(f"could not brief the destination: {exc}"),
                hangup_leg=True,
            )
            return
        if self.plan.wait_for_speech and not self.spoke:
            await host.record("transfer.warm_waiting_for_speech", transfer_id=transfer.id)
            host.set_timer("warm_speech", self.plan.speech_wait, transfer.id)
            return
        await self._brief()

    def _on_leg_audio(self, pcm: bytes) -> None:
        """The destination's audio, 20 ms at a time: did it say something?"""
        if self.spoke:
            return
        samples = array("h", pcm[: len(pcm) // 2 * 2])
        if samples and (sum(s * s for s in samples) / len(samples)) ** 0.5 >= SPEECH_RMS:
            self._loud_frames += 1
        if self._loud_frames >= SPEECH_FRAMES:
            self.spoke = True
            self.run.host.post(TimerFired("warm_spoke", self.run.transfer.id))

    async def _brief(self) -> None:
        """Speak the brief (and the accept prompt) to the destination; `warm_briefed` comes
        back through the call's queue once it played."""
        run, host = self.run, self.run.host
        transfer, plan = run.transfer, self.plan
        host.cancel_timer("warm_speech")
        task = self._summary
        if task is not None and not task.done():
            # The model is still writing (within its budget): brief once it is done.
            if not self._awaiting_summary:
                self._awaiting_summary = True
                task.add_done_callback(lambda _: host.post(TimerFired("warm_summary", transfer.id)))
            return
        written, error = self._written(task) if task is not None else (None, None)
        if error:
            host.log.warning("transfer.brief_summary_unused", reason=error)
        if written:  # the record's plan says what the destination heard
            plan = transfer.warm = replace(plan, brief=written, brief_source="llm")
        text = f"{plan.brief} {plan.prompt}" if plan.prompt else plan.brief
        briefing: dict[str, Any] = {"transfer_id": transfer.id, "brief": plan.brief}
        briefing |= {"brief_source": plan.brief_source, "spoke_first": self.spoke}
        if error:
            briefing["summary_error"] = error
        await host.save(transfer, event=CallEvent("transfer.warm_briefing", utcnow(), briefing))
        self._briefing = asyncio.get_running_loop().create_task(self._speak(text))

    async def _speak(self, text: str) -> None:
        run, host = self.run, self.run.host
        played = False
        try:
            pcm = await host.synthesize(text)
            media = self.media
            if media is not None:
                played = await media.play(pcm, interruptible=False).done
        except Exception as exc:  # the brief could not be spoken: say so, decide as played
            host.log.error("transfer.brief_failed", error=str(exc))
        host.post(TimerFired("warm_briefed" if played else "warm_brief_failed", run.transfer.id))

    async def on_timer(self, name: str) -> bool:
        """The warm steps' timers and queue items; True when `name` was one of them."""
        run, host = self.run, self.run.host
        transfer = run.transfer
        if name in ("warm_spoke", "warm_speech", "warm_summary"):
            if transfer.state is TransferState.BRIEFING and self._briefing is None:
                await self._brief()
        elif name == "warm_briefed" and transfer.state is TransferState.BRIEFING:
            await host.record("transfer.warm_briefed", transfer_id=transfer.id)
            if not self.plan.require_accept:
                await run.connect_leg()
                return True
            transfer.apply(TransferEvent.BRIEFED)
            await host.save(transfer)
            host.set_timer("warm_accept", self.plan.accept_timeout, transfer.id)
        elif name == "warm_brief_failed" and transfer.state in WAITING:
            await run.fail(
                TransferEvent.ERROR,
                LegOutcome.FAILED,
                reason=local_reason("the brief could not be played to the destination"),
                hangup_leg=True,
            )
        elif name == "warm_accept" and transfer.state in WAITING:
            seconds = self.plan.accept_timeout
            await host.record("transfer.warm_timeout", transfer_id=transfer.id, seconds=seconds)
            await run.fail(
                TransferEvent.LEG_FAILED,
                LegOutcome.VOICEMAIL,
                reason=(
                    f"answered, but nobody accepted within {seconds:g} s "
                    "(a voicemail, or nobody there)"
                ),
                hangup_leg=True,
            )
        else:
            return name.startswith("warm_")
        return True

    async def on_dtmf(self, digit: str) -> None:
        """The destination's key: 1 accepts (the caller joins), 2 declines."""
        run, host = self.run, self.run.host
        transfer = run.transfer
        if transfer.state not in WAITING or not self.plan.require_accept:
            return
        if digit == "1":
            await host.record("transfer.warm_accepted", transfer_id=transfer.id, dtmf=digit)
            await run.connect_leg()
        elif digit == "2":
            await host.record("transfer.warm_declined", transfer_id=transfer.id, dtmf=digit)
            await run.fail(
                TransferEvent.LEG_FAILED,
                LegOutcome.DECLINED,
                reason="the destination declined the call (DTMF 2)",
                hangup_leg=True,
            )

    async def _gone(self) -> None:
        await self.run.fail(
            TransferEvent.LEG_FAILED,
            LegOutcome.DECLINED,
            reason="the destination hung up during the brief",
            hangup_leg=True,
        )

    async def leg_hung_up(self) -> bool:
        """The leg hung up; True if that was during the brief (the caller goes back)."""
        if self.run.transfer.state not in WAITING:
            return False
        await self._gone()
        return True

    async def resume(self) -> bool:
        """After a reconnect or a daemon restart. Music on hold may still play (ours or our
        predecessor's): stop it when the transfer ends. A transfer that was briefing or
        waiting for the key may have missed the destination's key or hang-up, and a restarted
        daemon has lost the brief's media: the caller goes back to the assistant (recorded;
        the leg hung up). True when that was decided here."""
        run = self.run
        self.holding = True
        if run.transfer.state not in WAITING:
            return False
        self.on_leg = True
        await run.fail(
            TransferEvent.ERROR,
            LegOutcome.FAILED,
            reason=local_reason(
                "callbridge restarted or lost the PBX connection during the warm brief"
            ),
            hangup_leg=True,
        )
        return True

    # --- the end ---------------------------------------------------------------------------

    async def finish(self) -> None:
        """Before the caller joins the destination or goes back to the assistant (or the call
        ends): stop the brief, take our media off the leg, stop the hold music. Never raises."""
        run, host = self.run, self.run.host
        for timer in ("warm_speech", "warm_accept"):
            host.cancel_timer(timer)
        if self._briefing is not None:
            self._briefing.cancel()
            self._briefing = None
        if self._summary is not None:
            if self._summary.done() and not self._summary.cancelled():
                self._summary.exception()  # retrieved: a failed model is no loose end
            self._summary.cancel()
            self._summary = None
        leg = run.transfer.leg_id
        if self.media is not None:
            self.media.close()
            self.media = None
        if self.on_leg and leg:
            self.on_leg = False
            await host.quietly("end_brief", run.deps.pbx.end_brief(leg))
        if self.holding:
            self.holding = False
            await host.quietly("stop_hold", run.deps.pbx.stop_hold(host.call.channel_id))
