"""The call service: routes PBX events to call sessions, executes control commands, and
reconciles calls with the PBX after a reconnect or a daemon restart.

The control API and the assistant's transfer tool both arrive here; this is the only caller
of the adapter's transfer verbs.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any

from bridge.calls.conversation import ConversationFactory
from bridge.calls.model import Call, CallStatus, utcnow
from bridge.calls.session import CallSession, Resume
from bridge.calls.store import CallStore
from bridge.calls.transfer import TransferState
from bridge.config import Settings
from bridge.errors import (
    Conflict,
    DestinationNotAllowed,
    InvalidInput,
    NotFound,
    PbxCommandFailed,
)
from bridge.log import get_logger
from bridge.media.rtp import MediaClock
from bridge.pbx.asterisk.causes import leg_outcome  # interim: bridge.calls.outcomes (core)
from bridge.pbx.ports import (
    CallArrived,
    ChannelGone,
    ChannelHungUp,
    ConnectionLost,
    ConnectionRestored,
    DialTarget,
    LegAnswered,
    LegFailed,
    LegOutcome,
    LegProgress,
    LegRinging,
    PbxAdapter,
    PbxEvent,
    TrunkSpec,
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
        self._by_id: dict[str, CallSession] = {}
        self._by_channel: dict[str, CallSession] = {}
        # Builds each call's conversation (the assistant's voice pipeline); None: greet only.
        self.conversation_factory: ConversationFactory | None = None
        self.connected = False
        self._probes: dict[str, asyncio.Queue[PbxEvent]] = {}

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.pbx.start(self.on_pbx_event)

    async def stop(self) -> None:
        for session in list(self._by_id.values()):
            await session.detach()
        await self.pbx.stop()
        await self.clock.close()

    async def trunk_specs(self) -> list[TrunkSpec]:
        """Every trunk as the PBX needs it; the adapter provisions them on each connect."""
        return [trunk_spec(t) for t in await self.directory.list_trunks()]

    # --- routing ----------------------------------------------------------------------------

    async def on_pbx_event(self, event: PbxEvent) -> None:
        if isinstance(event, CallArrived):
            if event.channel_id not in self._by_channel:
                await self._new_call(event)
            return
        if isinstance(event, ConnectionRestored):
            self.connected = True
            await self._reconcile(event)
            return
        if isinstance(event, ConnectionLost):
            self.connected = False
            return
        session = self._by_channel.get(event.channel_id)
        probe = self._probes.get(event.channel_id)
        if session is not None:
            session.post(event)
        elif probe is not None:
            probe.put_nowait(event)
        elif isinstance(event, LegAnswered):
            log.warning("call.orphan_leg_answered", leg=event.channel_id)
            await self._safe_hangup(event.channel_id)

    def track_leg(self, leg_id: str, session: CallSession) -> None:
        self._by_channel[leg_id] = session

    def untrack_leg(self, leg_id: str, *, keep: bool) -> None:
        """Stop routing a leg's events, unless it stays bridged (its hangup still matters)."""
        if not keep:
            self._by_channel.pop(leg_id, None)

    def forget(self, session: CallSession) -> None:
        self._by_id.pop(session.call.id, None)
        for key in [k for k, v in self._by_channel.items() if v is session]:
            del self._by_channel[key]

    def _register(self, session: CallSession) -> None:
        self._by_id[session.call.id] = session
        self._by_channel[session.call.channel_id] = session
        transfer = session.transfer
        if transfer is not None and transfer.leg_id and transfer.state is not TransferState.FAILED:
            self._by_channel[transfer.leg_id] = session

    async def _new_call(self, event: CallArrived) -> None:
        number = await self.directory.find_number(event.called_number)
        assistant = None
        if number is not None and number.assistant_id:
            try:
                assistant = await self.directory.get_assistant(number.assistant_id)
            except NotFound:
                assistant = None
        call = Call(
            id=str(uuid.uuid4()),
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
        log.info(
            "call.started",
            call_id=call.id,
            channel=event.channel_id,
            called_number=event.called_number,
            caller=event.caller_number,
            assistant_id=assistant.id,
        )
        self._register(session)
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

    async def _reconcile(self, restored: ConnectionRestored) -> None:
        """After a (re)connect: end calls whose channel is gone, resume the others, adopt
        callers we have no record of, hang up legs nobody owns."""
        live_callers = {c.channel_id: c for c in restored.callers}
        live_legs = frozenset(leg for leg, _ in restored.legs)
        answered = frozenset(leg for leg, up in restored.legs if up)
        resume = Resume(live_legs, answered)
        known: set[str] = set()
        for call in await self.store.unfinished(self.pbx_name):
            known.add(call.channel_id)
            session = self._by_id.get(call.id)
            if call.channel_id not in live_callers:
                if session is not None:
                    session.post(_gone(call.channel_id))
                else:
                    await self._mark_lost(call)
                continue
            if session is None:
                session = await self._rebuild(call)
                self._register(session)
                session.start(resume)
            else:
                session.post(resume)
        for channel_id, arrival in live_callers.items():
            if channel_id not in known and channel_id not in self._by_channel:
                log.info("call.adopted", channel=channel_id)
                await self._new_call(arrival)
        owned = {s.transfer.leg_id for s in self._by_id.values() if s.transfer}
        for leg in live_legs - owned:
            log.warning("call.orphan_leg", leg=leg)
            await self._safe_hangup(leg)

    async def _rebuild(self, call: Call) -> CallSession:
        assistant = None
        if call.assistant_id:
            try:
                assistant = await self.directory.get_assistant(call.assistant_id)
            except NotFound:
                pass
        session = CallSession(self, call, assistant)
        transfers = await self.store.transfers(call.id)
        session.transfer = transfers[-1] if transfers else None
        return session

    async def _mark_lost(self, call: Call) -> None:
        call.status = CallStatus.ENDED
        call.ended_at = utcnow()
        call.end_reason = "channel gone while callbridge was disconnected"
        await self.store.save(call)
        log.warning("call.lost", call_id=call.id, channel=call.channel_id)

    async def _safe_hangup(self, channel_id: str) -> None:
        try:
            await self.pbx.hangup(channel_id)
        except Exception as exc:
            log.warning("call.hangup_failed", channel=channel_id, error=str(exc))

    # --- policies used by sessions ----------------------------------------------------------

    async def resolve_destination(self, number_id: str | None, destination: str) -> DialTarget:
        """E.164 goes through the number's transfer trunk (looked up now: a PATCH during the
        call counts), else the default route; a SIP URI is dialled directly."""
        self._check_policy(destination)
        if destination.startswith(("sip:", "sips:")):
            return DialTarget(sip_uri=destination)
        trunk_id = None
        if number_id:
            try:
                trunk_id = (await self.directory.get_number(number_id)).transfer_trunk_id
            except NotFound:
                trunk_id = None
        if trunk_id:
            return DialTarget(number=destination, trunk_id=trunk_id)
        route = self.settings.transfer.default_route
        if route:
            return DialTarget(number=destination, route=route)
        raise InvalidInput(
            "no route for this number: give the call's number a transfer_trunk_id, "
            "set transfer.default_route, or transfer to a SIP URI",
            field="destination",
        )

    def _check_policy(self, destination: str) -> None:
        """The toll-fraud guard: only configured prefixes and SIP domains, when configured."""
        policy = self.settings.transfer
        if destination.startswith(("sip:", "sips:")):
            host = destination.split(":", 1)[1].rsplit("@", 1)[-1].split(";")[0]
            host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
            allowed = policy.allowed_sip_domains
            if allowed and host.lower() not in {d.lower() for d in allowed}:
                raise DestinationNotAllowed(
                    f"SIP domain {host} is not in transfer.allowed_sip_domains",
                    field="destination",
                )
        elif policy.allowed_prefixes and not destination.startswith(tuple(policy.allowed_prefixes)):
            raise DestinationNotAllowed(
                "number is not in transfer.allowed_prefixes", field="destination"
            )

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
        session = self._by_id.get(call_id)
        call = session.call if session else await self.store.get(call_id)
        if call is None:
            raise NotFound(f"no call {call_id}", field="id")
        data = call.public_dict()
        data["events"] = [e.public_dict() for e in await self.store.events(call_id)]
        data["transfers"] = [t.public_dict() for t in await self.store.transfers(call_id)]
        return data

    async def test_destination(
        self, destination: str, number_id: str | None, ring_timeout: float
    ) -> dict[str, Any]:
        """Place a short test call to a destination by the route a transfer would take; hang
        up as soon as it answers. Returns the typed outcome (the seed's "test destinations")."""
        if number_id is not None:
            await self.directory.get_number(number_id)  # NotFound names the field
        target = await self.resolve_destination(number_id, destination)
        leg = f"cbleg-probe-{uuid.uuid4()}"
        events: asyncio.Queue[PbxEvent] = asyncio.Queue()
        self._probes[leg] = events
        loop = asyncio.get_running_loop()
        started = loop.time()
        rang_at: float | None = None
        result: dict[str, Any] = {"destination": destination, "route": target.describe()}
        try:
            await self.pbx.originate(
                leg,
                target,
                caller_number=None,
                ring_timeout=ring_timeout,
                variables={"CALLBRIDGE_PROBE": "1"},
            )
            async with asyncio.timeout(ring_timeout + 10):
                while True:
                    event = await events.get()
                    if isinstance(event, LegRinging | LegProgress) and rang_at is None:
                        rang_at = loop.time()
                    elif isinstance(event, LegAnswered):
                        await self._safe_hangup(leg)
                        result.update(outcome=LegOutcome.ANSWERED.value, sip_code=200)
                        break
                    elif isinstance(event, LegFailed):
                        outcome = leg_outcome(event, rang=rang_at is not None)
                        result.update(
                            outcome=outcome.value,
                            sip_code=event.sip_code,
                            cause=event.cause,
                            cause_text=event.cause_text,
                        )
                        break
        except TimeoutError:
            await self._safe_hangup(leg)
            result.update(outcome=LegOutcome.NO_ANSWER.value, cause_text="no final answer")
        except (ChannelGone, PbxCommandFailed) as exc:
            result.update(outcome=LegOutcome.UNREACHABLE.value, cause_text=str(exc))
        finally:
            self._probes.pop(leg, None)
        result["ring_ms"] = round((rang_at - started) * 1000) if rang_at else None
        result["duration_ms"] = round((loop.time() - started) * 1000)
        log.info("destination.tested", **result)
        return result

    async def transfer_stats(self, since: datetime | None) -> dict[str, Any]:
        return await self.store.transfer_stats(since)

    async def control(self, call_id: str, command: Any) -> dict[str, Any]:
        session = self._by_id.get(call_id)
        if session is None:
            if await self.store.get(call_id) is None:
                raise NotFound(f"no call {call_id}", field="id")
            raise Conflict("the call has ended", field="id")
        return await session.command(command)


def trunk_spec(trunk: Any) -> TrunkSpec:
    return TrunkSpec(
        id=trunk.id,
        host=trunk.host,
        port=trunk.port,
        transport=trunk.transport,
        username=trunk.username,
        password=trunk.password.get_secret_value() if trunk.password else None,
        register=trunk.registration,
    )


def _gone(channel_id: str) -> ChannelHungUp:
    return ChannelHungUp(channel_id, None, "gone while callbridge was disconnected")
