"""A transfer run as its own object: speak the message, dial, ring, bridge, or fail back to
the assistant. The one place where transfer outcomes and fallbacks are decided (what a leg's
failure means is `bridge.calls.outcomes`); the state machine itself (which step may follow
which) is `bridge.calls.transfer`.

`TransferRun` executes one transfer of one call. It runs in the call's task (the session
hands it the events that concern it) and depends only on what it is given:

- `TransferHost`: what it needs of its call (the call record, persistence, timers, speech,
  the caller's media and conversation): `CallSession` implements it;
- `TransferDeps`: the PBX adapter, the toll-fraud policy (leg counting), leg routing, the
  caller id to present.

Its typed result is `Transfer.result()` (`TransferResult`), handed to the host when the
transfer is final (`host.transfer_done`). Warm transfers and fallback chains build on it.

Guarantees kept here:
- a failed transfer puts the caller back to ACTIVE with media attached and a listening
  conversation (the host does that part), and only then tells the conversation the result;
- a local fault (PBX unreachable, PBX refused the originate, bad route) is `failed` with a
  local reason, never counted against the destination; an originate that finds the PBX
  unreachable waits for the connection and retries within the ring timeout;
- the ringback's playback id is derived from the transfer, so a restarted daemon stops it;
- the leg is originated before anything that can follow it is recorded or played (issue 8
  section 4); its id is derived from the transfer (`leg_for`), so a restarted daemon finds a
  leg nothing recorded (`on_resume` adopts it, dials it once if it was never dialled).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bridge import faults
from bridge.calls.context import leg_headers, leg_variables, outcome_fields, summary_of
from bridge.calls.model import Call, CallEvent, CallStatus, TransferCommand, utcnow
from bridge.calls.outcomes import classify_leg_failure, local_reason, timeout_outcome
from bridge.calls.transfer import Transfer, TransferEvent, TransferState
from bridge.calls.warm import WarmSteps, warm_plan
from bridge.directory.models import destination_address
from bridge.errors import BridgeError, DestinationNotAllowed, PbxUnavailable
from bridge.pbx.ports import (
    ChannelGone,
    ChannelHungUp,
    DialTarget,
    LegAnswered,
    LegFailed,
    LegOutcome,
    LegProgress,
    LegRinging,
    PbxAdapter,
    dtmf_seconds,
)

if TYPE_CHECKING:
    from bridge.calls.items import Resume, TimerFired
    from bridge.calls.policy import TransferPolicy
    from bridge.config import TransferSettings
    from bridge.directory.models import Assistant
    from bridge.media.rtp import RtpStream

# Extra time the ring guard gives a PBX that enforces the ring timeout itself.
RING_GUARD_MARGIN_S = 10.0
# Turns of the event loop the originate's request is given to leave before anything else of
# the transfer runs: its own task's first step, then the HTTP client's body write (aiohttp on
# Python 3.11 writes a request with a body from a task of its own). Measured, issue 8 §4.
REQUEST_TURNS = 2


async def let_request_leave() -> None:
    """Let the PBX request just started go out before the work that follows it."""
    for _ in range(REQUEST_TURNS):
        await asyncio.sleep(0)


LegEvent = LegRinging | LegProgress | LegAnswered | LegFailed


def transfer_accepted(call_id: str, transfer: Transfer) -> dict[str, Any]:
    """The 202 body of a transfer command: what is known when it is answered (authorised,
    on record, its id and state); the leg's outcome comes as the call's events."""
    return {
        "id": call_id,
        "accepted": "transfer",
        "transfer_id": transfer.chain_id or transfer.id,  # a fallback chain: its first attempt
        "state": transfer.state.value,
    }


def leg_for(transfer: Transfer) -> str:
    """The id of a transfer's leg, derived from the transfer (as its ringback's is): a
    restarted daemon finds the leg its predecessor placed even when nothing recorded it."""
    return transfer.leg_id or f"cbleg-{transfer.id}"


class TransferHost(Protocol):
    """What a transfer needs of its call: the explicit dependency list (`CallSession`)."""

    call: Call
    log: Any  # a bound structlog logger

    @property
    def has_media(self) -> bool: ...

    def say(
        self, text: str, *, token: str = "", interruptible: bool = True
    ) -> asyncio.Task[None]: ...
    def post(self, item: Any) -> None: ...
    async def record(self, kind: str, **data: Any) -> None: ...
    async def save(
        self,
        transfer: Transfer,
        *,
        call: bool = False,
        event: CallEvent | None = None,
        events: list[CallEvent] | None = None,
    ) -> None:
        """The transfer (and the call when asked) and an event (`event`, then `events`), in
        one transaction."""
        ...

    def set_timer(self, name: str, delay: float, ref: str) -> None: ...
    def cancel_timer(self, name: str) -> None: ...
    async def quietly(self, what: str, step: Awaitable[Any]) -> None: ...
    async def end(self, reason: str) -> None:
        """The call ends (the host settles this run through `close`)."""
        ...

    async def hang_up(self, reason: str) -> None:
        """Hang the caller up, then end."""
        ...

    def transfer_started(self) -> None:
        """The assistant stops its turn and listening; queued speech is flushed."""
        ...

    def drop_media(self) -> None:
        """The caller leaves the assistant's media (bridged, or handed to the PBX)."""
        ...

    # --- hand back (issue 9 §5): bridge/calls/handback.py ---
    async def return_on_destination_hangup(self, run: TransferRun) -> bool:
        """The bridged destination hung up: True when the caller was taken back to the
        assistant (its setting), False to hang the caller up."""
        ...

    # --- warm transfer (issue 9 §2) ---
    async def open_leg_media(self, leg_id: str, on_audio: Callable[[bytes], None]) -> RtpStream:
        """Our media on an answered leg alone (the brief); raises `ChannelGone`,
        `BridgeError`, `OSError`."""
        ...

    async def synthesize(self, text: str) -> bytes:
        """The call's TTS (8 kHz 16-bit PCM)."""
        ...

    async def caller_words(self) -> list[str]:
        """What the caller said so far (the call's transcript), oldest first."""
        ...

    async def brief_summary(self) -> str | None:
        """A warm brief written by the assistant's model (issue 9 §2), or None when it has
        none; the warm steps bound the time and check the text."""
        ...

    async def transfer_done(self, transfer: Transfer) -> None:
        """The transfer is final and persisted. Bridged: tell the conversation. Failed: the
        caller is ACTIVE again: attach media if needed, then say why and tell the
        conversation (`transfer.result()` is the typed result)."""
        ...

    # --- speed (issue 7 §8) ---
    def transfer_recorded(self) -> None:
        """The transfer is authorised and on record (durable): the command that asked for
        it may be answered now (`transfer_accepted`), before the PBX's round trips."""
        ...


