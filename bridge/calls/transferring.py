"""The transfer steps of a call session: speak the message, dial, ring, bridge, or fail back
to the assistant. The one place where transfer outcomes and fallbacks are decided; the state
machine itself (which step may follow which) is `bridge.calls.transfer`.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from bridge.calls.items import SpeechDone, TimerFired
from bridge.calls.model import CallStatus, TransferCommand
from bridge.calls.transfer import Transfer, TransferEvent, TransferState
from bridge.errors import BridgeError, Conflict
from bridge.pbx.asterisk.causes import leg_outcome  # interim: bridge.calls.outcomes (core)
from bridge.pbx.ports import (
    ChannelGone,
    LegAnswered,
    LegFailed,
    LegOutcome,
    LegProgress,
    LegRinging,
)

if TYPE_CHECKING:
    from bridge.calls.session import CallSession

    _Base = CallSession
else:
    _Base = object


class TransferSteps(_Base):
    """Mixed into `CallSession`: runs in the call's task like every other handler."""

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
        target = await self.service.resolve_destination(self.call.number_id, command.destination)
        transfer = Transfer(
            id=str(uuid.uuid4()),
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
        self.call.status = CallStatus.TRANSFERRING
        await self._save()
        await self._save_transfer()
        await self.record(
            "transfer.requested",
            transfer_id=transfer.id,
            source=source,
            destination=transfer.destination,
            route=target.describe(),
            mode=transfer.mode,
        )
        self.log.info("transfer.requested", transfer_id=transfer.id, route=target.describe())
        if self.media is not None:
            self.media.flush()  # the assistant stops talking; the message is not interruptible
        if command.message and self.media is not None:
            self.say(command.message, token=f"transfer:{transfer.id}", interruptible=False)
        else:
            self.post(SpeechDone(f"transfer:{transfer.id}", True))
        return {"id": self.call.id, "accepted": "transfer", "transfer_id": transfer.id}

    async def _after_announcement(self) -> None:
        transfer = self.transfer
        if transfer is None or transfer.state is not TransferState.ANNOUNCING:
            return
        pbx = self.service.pbx
        if transfer.mode == "blind":
            try:
                await pbx.blind_transfer(
                    self.call.channel_id, transfer.target, transfer.ring_timeout
                )
            except ChannelGone:
                await self._settle(TransferEvent.CALLER_GONE, LegOutcome.CANCELLED)
                await self._end("caller hung up")
                return
            except BridgeError as exc:
                await self._transfer_failed(
                    TransferEvent.ERROR, LegOutcome.FAILED, cause_text=str(exc)
                )
                return
            await self._settle(TransferEvent.HANDED_OFF, None)
            self._close_media()
            await self._end("handed off to the PBX (blind transfer)")
            return
        transfer.apply(TransferEvent.MESSAGE_DONE)
        transfer.leg_id = f"cbleg-{uuid.uuid4()}"
        self.service.track_leg(transfer.leg_id, self)
        await self._save_transfer()
        await self.record("transfer.dialing", transfer_id=transfer.id, leg=transfer.leg_id)
        try:
            playback = f"cbring-{transfer.id}"  # derivable again after a daemon restart
            await pbx.play_tone(self.call.channel_id, "ring", playback)
            self._ringback = playback
        except ChannelGone:
            await self._settle(TransferEvent.CALLER_GONE, LegOutcome.CANCELLED)
            await self._end("caller hung up")
            return
        except BridgeError as exc:
            self.log.warning("transfer.ringback_failed", error=str(exc))
        try:
            await pbx.originate(
                transfer.leg_id,
                transfer.target,
                caller_number=self.service.caller_id_for(self.call),
                ring_timeout=transfer.ring_timeout,
                variables={
                    "CALLBRIDGE_CALL_ID": self.call.id,
                    "CALLBRIDGE_TRANSFER_ID": transfer.id,
                },
            )
        except (BridgeError, ChannelGone, ValueError) as exc:
            await self._transfer_failed(
                TransferEvent.ERROR, LegOutcome.UNREACHABLE, cause_text=str(exc)
            )
            return
        # The PBX enforces the ring timeout; this guard covers a PBX that never reports.
        self._set_timer("ring_guard", transfer.ring_timeout + 10, transfer.id)

    async def _on_leg_event(
        self, event: LegRinging | LegProgress | LegAnswered | LegFailed
    ) -> None:
        transfer = self.transfer
        if transfer is None or event.channel_id != transfer.leg_id or transfer.final:
            if isinstance(event, LegAnswered):  # a leg nobody waits for: do not leave it up
                await self.service.pbx.hangup(event.channel_id)
            return
        if isinstance(event, LegRinging | LegProgress):
            if transfer.state is not TransferState.RINGING:
                transfer.apply(TransferEvent.LEG_RINGING)
                await self._save_transfer()
                await self.record("transfer.ringing", transfer_id=transfer.id)
            return
        if isinstance(event, LegFailed):
            rang = transfer.state is not TransferState.DIALING
            outcome, cause_text = leg_outcome(event, rang=rang), event.cause_text
            if outcome is LegOutcome.UNREACHABLE and event.cause in (18, 19) and not rang:
                cause_text = "no response (it never rang)"
            await self._transfer_failed(
                TransferEvent.LEG_FAILED,
                outcome,
                cause=event.cause,
                cause_text=cause_text,
                sip_code=event.sip_code,
            )
            return
        transfer.apply(TransferEvent.LEG_ANSWERED)
        await self.record("transfer.answered", transfer_id=transfer.id)
        await self._connect_leg()

    async def _connect_leg(self) -> None:
        transfer = self.transfer
        assert transfer is not None and transfer.leg_id is not None
        self._cancel_timer("ring_guard")
        await self._stop_ringback()
        try:
            await self.service.pbx.connect(self.call.channel_id, transfer.leg_id)
        except ChannelGone:
            await self.service.pbx.hangup(transfer.leg_id)
            await self._settle(TransferEvent.CALLER_GONE, LegOutcome.CANCELLED)
            await self._end("caller hung up while the destination answered")
            return
        except BridgeError as exc:
            await self.service.pbx.hangup(transfer.leg_id)
            await self._transfer_failed(TransferEvent.ERROR, LegOutcome.FAILED, cause_text=str(exc))
            return
        self._close_media()
        await self._settle(TransferEvent.CONNECTED, LegOutcome.ANSWERED)
        self.call.status = CallStatus.TRANSFERRED
        await self._save()
        self.log.info("transfer.bridged", transfer_id=transfer.id, leg=transfer.leg_id)

    async def _on_timer(self, timer: TimerFired) -> None:
        transfer = self.transfer
        if timer.name != "ring_guard" or transfer is None or transfer.id != timer.ref:
            return
        if transfer.state in (TransferState.DIALING, TransferState.RINGING):
            leg = transfer.leg_id
            await self._transfer_failed(
                TransferEvent.LEG_FAILED, LegOutcome.NO_ANSWER, cause_text="ring timeout"
            )
            if leg:
                await self.service.pbx.hangup(leg)

    async def _settle(
        self,
        event: TransferEvent,
        outcome: LegOutcome | None,
        *,
        cause: int | None = None,
        cause_text: str | None = None,
        sip_code: int | None = None,
    ) -> None:
        transfer = self.transfer
        if transfer is None or transfer.final:
            return
        if outcome is None:
            transfer.apply(event)
        else:
            transfer.settle(event, outcome, cause=cause, cause_text=cause_text, sip_code=sip_code)
        self._cancel_timer("ring_guard")
        if transfer.leg_id:
            self.service.untrack_leg(transfer.leg_id, keep=transfer.state is TransferState.BRIDGED)
        await self._save_transfer()
        await self.record(
            "transfer.completed"
            if transfer.state is TransferState.BRIDGED
            else f"transfer.{transfer.state.value}",
            transfer_id=transfer.id,
            outcome=transfer.outcome.value if transfer.outcome else None,
            sip_code=sip_code,
            cause=cause,
            cause_text=cause_text,
        )
        self.log.info(
            "transfer.settled",
            transfer_id=transfer.id,
            state=transfer.state.value,
            outcome=transfer.outcome.value if transfer.outcome else None,
            sip_code=sip_code,
            cause=cause,
        )
        if self.conversation is not None:
            self.conversation.on_transfer_result(transfer)

    async def _transfer_failed(
        self,
        event: TransferEvent,
        outcome: LegOutcome,
        *,
        cause: int | None = None,
        cause_text: str | None = None,
        sip_code: int | None = None,
    ) -> None:
        """The caller stays with us: stop ringback, say why, and go back to the assistant."""
        await self._settle(event, outcome, cause=cause, cause_text=cause_text, sip_code=sip_code)
        await self._stop_ringback()
        self.call.status = CallStatus.ACTIVE
        await self._save()
        if self.media is None and not await self._attach_media():
            return
        self.say(self.service.failure_message(outcome), token="transfer_failed")

    async def _stop_ringback(self) -> None:
        if self._ringback is not None:
            playback, self._ringback = self._ringback, None
            try:
                await self.service.pbx.stop_playback(playback)
            except BridgeError as exc:
                self.log.warning("transfer.ringback_stop_failed", error=str(exc))
