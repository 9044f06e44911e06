"""The transfer steps of a call session: speak the message, dial, ring, bridge, or fail back
to the assistant. The one place where transfer outcomes and fallbacks are decided (what a
leg's failure means is `bridge.calls.outcomes`); the state machine itself (which step may
follow which) is `bridge.calls.transfer`.

Guarantees kept here:
- a failed transfer puts the caller back to ACTIVE with media attached and a listening
  conversation, and only then tells the conversation the result;
- a local fault (PBX unreachable, PBX refused the originate, bad route) is `failed` with a
  local reason, never counted against the destination; an originate that finds the PBX
  unreachable waits for the connection and retries within the ring timeout;
- the ringback's playback id is derived from the transfer, so a restarted daemon stops it.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any, Protocol, cast

from bridge import faults
from bridge.calls.items import TimerFired
from bridge.calls.model import Call, CallEvent, CallStatus, TransferCommand, utcnow
from bridge.calls.outcomes import classify_leg_failure, local_reason, timeout_outcome
from bridge.calls.transfer import Transfer, TransferEvent, TransferState
from bridge.errors import BridgeError, Conflict, DestinationNotAllowed, PbxUnavailable
from bridge.pbx.ports import (
    ChannelGone,
    DialTarget,
    LegAnswered,
    LegFailed,
    LegOutcome,
    LegProgress,
    LegRinging,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from bridge.calls.conversation import Conversation
    from bridge.calls.service import CallService
    from bridge.calls.session import CallSession
    from bridge.directory.models import Assistant
    from bridge.media.rtp import RtpStream

    class _Base(Protocol):
        """What the transfer steps use of their session: the explicit dependency list."""

        service: CallService
        call: Call
        assistant: Assistant | None
        transfer: Transfer | None
        media: RtpStream | None
        conversation: Conversation | None
        log: Any  # a bound structlog logger
        _ringback: str | None
        _redial: bool
        _untold: Transfer | None

        def say(
            self, text: str, *, token: str = "", interruptible: bool = True
        ) -> asyncio.Task[None]: ...
        def post(self, item: Any) -> None: ...
        async def record(self, kind: str, **data: Any) -> None: ...
        async def _persist(
            self, *, call: bool = False, transfer: bool = False, event: CallEvent | None = None
        ) -> None: ...
        def _set_timer(self, name: str, delay: float, ref: str) -> None: ...
        def _cancel_timer(self, name: str) -> None: ...
        async def _end(
            self, reason: str, *, cause: int | None = None, cause_text: str | None = None
        ) -> None: ...
        async def _quietly(self, what: str, step: Awaitable[Any]) -> None: ...
        async def _attach_media(self) -> bool: ...
        async def _start_conversation(self, *, resumed: bool) -> None: ...
        def _close_media(self) -> None: ...
else:
    _Base = object

# Extra time the ring guard gives a PBX that enforces the ring timeout itself.
RING_GUARD_MARGIN_S = 10.0


def leg_for(transfer: Transfer) -> str:
    """The id of a transfer's leg, derived from the transfer (as its ringback's is): a
    restarted daemon finds the leg its predecessor placed even when nothing recorded it."""
    return transfer.leg_id or f"cbleg-{transfer.id}"


class TransferSteps(_Base):
    """Mixed into `CallSession`: runs in the call's task like every other handler."""

    transfer: Transfer | None
    _ringback: str | None
    _untold: Transfer | None
    transfers_in_call: int = 0
    _claimed: DialTarget | None = None
    _dial_deadline: float | None = None

    async def start_transfer(
        self,
        command: TransferCommand,
        *,
        source: str,
        label: str | None = None,
    ) -> dict[str, Any]:
        if self.call.status is not CallStatus.ACTIVE:
            raise Conflict(
                f"cannot transfer while the call is {self.call.status.value}", field="type"
            )
        settings = self.service.settings.transfer
        try:  # the toll-fraud policy (bridge.calls.policy): route, or a refusal with its rule
            target = await self.service.policy.authorize(
                command.destination,
                number_id=self.call.number_id,
                assistant=self.assistant,
                source=source,
                transfers_in_call=self.transfers_in_call,
            )
        except DestinationNotAllowed as exc:
            await self.record(
                "transfer.refused",
                rule=exc.details.get("rule"),
                destination=command.destination,
                source=source,
                reason=exc.message,
            )
            raise
        transfer = Transfer(
            id=self._new_transfer_id(),
            call_id=self.call.id,
            source=source,
            destination=command.destination,
            target=target,
            mode=command.mode or settings.mode,
            ring_timeout=command.ring_timeout or settings.ring_timeout,
            message=command.message,
            label=label,
        )
        self.transfer = transfer
        self.transfers_in_call += 1
        self.call.status = CallStatus.TRANSFERRING
        requested = CallEvent(
            "transfer.requested",
            utcnow(),
            {
                "transfer_id": transfer.id,
                "source": source,
                "destination": transfer.destination,
                "route": target.describe(),
                "mode": transfer.mode,
            },
        )
        self.log.info("transfer.requested", transfer_id=transfer.id, route=target.describe())
        started = getattr(self.conversation, "on_transfer_started", None)
        if started is not None:
            started()  # the assistant stops its turn and stops listening until the result
        if self.media is not None:
            self.media.flush()  # the assistant stops talking; the message is not interruptible
        if command.message and self.media is not None:
            await self._persist(call=True, transfer=True, event=requested)
            self.say(command.message, token=f"transfer:{transfer.id}", interruptible=False)
        else:
            # Issue 8 section 4: nothing that can follow the originate sits before it. The
            # request is recorded with the dial, in one commit, right after the originate.
            await self._after_announcement(pending=[requested])
        return {"id": self.call.id, "accepted": "transfer", "transfer_id": transfer.id}

    def _new_transfer_id(self) -> str:
        return str(uuid.uuid4())

    async def _after_announcement(self, pending: list[CallEvent] | None = None) -> None:
        """Place the transfer. `pending`: its events not recorded yet (they are recorded
        right after the PBX request, with what it changed)."""
        transfer = self.transfer
        if transfer is None or transfer.state is not TransferState.ANNOUNCING:
            return
        pending = list(pending or [])
        pbx = self.service.pbx
        if transfer.mode == "blind":
            try:
                await pbx.blind_transfer(
                    self.call.channel_id, transfer.target, transfer.ring_timeout
                )
            except ChannelGone:
                await self._persist_pending(pending)
                await self._end("caller hung up")
                return
            except BridgeError as exc:
                await self._persist_pending(pending)
                await self._transfer_failed(
                    TransferEvent.ERROR, LegOutcome.FAILED, reason=local_reason(str(exc))
                )
                return
            settled = self._settle(TransferEvent.HANDED_OFF, None)
            await self._persist_pending([*pending, *([settled] if settled else [])])
            self._close_media()
            await self._end("handed off to the PBX (blind transfer)")
            return
        transfer.apply(TransferEvent.MESSAGE_DONE)
        transfer.leg_id = leg_for(transfer)
        self.service.track_leg(transfer.leg_id, cast("CallSession", self))
        dialing = CallEvent(
            "transfer.dialing", utcnow(), {"transfer_id": transfer.id, "leg": transfer.leg_id}
        )
        self._dial_deadline = asyncio.get_running_loop().time() + transfer.ring_timeout
        await self._dial(pending=[*pending, dialing])

    async def _persist_pending(self, events: list[CallEvent]) -> None:
        """The call, its transfer and the events not recorded yet, in one commit."""
        await self.service.store.save_state(self.call, self.transfer, events, call_id=self.call.id)

    async def _dial(self, *, retry: bool = False, pending: list[CallEvent] | None = None) -> None:
        """Place the leg, then record it (`pending`, one commit), then start the ringback:
        nothing that can follow the originate sits before it (issue 8 section 4). A daemon
        that dies in between leaves a leg the next one recognises (`leg_for`, its
        CALLBRIDGE_* variables: see `Reconciler`). A PBX that cannot be reached is our fault,
        not the destination's: wait for the connection (a `Resume` comes) and retry while
        the ring timeout lasts."""
        transfer = self.transfer
        assert transfer is not None and transfer.leg_id is not None
        pbx = self.service.pbx
        loop = asyncio.get_running_loop()
        if self._dial_deadline is None:
            self._dial_deadline = loop.time() + transfer.ring_timeout
        remaining = self._dial_deadline - loop.time()
        self._redial = False
        if retry:
            await self.record("transfer.redialing", transfer_id=transfer.id)
        policy = getattr(self.service, "policy", None)
        try:
            if policy is not None:
                policy.claim_leg(transfer.target)
                self._claimed = transfer.target
            await faults.point("before_originate")
            await pbx.originate(
                transfer.leg_id,
                transfer.target,
                caller_number=self.service.caller_id_for(self.call),
                ring_timeout=max(1.0, remaining) if retry else transfer.ring_timeout,
                variables={
                    "CALLBRIDGE_CALL_ID": self.call.id,
                    "CALLBRIDGE_TRANSFER_ID": transfer.id,
                },
            )
            await faults.point("after_originate")
        except (BridgeError, ChannelGone, ValueError) as exc:
            if pending:
                await self._persist_pending(pending)
            await self._dial_failed(exc, remaining)
            return
        if pending:
            await self._persist_pending(pending)
        try:
            await pbx.play_tone(self.call.channel_id, "ring", transfer.ringback_id)
            self._ringback = transfer.ringback_id
        except ChannelGone:
            await self._end("caller hung up")
            return
        except BridgeError as exc:
            self.log.warning("transfer.ringback_failed", error=str(exc))
        # The PBX enforces the ring timeout; this guard covers a PBX that never reports.
        self._set_timer("ring_guard", max(1.0, remaining) + RING_GUARD_MARGIN_S, transfer.id)

    async def _dial_failed(self, exc: BaseException, remaining: float) -> None:
        transfer = self.transfer
        assert transfer is not None
        if isinstance(exc, PbxUnavailable):
            self._release_claim()
            if remaining > 1.0:
                self._redial = True
                self.log.warning("transfer.pbx_unavailable", transfer_id=transfer.id)
                await self.record(
                    "transfer.pbx_unavailable", transfer_id=transfer.id, error=str(exc)
                )
                self._set_timer("ring_guard", remaining, transfer.id)
                return
            await self._transfer_failed(
                TransferEvent.ERROR,
                LegOutcome.FAILED,
                reason=local_reason(f"the PBX is unreachable: {exc}"),
            )
            return
        self._release_claim()
        await self._transfer_failed(
            TransferEvent.ERROR, LegOutcome.FAILED, reason=local_reason(str(exc))
        )

    def _release_claim(self) -> None:
        target, self._claimed = self._claimed, None
        policy = getattr(self.service, "policy", None)
        if target is not None and policy is not None:
            try:
                policy.release_leg(target)
            except Exception:
                self.log.exception("transfer.release_leg_failed")

    async def _on_leg_event(
        self, event: LegRinging | LegProgress | LegAnswered | LegFailed
    ) -> None:
        transfer = self.transfer
        if transfer is None or event.channel_id != transfer.leg_id or transfer.final:
            if isinstance(event, LegAnswered):  # a leg nobody waits for: do not leave it up
                await self._quietly("hangup_leg", self.service.pbx.hangup(event.channel_id))
            return
        if transfer.state is TransferState.ANNOUNCING:
            return  # not placed yet: cannot be ours
        if isinstance(event, LegRinging | LegProgress):
            await self._on_leg_alive(transfer, early_media=isinstance(event, LegProgress))
            return
        if isinstance(event, LegFailed):
            outcome, reason = classify_leg_failure(
                event, rang=transfer.rang, progressed=transfer.progressed
            )
            await self._transfer_failed(
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
        await self.record("transfer.answered", transfer_id=transfer.id)
        await self._connect_leg()

    async def _on_leg_alive(self, transfer: Transfer, *, early_media: bool) -> None:
        """180 Ringing, or 183 / early media: the destination is alive and working on it."""
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
        await self._persist(
            transfer=True, event=CallEvent(kind, utcnow(), {"transfer_id": transfer.id})
        )

    async def _connect_leg(self) -> None:
        transfer = self.transfer
        assert transfer is not None and transfer.leg_id is not None
        self._cancel_timer("ring_guard")
        self._cancel_timer("leg_lost")
        # Before connecting: Asterisk stalls channel operations while a playback runs.
        await self._stop_ringback()
        try:
            await self.service.pbx.connect(self.call.channel_id, transfer.leg_id)
        except ChannelGone:
            # The caller left (or the leg did): `_end` cancels the transfer, hangs up the leg.
            await self._end("caller hung up while the destination answered")
            return
        except BridgeError as exc:
            await self._transfer_failed(
                TransferEvent.ERROR,
                LegOutcome.FAILED,
                reason=local_reason(f"could not bridge: {exc}"),
                hangup_leg=True,
            )
            return
        self._close_media()
        settled = self._settle(TransferEvent.CONNECTED, LegOutcome.ANSWERED)
        self.call.status = CallStatus.TRANSFERRED
        await self._persist(call=True, transfer=True, event=settled)  # together: one commit
        self.log.info("transfer.bridged", transfer_id=transfer.id, leg=transfer.leg_id)
        if self.conversation is not None:
            self.conversation.on_transfer_result(transfer)

    async def _on_timer(self, timer: TimerFired) -> None:
        transfer = self.transfer
        if transfer is None or transfer.id != timer.ref or transfer.final:
            return
        if timer.name == "ring_guard" and transfer.state in (
            TransferState.DIALING,
            TransferState.RINGING,
        ):
            if self._redial:
                self._redial = False
                await self._transfer_failed(
                    TransferEvent.ERROR,
                    LegOutcome.FAILED,
                    reason=local_reason("the PBX stayed unreachable for the whole ring timeout"),
                )
                return
            outcome, reason = timeout_outcome(rang=transfer.rang, progressed=transfer.progressed)
            await self._transfer_failed(
                TransferEvent.LEG_FAILED, outcome, reason=reason, hangup_leg=True
            )
        elif timer.name == "leg_lost" and transfer.state is not TransferState.ANNOUNCING:
            await self._transfer_failed(
                TransferEvent.ERROR,
                LegOutcome.FAILED,
                reason=local_reason("the new leg was lost while callbridge was disconnected"),
                hangup_leg=True,
            )

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
        transfer = self.transfer
        if transfer is None or transfer.final:
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
        self._cancel_timer("ring_guard")
        self._cancel_timer("leg_lost")
        bridged = transfer.state is TransferState.BRIDGED
        if transfer.leg_id:
            self.service.untrack_leg(transfer.leg_id, keep=bridged)
        if not bridged:
            self._release_claim()
        self.log.info(
            "transfer.settled",
            transfer_id=transfer.id,
            state=transfer.state.value,
            outcome=transfer.outcome.value if transfer.outcome else None,
            sip_code=sip_code,
            cause=cause,
            reason=transfer.reason,
        )
        return self._settled_event(transfer)

    def _settled_event(self, transfer: Transfer) -> CallEvent:
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

    async def _transfer_failed(
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
        """The caller stays with us: stop ringback, back to ACTIVE with media attached and the
        conversation listening, say why, and only then hand the result to the conversation."""
        transfer = self.transfer
        if transfer is None or transfer.final:
            return
        leg = transfer.leg_id
        settled = self._settle(
            event, outcome, cause=cause, cause_text=cause_text, sip_code=sip_code, reason=reason
        )
        self.call.status = CallStatus.ACTIVE
        await self._persist(call=True, transfer=True, event=settled)
        if hangup_leg and leg:
            await self._quietly("hangup_leg", self.service.pbx.hangup(leg))
        await self._stop_ringback()
        if self.media is None:  # e.g. after a daemon restart during the transfer
            if not await self._attach_media():
                # Sent to the fallback, or the caller left, or the media waits for the PBX:
                # then the result is told once it is attached (on the `Resume`).
                self._untold = transfer
                return
            if self.conversation is None:
                await self._start_conversation(resumed=True)
        self._tell_result(transfer)

    def _tell_result(self, transfer: Transfer) -> None:
        """The caller is ACTIVE with media: say why, then hand the typed result to the
        conversation, which listens again from now on."""
        self._untold = None
        assert transfer.outcome is not None
        self.say(self.service.failure_message(transfer.outcome), token="transfer_failed")
        if self.conversation is not None:
            self.conversation.on_transfer_result(transfer)

    async def _stop_ringback(self) -> None:
        if self._ringback is not None:
            playback, self._ringback = self._ringback, None
            try:
                await self.service.pbx.stop_playback(playback)
            except (BridgeError, ChannelGone) as exc:
                self.log.warning("transfer.ringback_stop_failed", error=str(exc))