@dataclass(frozen=True, slots=True)
class TransferDeps:
    pbx: PbxAdapter
    policy: TransferPolicy | None
    track_leg: Callable[[str], None]  # route the leg's events to this call
    untrack_leg: Callable[[str, bool], None]  # (leg, keep: still bridged)
    caller_id: str | None
    sip_headers: dict[str, str] = field(default_factory=dict)  # transfer.sip_headers


async def open_transfer(
    host: TransferHost,
    deps: TransferDeps,
    command: TransferCommand,
    *,
    transfer_id: str,
    settings: TransferSettings,
    assistant: Assistant | None,
    source: str,
    label: str | None,
    transfers_in_call: int,
) -> TransferRun:
    """Authorise a new transfer (the toll-fraud policy, `bridge.calls.policy`); a refusal
    is recorded as `transfer.refused` and raised. The host adopts the run, then `begin`s it."""
    assert deps.policy is not None
    try:
        target = await deps.policy.authorize(
            command.destination,
            number_id=host.call.number_id,
            assistant=assistant,
            source=source,
            transfers_in_call=transfers_in_call,
        )
    except DestinationNotAllowed as exc:
        await host.record(
            "transfer.refused",
            rule=exc.details.get("rule"),
            destination=command.destination,
            source=source,
            reason=exc.message,
        )
        raise
    configured = _configured(assistant, command.destination)
    mode = command.mode or getattr(configured, "transfer_mode", None) or settings.mode
    transfer = Transfer(
        id=transfer_id,
        call_id=host.call.id,
        source=source,
        destination=command.destination,
        target=target,
        mode=mode,
        ring_timeout=command.ring_timeout or settings.ring_timeout,
        message=command.message,
        label=label,
        summary=command.summary,
        dtmf=getattr(configured, "dtmf", None),
    )
    if mode == "warm":  # issue 9 §2
        said = await host.caller_words()
        transfer.warm = warm_plan(
            command, configured, settings, host.call, summary_of(transfer), said
        )
    return TransferRun(host, deps, transfer)


