"""Destination tests (`POST /destinations/test`, the seed's "test destinations"): a short
call to a destination by the route a transfer would take, hung up as soon as it answers,
reported with the same typed outcome a transfer gets (`bridge.calls.outcomes`).

Split out of `CallService` (issue 7 section 9) with its dependencies explicit: the PBX that
places the leg, the toll-fraud policy that authorises the destination and counts the leg
against its trunk, and the directory (a number named in the request must exist). The call
service routes the legs' events here (`deliver`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from bridge.calls.outcomes import classify_leg_failure, local_reason, timeout_outcome
from bridge.calls.policy import TransferPolicy
from bridge.errors import BridgeError, DestinationNotAllowed
from bridge.log import get_logger
from bridge.pbx.ports import (
    ChannelGone,
    LegAnswered,
    LegFailed,
    LegOutcome,
    LegProgress,
    LegRinging,
    PbxAdapter,
    PbxEvent,
)

log = get_logger(__name__)

PROBE_PREFIX = "cbleg-probe-"  # a leg id: the adapters route `cbleg-*` events as legs
PROBE_GUARD_S = 10.0  # beyond the ring timeout, for a PBX that never reports


class DestinationProbe:
    def __init__(self, *, pbx: PbxAdapter, policy: TransferPolicy, directory: Any) -> None:
        self.pbx = pbx
        self.policy = policy
        self.directory = directory
        self._legs: dict[str, asyncio.Queue[PbxEvent]] = {}
        # Told the rule of every refusal (no call records it): the metrics' toll-fraud
        # counter, `source="test"` (a test dials: someone may probe where trunks go).
        self.on_refused: Callable[[str | None], None] | None = None

    def deliver(self, event: PbxEvent) -> bool:
        """Take `event` if it is about a leg under test; False if it is not ours."""
        events = self._legs.get(event.channel_id)
        if events is None:
            return False
        events.put_nowait(event)
        return True

    @property
    def legs(self) -> frozenset[str]:
        """Legs under test now (the reconciler must not hang them up as orphans)."""
        return frozenset(self._legs)

    async def test(
        self, destination: str, number_id: str | None, ring_timeout: float
    ) -> dict[str, Any]:
        """Place the test call; return the typed outcome with ring and total durations."""
        if number_id is not None:
            await self.directory.get_number(number_id)  # NotFound names the field
        # The toll-fraud policy; a refusal is logged there with its rule.
        try:
            target = await self.policy.authorize(
                destination,
                number_id=number_id,
                assistant=None,
                source="test",
                transfers_in_call=0,
            )
        except DestinationNotAllowed as exc:
            if self.on_refused is not None:
                self.on_refused(exc.details.get("rule"))
            raise
        leg = f"{PROBE_PREFIX}{uuid.uuid4()}"
        events: asyncio.Queue[PbxEvent] = asyncio.Queue()
        self._legs[leg] = events
        loop = asyncio.get_running_loop()
        started = loop.time()
        rang_at: float | None = None
        progressed = False
        result: dict[str, Any] = {"destination": destination, "route": target.describe()}
        claimed = False
        try:
            self.policy.claim_leg(target)
            claimed = True
            await self.pbx.originate(
                leg,
                target,
                caller_number=None,
                ring_timeout=ring_timeout,
                variables={"CALLBRIDGE_PROBE": "1"},
            )
            async with asyncio.timeout(ring_timeout + PROBE_GUARD_S):
                while True:
                    event = await events.get()
                    if isinstance(event, LegRinging) and rang_at is None:
                        rang_at = loop.time()
                    elif isinstance(event, LegProgress):
                        progressed = True
                    elif isinstance(event, LegAnswered):
                        await self._hangup(leg)
                        result.update(outcome=LegOutcome.ANSWERED.value, sip_code=200)
                        break
                    elif isinstance(event, LegFailed):
                        outcome, reason = classify_leg_failure(
                            event, rang=rang_at is not None, progressed=progressed
                        )
                        result.update(
                            outcome=outcome.value,
                            sip_code=event.sip_code,
                            cause=event.cause,
                            cause_text=event.cause_text,
                            reason=reason,
                        )
                        break
        except TimeoutError:
            await self._hangup(leg)
            outcome, reason = timeout_outcome(rang=rang_at is not None, progressed=progressed)
            result.update(outcome=outcome.value, cause_text="no final answer", reason=reason)
        except (ChannelGone, BridgeError, ValueError) as exc:
            # The PBX could not place it (unreachable, refused, bad route): our fault.
            result.update(
                outcome=LegOutcome.FAILED.value, cause_text=str(exc), reason=local_reason(str(exc))
            )
        finally:
            self._legs.pop(leg, None)
            if claimed:
                self.policy.release_leg(target)
        result["ring_ms"] = round((rang_at - started) * 1000) if rang_at else None
        result["duration_ms"] = round((loop.time() - started) * 1000)
        log.info("destination.tested", **result)
        return result

    async def _hangup(self, leg: str) -> None:
        try:
            await self.pbx.hangup(leg)
        except Exception as exc:
            log.warning("destination.hangup_failed", leg=leg, error=str(exc))
