"""The call service: the one facade the API and the daemon talk to. It takes new callers,
hands PBX events to the call sessions (which session owns which channel: `CallRouter`),
executes control commands, and holds the policies sessions use. Its other roles have their
own rooms: the reconcile after a reconnect or restart (`Reconciler`), destination tests
(`DestinationProbe`), the toll-fraud policy (`TransferPolicy`).

The control API and the assistant's transfer tool both arrive here; this is the only caller
of the adapter's transfer verbs.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any

from bridge.calls.admission import Admission, turn_away
from bridge.calls.conversation import ConversationFactory
from bridge.calls.model import Call, CallEvent, CallStatus, utcnow
from bridge.calls.policy import TransferPolicy
from bridge.calls.probe import DestinationProbe
from bridge.calls.reconcile import Reconciler
from bridge.calls.router import CallRouter
from bridge.calls.session import CallSession
from bridge.calls.store import CallStore
from bridge.config import Settings
from bridge.errors import (
    Conflict,
    NotFound,
)
from bridge.log import get_logger
from bridge.media.rtp import MediaClock
from bridge.pbx.ports import (
    CallArrived,
    CallMissed,
    ChannelGone,
    ConnectionLost,
    ConnectionRestored,
    LegAnswered,
    LegOutcome,
    PbxAdapter,
    PbxEvent,
)
from bridge.speech.tts import TtsProvider

log = get_logger(__name__)


class CallService:
    def __init__(
        self,
        *,
        settings: Settings,
        pbx: PbxAdapter,
        pbx_name: str,
        store: CallStore,
        directory: Any,
        tts: TtsProvider,
        clock: MediaClock | None = None,
    ) -> None:
        self.settings = settings
        self.pbx = pbx
        self.pbx_name = pbx_name
        self.store = store
        self.directory = directory
        self.tts = tts
        self.clock = clock or MediaClock()
        self.router = CallRouter()
        # Calls saved (visible to the API) whose session is still being set up.
        self._arriving: dict[str, asyncio.Future[None]] = {}
        # The router's maps, under the names the unit tests read.
        self._by_id = self.router.by_id
        self._by_channel = self.router.by_channel
        # Builds each call's conversation (the assistant's voice pipeline); None: greet only.
        self.conversation_factory: ConversationFactory | None = None
        self.connected = False
        # Where a transfer may go (fail-closed); every transfer and destination test asks it.
        self.policy = TransferPolicy(settings.transfer, directory)
        self.probe = DestinationProbe(pbx=pbx, policy=self.policy, directory=directory)
        self.reconciler = Reconciler(self)
        # Admission control for arriving calls (set by the composition root); None: no limit.
        self.admission: Admission | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.pbx.start(self.on_pbx_event)

    async def stop(self) -> None:
        for session in self.router.sessions():
            await session.detach()
        await self.pbx.stop()
        await self.clock.close()

    # --- routing ----------------------------------------------------------------------------

    async def on_pbx_event(self, event: PbxEvent) -> None:
        if isinstance(event, CallMissed):
            await self._record_missed(event)
            return
        if isinstance(event, CallArrived):
            if event.channel_id not in self.router.by_channel:
                await self.arrive(event)
            return
        if isinstance(event, ConnectionRestored):
            self.connected = True
            await self.reconciler.run(event)
            return
        if isinstance(event, ConnectionLost):
            self.connected = False
            return
        session = self.router.for_channel(event.channel_id)
        if session is not None:
            session.post(event)
        elif self.probe.deliver(event):
            pass
        elif isinstance(event, LegAnswered):
            log.warning("call.orphan_leg_answered", leg=event.channel_id)
            await self.safe_hangup(event.channel_id)

    # Routing lives in `CallRouter`; these delegate (sessions and the reconciler use them).

    def session(self, call_id: str) -> CallSession | None:
        return self.router.session(call_id)

    def sessions(self) -> list[CallSession]:
        return self.router.sessions()

    @property
    def routes(self) -> dict[str, CallSession]:
        """Channel id (caller or leg) -> the session its events go to (read only)."""
        return self.router.by_channel

    def track_leg(self, leg_id: str, session: CallSession) -> None:
        self.router.track_leg(leg_id, session)

    def untrack_leg(self, leg_id: str, *, keep: bool) -> None:
        self.router.untrack_leg(leg_id, keep=keep)

    @property
    def active_calls(self) -> int:
        """Calls this daemon serves now (admission control counts them)."""
        return len(self.router)

    def forget(self, session: CallSession) -> None:
        self.router.forget(session)

    def register(self, session: CallSession) -> None:
        self.router.register(session)

    async def arrive(self, event: CallArrived) -> None:
        """A new caller. Whatever fails while taking it (a locked database, the directory),
        the caller goes to the dialplan fallback: never left in Stasis/park with no session."""
        try:
            await self._new_call(event)
        except Exception as exc:
            log.exception("call.arrival_failed", channel=event.channel_id, error=str(exc))
            session = self.router.for_channel(event.channel_id)
            if session is not None and not session.started:
                self.forget(session)  # registered but never started
            elif session is not None:
                return  # its task owns the caller now
            await self.send_to_fallback(event.channel_id, event.called_number)

    async def _record_missed(self, event: CallMissed) -> None:
        """A caller the PBX's take guard sent to the fallback before we took it: nothing to
        do for it, but it is recorded (an ended call with the reason), never unseen."""
        reason = "not taken within the PBX's take guard: sent to the dialplan fallback"
        log.warning("call.missed", channel=event.channel_id, called_number=event.called_number)
        now = utcnow()
        call = Call(
            id=str(uuid.uuid4()),
            pbx=self.pbx_name,
            channel_id=event.channel_id,
            status=CallStatus.ENDED,
            started_at=now,
            number=event.called_number,
            caller_number=event.caller_number,
            caller_name=event.caller_name,
            ended_at=now,
            end_reason=reason,
        )
        try:
            await self.store.save_state(
                call, events=[CallEvent("call.ended", now, {"reason": reason})]
            )
        except Exception as exc:
            log.error("call.missed_not_recorded", channel=event.channel_id, error=str(exc))

    async def send_to_fallback(self, channel_id: str, number: str | None) -> None:
        try:
            await self.pbx.continue_in_dialplan(
                channel_id, self.settings.calls.fallback_context, number or "s"
            )
            log.warning("call.sent_to_fallback", channel=channel_id)
        except ChannelGone:
            pass
        except Exception as exc:
            log.error("call.fallback_failed", channel=channel_id, error=str(exc))
            await self.safe_hangup(channel_id)

    async def _new_call(self, event: CallArrived) -> None:
        """The call is saved before its session is registered: a command that comes in
        between waits for the set-up (`control`) instead of finding no session."""
        call_id = str(uuid.uuid4())
        arriving: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._arriving[call_id] = arriving
        try:
            await self._set_up_call(event, call_id)
        finally:
            del self._arriving[call_id]
            arriving.set_result(None)

    async def _set_up_call(self, event: CallArrived, call_id: str) -> None:
        number = await self.directory.find_number(event.called_number)
        assistant = None
        if number is not None and number.assistant_id:
            try:
                assistant = await self.directory.get_assistant(number.assistant_id)
            except NotFound:
                assistant = None
        call = Call(
            id=call_id,
            pbx=self.pbx_name,
            channel_id=event.channel_id,
            status=CallStatus.ACTIVE,
            started_at=utcnow(),
            number_id=number.id if number else None,
            number=event.called_number,
            assistant_id=assistant.id if assistant else None,
            caller_number=event.caller_number,
            caller_name=event.caller_name,
        )
        await self.store.save(call)
        session = CallSession(self, call, assistant)
        await session.record(
            "call.started",
            called_number=event.called_number,
            caller_number=event.caller_number,
            assistant_id=call.assistant_id,
        )
        if assistant is None:
            why = "unknown number" if number is None else "number has no assistant"
            log.warning(
                "call.unknown_number",
                called_number=event.called_number,
                channel=event.channel_id,
                reason=why,
                action=self.settings.calls.unknown_number_action,
            )
            await self._refuse(session, why)
            return
        admission = self.admission
        overloaded = admission.refuse_reason() if admission is not None else None
        if overloaded is not None:
            await turn_away(self, session, overloaded)
            return
        log.info(
            "call.started",
            call_id=call.id,
            channel=event.channel_id,
            called_number=event.called_number,
            caller=event.caller_number,
            assistant_id=assistant.id,
        )
        self.register(session)
        session.start("greet")

    async def _refuse(self, session: CallSession, why: str) -> None:
        """A call we cannot serve goes back to the dialplan's fallback (or is hung up)."""
        call = session.call
        try:
            if self.settings.calls.unknown_number_action == "continue":
                await self.pbx.continue_in_dialplan(
                    call.channel_id, self.settings.calls.fallback_context, call.number or "s"
                )
                reason = f"{why}: sent to the dialplan fallback"
            else:
                await self.pbx.hangup(call.channel_id)
                reason = f"{why}: hung up"
        except ChannelGone:
            reason = f"{why}: caller already gone"
        call.status = CallStatus.ENDED
        call.ended_at = utcnow()
        call.end_reason = reason
        await self.store.save(call)
        await session.record("call.ended", reason=reason)

    async def safe_hangup(self, channel_id: str) -> None:
        try:
            await self.pbx.hangup(channel_id)
        except Exception as exc:
            log.warning("call.hangup_failed", channel=channel_id, error=str(exc))

    # --- policies used by sessions ----------------------------------------------------------

    def caller_id_for(self, call: Call) -> str | None:
        choice = self.settings.transfer.caller_id
        if choice == "caller":
            return call.caller_number
        if choice == "number":
            return call.number
        return choice

    def failure_message(self, outcome: LegOutcome) -> str:
        t = self.settings.transfer
        if outcome is LegOutcome.BUSY:
            return t.busy_message
        if outcome is LegOutcome.NO_ANSWER:
            return t.no_answer_message
        return t.failure_message

    # --- the control API (bridge.api.ports.CallControl) -------------------------------------

    async def list_calls(self, status: CallStatus | None, limit: int) -> list[dict[str, Any]]:
        return [c.public_dict() for c in await self.store.list(status, limit)]

    async def get_call(self, call_id: str) -> dict[str, Any]:
        # One consistent read: the call, its events and transfers never disagree.
        found = await self.store.snapshot(call_id)
        if found is None:
            raise NotFound(f"no call {call_id}", field="id")
        call, events, transfers = found
        data = call.public_dict()
        data["events"] = [e.public_dict() for e in events]
        data["transfers"] = [t.public_dict() for t in transfers]
        return data

    async def test_destination(
        self, destination: str, number_id: str | None, ring_timeout: float
    ) -> dict[str, Any]:
        """The API's destination test (`bridge.calls.probe`)."""
        return await self.probe.test(destination, number_id, ring_timeout)

    async def transfer_stats(self, since: datetime | None) -> dict[str, Any]:
        return await self.store.transfer_stats(since)

    async def control(self, call_id: str, command: Any) -> dict[str, Any]:
        session = self.router.session(call_id)
        arriving = self._arriving.get(call_id)
        if session is None and arriving is not None:
            await asyncio.shield(arriving)  # saved, its session being set up: wait for it
            session = self.router.session(call_id)
        if session is None:
            if await self.store.get(call_id) is None:
                raise NotFound(f"no call {call_id}", field="id")
            raise Conflict("the call has ended", field="id")
        return await session.command(command)