def _configured(assistant: Assistant | None, destination: str) -> object | None:
    """The assistant's destination `destination` names: its `dtmf` (issue 9 §4) and warm
    settings (§2) apply to the transfer."""
    if assistant is None:
        return None
    for configured in assistant.destinations():
        if destination_address(configured) == destination:
            return configured
    return None


class TransferRun:
    """One transfer of one call, driven by the call's task."""

    def __init__(self, host: TransferHost, deps: TransferDeps, transfer: Transfer) -> None:
        self.host = host
        self.deps = deps
        self.transfer = transfer
        self.ringback: str | None = None  # the caller's ringback playback, while it plays
        self.redial = False  # an originate found the PBX unreachable: retry on resume
        self._claimed: DialTarget | None = None
        self._dial_deadline: float | None = None
        self.dtmf_sent = False  # the destination's DTMF went out (once per transfer)
        self.warm = WarmSteps(self) if transfer.warm is not None else None  # issue 9 §2

    @property
    def token(self) -> str:
        """The speech token of the transfer's message."""
        return f"transfer:{self.transfer.id}"

    # --- start ------------------------------------------------------------------------------

    async def begin(self) -> None:
        """The assistant stops; with a message (not interruptible), the request is recorded
        and the message spoken, then `on_announced` runs (the session routes the `SpeechDone`
        back). Without one the leg is placed at once and the request recorded with it, after
        the originate (issue 8 section 4)."""
        transfer, host = self.transfer, self.host
        host.call.status = CallStatus.TRANSFERRING
        requested = CallEvent(
            "transfer.requested",
            utcnow(),
            {
                "transfer_id": transfer.id,
                "source": transfer.source,
                "destination": transfer.destination,
                "route": transfer.target.describe(),
                "mode": transfer.mode,
            },
        )
        host.log.info(
            "transfer.requested", transfer_id=transfer.id, route=transfer.target.describe()
        )
        host.transfer_started()
        if self.warm is not None:
            self.warm.start_summary()  # the model writes the brief while the leg rings (§2)
        if transfer.message and host.has_media:
            await host.save(transfer, call=True, event=requested)
            host.transfer_recorded()
            host.say(transfer.message, token=self.token, interruptible=False)
        else:
            # Nothing that can follow the originate sits before it: the request is recorded
            # with the dial, in one commit, right after the originate.
            await self.on_announced(pending=[requested])

    async def on_announced(self, pending: list[CallEvent] | None = None) -> None:
        """Place the transfer. `pending`: its events not recorded yet (recorded right after
        the PBX request, with what it changed, in one commit)."""
        transfer = self.transfer
        if transfer.state is not TransferState.ANNOUNCING:
            return
        pending = list(pending or [])
        if transfer.mode == "blind":
            await self._blind(pending)
            return
        transfer.apply(TransferEvent.MESSAGE_DONE)
        transfer.leg_id = leg_for(transfer)
        self.deps.track_leg(transfer.leg_id)
        dialing = CallEvent(
            "transfer.dialing", utcnow(), {"transfer_id": transfer.id, "leg": transfer.leg_id}
        )
        self._dial_deadline = asyncio.get_running_loop().time() + transfer.ring_timeout
        await self.dial(pending=[*pending, dialing])

    async def _save_pending(self, pending: list[CallEvent]) -> None:
        """The call, its transfer and the events not recorded yet, in one commit."""
        await self.host.save(self.transfer, call=True, events=pending)

    async def _blind(self, pending: list[CallEvent]) -> None:
        transfer = self.transfer
        # The outcome into the CDR first: once handed off, the caller is the dialplan's.
        await self.host.quietly(
            "record_outcome",
            self.deps.pbx.record_outcome(
                self.host.call.channel_id, outcome_fields(transfer) | {"outcome": "handed_off"}
            ),
        )
        try:
            await self.deps.pbx.blind_transfer(
                self.host.call.channel_id, transfer.target, transfer.ring_timeout
            )
        except ChannelGone:
            await self._save_pending(pending)
            await self.host.end("caller hung up")
            return
        except BridgeError as exc:
            await self._save_pending(pending)
            await self.fail(TransferEvent.ERROR, LegOutcome.FAILED, reason=local_reason(str(exc)))
            return
        settled = self._settle(TransferEvent.HANDED_OFF, None)
        await self._save_pending([*pending, *([settled] if settled else [])])
        self.host.drop_media()
        await self.host.end("handed off to the PBX (blind transfer)")

    async def dial(self, *, retry: bool = False, pending: list[CallEvent] | None = None) -> None:
        """Place the leg, then record it (`pending`, one commit), then start the ringback:
        nothing that can follow the originate sits before it (issue 8 section 4). A daemon
        that dies in between leaves a leg the next one recognises (`leg_for`, its
        CALLBRIDGE_* variables: see `Reconciler`). A PBX that cannot be reached is our fault,
        not the destination's: wait for the connection (a `Resume` comes) and retry while
        the ring timeout lasts."""
        transfer, host, pbx = self.transfer, self.host, self.deps.pbx
        assert transfer.leg_id is not None
        loop = asyncio.get_running_loop()
        if self._dial_deadline is None:
            self._dial_deadline = loop.time() + transfer.ring_timeout
        remaining = self._dial_deadline - loop.time()
        self.redial = False
        if retry:
            await host.record("transfer.redialing", transfer_id=transfer.id)
        policy = self.deps.policy
        try:
            if policy is not None:
                policy.claim_leg(transfer.target)
                self._claimed = transfer.target
            await faults.point("before_originate")
            placing = asyncio.ensure_future(
                self._placed(
                    pbx.originate(
                        transfer.leg_id,
                        transfer.target,
                        caller_number=self.deps.caller_id,
                        ring_timeout=max(1.0, remaining) if retry else transfer.ring_timeout,
                        variables=leg_variables(host.call, transfer),
                        headers=leg_headers(host.call, transfer, self.deps.sip_headers),
                    )
                )
            )
            # speed (issue 7 §8): recorded during the originate's round trip, not after it;
            # the command is answered once recorded. The originate's request leaves first:
            # the record's commit (its database thread, the GIL) started beside it delayed
            # the INVITE by ~0.4 ms (issue 8 §4).
            try:
                await let_request_leave()
            except asyncio.CancelledError:
                placing.cancel()
                raise
            placed, recorded = await asyncio.gather(
                placing, self._record(pending), return_exceptions=True
            )
            if isinstance(recorded, BaseException):
                raise recorded
            if isinstance(placed, BaseException):
                raise placed
        except (BridgeError, ChannelGone, ValueError) as exc:
            await self._dial_failed(exc, remaining)
            return
        try:
            if self.warm is not None:
                await self.warm.hold()  # music on hold instead of ringback (issue 9 §2)
            else:
                await pbx.play_tone(host.call.channel_id, "ring", transfer.ringback_id)
                self.ringback = transfer.ringback_id
        except ChannelGone:
            await host.end("caller hung up")
            return
        except BridgeError as exc:
            host.log.warning("transfer.ringback_failed", error=str(exc))
        # The PBX enforces the ring timeout; this guard covers a PBX that never reports.
        host.set_timer("ring_guard", max(1.0, remaining) + RING_GUARD_MARGIN_S, transfer.id)

    async def _placed(self, placing: Awaitable[None]) -> None:
        await placing
        await faults.point("after_originate")

    async def _record(self, pending: list[CallEvent] | None) -> None:
        """The transfer's events not recorded yet (one commit), then the command's answer."""
        await faults.point("before_record")
        if pending:
            await self._save_pending(pending)
        self.host.transfer_recorded()

    async def _dial_failed(self, exc: BaseException, remaining: float) -> None:
        transfer, host = self.transfer, self.host
        self._release_claim()
        if isinstance(exc, PbxUnavailable):
            if remaining > 1.0:
                self.redial = True
                host.log.warning("transfer.pbx_unavailable", transfer_id=transfer.id)
                await host.record(
                    "transfer.pbx_unavailable", transfer_id=transfer.id, error=str(exc)
                )
                host.set_timer("ring_guard", remaining, transfer.id)
                return
            await self.fail(
                TransferEvent.ERROR,
                LegOutcome.FAILED,
                reason=local_reason(f"the PBX is unreachable: {exc}"),
            )
            return
        if isinstance(exc, DestinationNotAllowed):
            # The trunk's last free leg went during the message (leftovers: issue 7 §1).
            await host.record(
                "transfer.refused",
                rule=exc.details.get("rule"),
                destination=transfer.destination,
                source=transfer.source,
                reason=exc.message,
                transfer_id=transfer.id,
            )
        await self.fail(TransferEvent.ERROR, LegOutcome.FAILED, reason=local_reason(str(exc)))

    def release_claim(self) -> None:
        """Hand back (issue 9 §5): a returned bridge frees its leg's claim too."""
        self._release_claim()

    def _release_claim(self) -> None:
        target, self._claimed = self._claimed, None
        policy = self.deps.policy
        if target is not None and policy is not None:
            try:
                policy.release_leg(target)
            except Exception:
                self.host.log.exception("transfer.release_leg_failed")

    # --- what the leg does ------------------------------------------------------------------

    async def on_leg_event(self, event: LegEvent) -> None:
        transfer = self.transfer
        if event.channel_id != transfer.leg_id or transfer.final:
            if isinstance(event, LegAnswered):  # a leg nobody waits for: do not leave it up
                await self.host.quietly("hangup_leg", self.deps.pbx.hangup(event.channel_id))
            return
        if transfer.state is TransferState.ANNOUNCING:
            return  # not placed yet: cannot be ours
        if isinstance(event, LegRinging | LegProgress):
            await self._on_leg_alive(early_media=isinstance(event, LegProgress))
            return
        if isinstance(event, LegFailed):
            outcome, reason = classify_leg_failure(
                event, rang=transfer.rang, progressed=transfer.progressed
            )
            await self.fail(
                TransferEvent.LEG_FAILED,
                outcome,
                cause=event.cause,
                cause_text=event.cause_text,
                sip_code=event.sip_code,
                reason=reason,
            )
            return
        if transfer.state is TransferState.ANSWERED:
            return  # a repeated answer (e.g. reported again after a reconnect)
        transfer.apply(TransferEvent.LEG_ANSWERED)
        await self.host.record("transfer.answered", transfer_id=transfer.id)
        await self.after_answer()

    async def after_answer(self) -> None:
        """The leg answered: send the destination's DTMF first (an IVR behind it, issue 9
        §4) and bridge once it has played (`dtmf_done` timer; the caller hears ringback
        meanwhile), else bridge now."""
        transfer, host = self.transfer, self.host
        digits = transfer.dtmf
        if not digits or self.dtmf_sent:
            await self._answered()
            return
        assert transfer.leg_id is not None
        self.dtmf_sent = True
        try:
            await self.deps.pbx.send_dtmf(transfer.leg_id, digits)
        except ChannelGone:
            return  # the leg hung up: its hangup event fails the transfer back
        except BridgeError as exc:
            await self.fail(
                TransferEvent.ERROR,
                LegOutcome.FAILED,
                reason=local_reason(f"could not send DTMF: {exc}"),
                hangup_leg=True,
            )
            return
        host.cancel_timer("ring_guard")
        await host.record("transfer.dtmf_sent", transfer_id=transfer.id, dtmf=digits)
        host.set_timer("dtmf_done", dtmf_seconds(digits), transfer.id)

    async def _answered(self) -> None:
        """Answered (its DTMF sent): a warm transfer briefs the destination first."""
        if self.warm is not None:
            await self.warm.answered()
        else:
            await self.connect_leg()

    async def on_leg_dtmf(self, digit: str) -> None:
        """A key pressed on the leg: a warm transfer's accept / decline (issue 9 §2)."""
        if self.warm is not None and not self.transfer.final:
            await self.warm.on_dtmf(digit)

    async def _on_leg_alive(self, *, early_media: bool) -> None:
        """180 Ringing, or 183 / early media: the destination is alive and working on it."""
        transfer = self.transfer
        if transfer.state not in (TransferState.DIALING, TransferState.RINGING):
            return
        first = not (transfer.progressed if early_media else transfer.rang)
        if early_media:
            transfer.progressed = True
        else:
            transfer.rang = True
        if transfer.state is TransferState.DIALING:
            transfer.apply(TransferEvent.LEG_RINGING)
        elif not first:
            return
        kind = "transfer.progress" if early_media else "transfer.ringing"
        await self.host.save(
            transfer, event=CallEvent(kind, utcnow(), {"transfer_id": transfer.id})
        )

    async def on_leg_hangup(self, event: ChannelHungUp) -> None:
        """The leg's channel hung up (after answer, or reported as a hangup)."""
        transfer = self.transfer
        leg = transfer.leg_id
        if self.warm is not None and await self.warm.leg_hung_up():
            return
        if transfer.state is TransferState.ANSWERED:
            await self.fail(
                TransferEvent.LEG_FAILED,
                LegOutcome.FAILED,
                cause=event.cause,
                cause_text=event.cause_text,
                reason="the destination hung up before the bridge",
            )
        elif leg and transfer.state in (TransferState.DIALING, TransferState.RINGING):
            # An unanswered leg reported as a hangup: the same facts as a failure.
            await self.on_leg_event(LegFailed(leg, event.cause, event.cause_text, None))
        elif transfer.state is TransferState.BRIDGED:
            await self.host.record("transfer.destination_hung_up", transfer_id=transfer.id)
            if await self.host.return_on_destination_hangup(self):  # hand back (issue 9 §5)
                return
            await self.host.hang_up("destination hung up")

    async def connect_leg(self) -> None:
        transfer, host = self.transfer, self.host
        assert transfer.leg_id is not None
        host.cancel_timer("ring_guard")
        host.cancel_timer("leg_lost")
        host.cancel_timer("dtmf_done")
        # Before connecting: Asterisk stalls channel operations while a playback runs.
        await self.stop_ringback()
        if self.warm is not None:
            await self.warm.finish()  # the brief's media off the leg, the hold music off
        try:
            await self.deps.pbx.connect(host.call.channel_id, transfer.leg_id)
        except ChannelGone:
            # The caller left (or the leg did): `close` cancels the transfer, hangs up the leg.
            await host.end("caller hung up while the destination answered")
            return
        except BridgeError as exc:
            await self.fail(
                TransferEvent.ERROR,
                LegOutcome.FAILED,
                reason=local_reason(f"could not bridge: {exc}"),
                hangup_leg=True,
            )
            return
        host.drop_media()
        settled = self._settle(TransferEvent.CONNECTED, LegOutcome.ANSWERED)
        host.call.status = CallStatus.TRANSFERRED
        await host.save(transfer, call=True, event=settled)  # together: one commit
        host.log.info("transfer.bridged", transfer_id=transfer.id, leg=transfer.leg_id)
        await self._record_outcome()
        await host.transfer_done(transfer)

    # --- timers and resume ------------------------------------------------------------------

    async def on_timer(self, timer: TimerFired) -> None:
        transfer = self.transfer
        if transfer.id != timer.ref or transfer.final:
            return
        if timer.name == "ring_guard" and transfer.state in (
            TransferState.DIALING,
            TransferState.RINGING,
        ):
            if self.redial:
                self.redial = False
                await self.fail(
                    TransferEvent.ERROR,
                    LegOutcome.FAILED,
                    reason=local_reason("the PBX stayed unreachable for the whole ring timeout"),
                )
                return
            outcome, reason = timeout_outcome(rang=transfer.rang, progressed=transfer.progressed)
            await self.fail(TransferEvent.LEG_FAILED, outcome, reason=reason, hangup_leg=True)
        elif timer.name == "dtmf_done" and transfer.state is TransferState.ANSWERED:
            await self._answered()
        elif self.warm is not None and await self.warm.on_timer(timer.name):
            return
        elif timer.name == "leg_lost" and transfer.state is not TransferState.ANNOUNCING:
            await self.fail(
                TransferEvent.ERROR,
                LegOutcome.FAILED,
                reason=local_reason("the new leg was lost while callbridge was disconnected"),
                hangup_leg=True,
            )

    async def on_resume(self, resume: Resume, grace_s: float) -> bool:
        """Pick the transfer up after a reconnect or restart. True when it decided what
        happens to the caller (the host then leaves the media alone)."""
        transfer, host = self.transfer, self.host
        leg = transfer.leg_id
        if host.call.status is CallStatus.TRANSFERRED:
            if leg is None or leg not in resume.live_legs:
                await host.hang_up("destination left while callbridge was disconnected")
            return True
        if transfer.final:
            return False
        if transfer.state is TransferState.ANNOUNCING:
            if leg_for(transfer) in resume.live_legs:
                await self._adopt_leg(leg_for(transfer), resume)
                return True
            return False  # the host attaches media and announces again (or dials)
        # The ringback may be playing (ours, or our predecessor's): its id is derived.
        self.ringback = transfer.ringback_id
        if self.warm is not None and await self.warm.resume():
            return True
        if leg in resume.undialled_legs:
            await self.dial(retry=True)  # created, never dialled: dial it now, once
            return True
        if self.redial and transfer.state is TransferState.DIALING:
            await self.dial(retry=True)  # the PBX is back: place the leg now
            return True
        if leg in resume.answered_legs:
            if transfer.state is not TransferState.ANSWERED:
                transfer.apply(TransferEvent.LEG_ANSWERED)
            await self.after_answer()
            return True
        if leg in resume.live_legs:
            host.set_timer("ring_guard", transfer.ring_timeout, transfer.id)
            return True
        # The leg vanished while we were away. The adapter may still tell how it ended (a
        # late LegFailed with the real cause): wait a moment for it, then fail back.
        host.set_timer("leg_lost", grace_s, transfer.id)
        return True

    async def _adopt_leg(self, leg: str, resume: Resume) -> None:
        """Our predecessor placed this transfer's leg and stopped before recording it (the
        originate goes first, issue 8 section 4). Record it now and carry on: dial it if it
        was never dialled, connect it if it answered meanwhile, else wait for its events."""
        transfer, host = self.transfer, self.host
        transfer.apply(TransferEvent.MESSAGE_DONE)
        transfer.leg_id = leg
        self.deps.track_leg(leg)
        dialled = leg not in resume.undialled_legs
        dialing = CallEvent(
            "transfer.dialing",
            utcnow(),
            {"transfer_id": transfer.id, "leg": leg, "adopted": True, "dialled": dialled},
        )
        if not dialled:
            await self.dial(pending=[dialing])  # the adapter dials the existing leg
            return
        await self._save_pending([dialing])
        if leg in resume.answered_legs:
            transfer.apply(TransferEvent.LEG_ANSWERED)
            await self.after_answer()
            return
        await host.quietly(
            "ringback",
            self.deps.pbx.play_tone(host.call.channel_id, "ring", transfer.ringback_id),
        )
        self.ringback = transfer.ringback_id
        host.set_timer("ring_guard", transfer.ring_timeout + RING_GUARD_MARGIN_S, transfer.id)

    # --- the end ----------------------------------------------------------------------------

    def _settle(
        self,
        event: TransferEvent,
        outcome: LegOutcome | None,
        *,
        cause: int | None = None,
        cause_text: str | None = None,
        sip_code: int | None = None,
        reason: str | None = None,
    ) -> CallEvent | None:
        """Move the transfer to its final state (in memory); return the event to record with
        it. The caller persists both, with the call when it changes too."""
        transfer, host = self.transfer, self.host
        if transfer.final:
            return None
        if outcome is None:
            transfer.apply(event)
        else:
            transfer.settle(
                event,
                outcome,
                cause=cause,
                cause_text=cause_text,
                sip_code=sip_code,
                reason=reason,
            )
        host.cancel_timer("ring_guard")
        host.cancel_timer("leg_lost")
        host.cancel_timer("dtmf_done")
        bridged = transfer.state is TransferState.BRIDGED
        if transfer.leg_id:
            self.deps.untrack_leg(transfer.leg_id, bridged)
        if not bridged:
            self._release_claim()
        host.log.info(
            "transfer.settled",
            transfer_id=transfer.id,
            state=transfer.state.value,
            outcome=transfer.outcome.value if transfer.outcome else None,
            sip_code=sip_code,
            cause=cause,
            reason=transfer.reason,
        )
        return settled_event(transfer)

    async def fail(
        self,
        event: TransferEvent,
        outcome: LegOutcome,
        *,
        cause: int | None = None,
        cause_text: str | None = None,
        sip_code: int | None = None,
        reason: str | None = None,
        hangup_leg: bool = False,
    ) -> None:
        """The caller stays with us: stop ringback, back to ACTIVE, then the host attaches
        media and the conversation and tells it the typed result."""
        transfer, host = self.transfer, self.host
        if transfer.final:
            return
        leg = transfer.leg_id
        settled = self._settle(
            event, outcome, cause=cause, cause_text=cause_text, sip_code=sip_code, reason=reason
        )
        host.call.status = CallStatus.ACTIVE
        await host.save(transfer, call=True, event=settled)
        if hangup_leg and leg:
            await host.quietly("hangup_leg", self.deps.pbx.hangup(leg))
        await self.stop_ringback()
        if self.warm is not None:
            await self.warm.finish()  # before the caller's media is attached again
        await self._record_outcome()
        await host.transfer_done(transfer)

    async def _record_outcome(self) -> None:
        """The outcome into the caller's CDR (never fails the transfer)."""
        await self.host.quietly(
            "record_outcome",
            self.deps.pbx.record_outcome(self.host.call.channel_id, outcome_fields(self.transfer)),
        )

    async def close(self, reason: str) -> CallEvent | None:
        """The call ends: settle an open transfer (cancelled), hang up its leg (open or
        bridged), stop the ringback, release the leg's claim. Never raises. Returns the
        settle event to store with the call's end (None when the transfer was final)."""
        transfer, host = self.transfer, self.host
        open_transfer = not transfer.final
        event = None
        if open_transfer:
            try:
                transfer.settle(
                    TransferEvent.CALLER_GONE,
                    LegOutcome.CANCELLED,
                    reason=f"the call ended during the transfer: {reason}",
                )
                event = settled_event(transfer)
            except Exception:
                host.log.exception("call.end_settle_failed", transfer_id=transfer.id)
        host.cancel_timer("ring_guard")
        host.cancel_timer("leg_lost")
        host.cancel_timer("dtmf_done")
        leg = transfer.leg_id
        if leg and (open_transfer or transfer.state is TransferState.BRIDGED):
            await host.quietly("hangup_leg", self.deps.pbx.hangup(leg))
            self.deps.untrack_leg(leg, False)
        await host.quietly("stop_ringback", self.stop_ringback())
        if self.warm is not None:
            await self.warm.finish()
        try:
            self._release_claim()
        except Exception:
            host.log.exception("call.release_claim_failed")
        return event

    async def stop_ringback(self) -> None:
        if self.ringback is not None:
            playback, self.ringback = self.ringback, None
            try:
                await self.deps.pbx.stop_playback(playback)
            except (BridgeError, ChannelGone) as exc:
                self.host.log.warning("transfer.ringback_stop_failed", error=str(exc))


def settled_event(transfer: Transfer) -> CallEvent:
    kind = (
        "transfer.completed"
        if transfer.state is TransferState.BRIDGED
        else f"transfer.{transfer.state.value}"
    )
    return CallEvent(
        kind,
        utcnow(),
        {
            "transfer_id": transfer.id,
            "outcome": transfer.outcome.value if transfer.outcome else None,
            "sip_code": transfer.sip_code,
            "cause": transfer.cause,
            "cause_text": transfer.cause_text,
            "reason": transfer.reason,
        },
    )
