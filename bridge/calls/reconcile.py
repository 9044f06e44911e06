"""The reconciler: after a (re)connect or a daemon restart, bring our calls in line with what
the PBX has now. End calls whose caller left, resume the others (a `Resume` through each
call's queue), adopt callers we have no record of, send stuck channels to the fallback, hang
up legs nobody owns. Each call is reconciled on its own: one failing step is logged and never
stops the others (nor leaves a caller in Stasis with no session).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge.calls.items import LegAbandoned, Resume
from bridge.calls.model import Call, CallEvent, CallStatus, utcnow
from bridge.calls.session import CallSession
from bridge.calls.transfer import TransferEvent
from bridge.calls.transferring import leg_for
from bridge.errors import NotFound
from bridge.log import get_logger
from bridge.pbx.ports import (
    CallArrived,
    ChannelHungUp,
    ConnectionRestored,
    LegFacts,
    LegOutcome,
)

if TYPE_CHECKING:
    from bridge.calls.service import CallService

log = get_logger(__name__)


class Reconciler:
    def __init__(self, service: CallService) -> None:
        self.service = service

    async def run(self, restored: ConnectionRestored) -> None:
        """After a (re)connect: end calls whose channel is gone, resume the others, adopt
        callers we have no record of, hang up legs nobody owns. Each call is reconciled on
        its own: one failing step is logged and never stops the others."""
        live_callers = {c.channel_id: c for c in restored.callers}
        live_legs = frozenset(leg for leg, _ in restored.legs)
        answered = frozenset(leg for leg, up in restored.legs if up)
        facts = {f.leg_id: f for f in restored.leg_facts}
        undialled = frozenset(leg for leg, f in facts.items() if not f.dialled)
        resume = Resume(live_legs, answered, undialled)
        known: set[str] = set()
        try:
            unfinished = await self.service.store.unfinished(self.service.pbx_name)
        except Exception:
            log.exception("call.reconcile_failed", step="unfinished")
            unfinished = []
            known.update(live_callers)  # without our records, adopt nothing blindly
            known.difference_update(self.service.routes)
        for call in unfinished:
            known.add(call.channel_id)
            try:
                await self._reconcile_call(call, live_callers, resume)
            except Exception as exc:
                log.exception("call.reconcile_failed", call_id=call.id, channel=call.channel_id)
                if call.channel_id in live_callers and self.service.session(call.id) is None:
                    await self._abandon(call, f"could not resume the call: {exc}")
        for channel_id, arrival in live_callers.items():
            if channel_id in known or channel_id in self.service.routes:
                continue
            try:
                await self._adopt(arrival)
            except Exception:
                log.exception("call.reconcile_failed", channel=channel_id)
        # A transfer not placed yet on our record may own a leg our predecessor placed just
        # before it stopped: its id is derived from the transfer (`leg_for`).
        owned = {
            leg_for(s.transfer)
            for s in self.service.sessions()
            if s.transfer and (s.transfer.leg_id or not s.transfer.final)
        }
        for leg in live_legs - owned - self.service.probe.legs:
            log.warning("call.orphan_leg", leg=leg)
            await self.service.safe_hangup(leg)
            fact = facts.get(leg)
            if fact is None or not fact.call_id or not fact.transfer_id:
                continue
            session = self.service.session(fact.call_id)
            if session is not None:  # it records the attempt and tells the caller
                session.post(LegAbandoned(leg, fact.transfer_id, fact.dialled))
                continue
            try:
                await self._record_unrecorded_leg(fact)
            except Exception:
                log.exception("call.reconcile_failed", leg=leg)

    async def _record_unrecorded_leg(self, fact: LegFacts) -> None:
        """A leg placed for a transfer our records do not have (the daemon stopped between
        the originate and its record) and no session took: it was hung up; say so on its
        call, so that no attempt goes unrecorded."""
        assert fact.call_id is not None
        store = self.service.store
        if any(t.id == fact.transfer_id for t in await store.transfers(fact.call_id)):
            return  # recorded (e.g. cancelled with its call): the hangup is all it needed
        event = CallEvent(
            "transfer.abandoned",
            utcnow(),
            {
                "transfer_id": fact.transfer_id,
                "leg": fact.leg_id,
                "dialled": fact.dialled,
                "reason": "placed by a daemon that stopped before recording it; hung up",
            },
        )
        await store.save_state(None, None, [event], call_id=fact.call_id)

    async def _reconcile_call(
        self, call: Call, live_callers: dict[str, CallArrived], resume: Resume
    ) -> None:
        session = self.service.session(call.id)
        if call.channel_id not in live_callers:
            if session is not None:
                session.post(_gone(call.channel_id))
            else:
                await self._mark_lost(call)
            return
        if session is None:
            session = await self.rebuild(call)
            self.service.register(session)
            session.start(resume)
        else:
            session.post(resume)

    async def _abandon(self, call: Call, why: str) -> None:
        """A caller we cannot serve any more goes to the fallback (never left in Stasis with
        no session); the record says so if the store lets us write it."""
        await self.service.send_to_fallback(call.channel_id, call.number)
        call.status = CallStatus.ENDED
        call.ended_at = utcnow()
        call.end_reason = f"{why}: sent to the dialplan fallback"
        try:
            ended = CallEvent("call.ended", utcnow(), {"reason": call.end_reason})
            await self.service.store.save_state(call, None, [ended])
        except Exception:
            log.exception("call.save_failed", call_id=call.id)

    async def _adopt(self, arrival: CallArrived) -> None:
        """A caller in our application we do not serve. With no record at all it is a call
        that arrived while we were away: take it. With a record (the call ended, e.g. sent to
        the fallback, but the channel is still with us) it is stuck: never a second call
        record for it; send it to the fallback again."""
        previous = await self.service.store.find_by_channel(
            self.service.pbx_name, arrival.channel_id
        )
        if previous is None:
            log.info("call.adopted", channel=arrival.channel_id)
            await self.service.arrive(arrival)
            return
        log.warning("call.stuck_channel", channel=arrival.channel_id, call_id=previous.id)
        await self.service.send_to_fallback(arrival.channel_id, previous.number)

    async def rebuild(self, call: Call) -> CallSession:
        assistant = None
        if call.assistant_id:
            try:
                assistant = await self.service.directory.get_assistant(call.assistant_id)
            except NotFound:
                pass
        session = CallSession(self.service, call, assistant)
        transfers = await self.service.store.transfers(call.id)
        session.transfer = transfers[-1] if transfers else None
        # A fallback chain's attempts are one transfer (issue 9 §3).
        session.transfers_in_call = len({t.chain_id or t.id for t in transfers})
        if session.run is not None and session.run.transfer.dtmf:
            # Its DTMF went out before the restart: the resumed run must not send it again
            # (an IVR would take the digits twice). Issue 9 §4.
            tid = session.run.transfer.id
            events = await self.service.store.events(call.id)
            session.run.dtmf_sent = any(
                e.kind == "transfer.dtmf_sent" and e.data.get("transfer_id") == tid for e in events
            )
        session.greeted = call.answered_at is not None  # mid-call: carry on, no new greeting
        return session

    async def _mark_lost(self, call: Call) -> None:
        """The caller left while we were away: the call ends, and a transfer it had open is
        settled (cancelled) with it, in one transaction. Its leg, if still up, is hung up as
        an orphan by the reconcile."""
        call.status = CallStatus.ENDED
        call.ended_at = utcnow()
        call.end_reason = "channel gone while callbridge was disconnected"
        transfers = await self.service.store.transfers(call.id)
        transfer = transfers[-1] if transfers else None
        if transfer is not None and not transfer.final:
            transfer.settle(
                TransferEvent.CALLER_GONE,
                LegOutcome.CANCELLED,
                reason="the caller left while callbridge was disconnected",
            )
        else:
            transfer = None
        ended = CallEvent("call.ended", utcnow(), {"reason": call.end_reason})
        await self.service.store.save_state(call, transfer, [ended])
        log.warning("call.lost", call_id=call.id, channel=call.channel_id)


def _gone(channel_id: str) -> ChannelHungUp:
    return ChannelHungUp(channel_id, None, "gone while callbridge was disconnected")
