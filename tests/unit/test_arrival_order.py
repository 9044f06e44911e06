"""Arrivals on Asterisk (issue 7 §8): a caller's arrival is handled in its own task, so a slow
one (the service's database records, a saturated Asterisk) never delays another caller's
take past the dialplan's take guard; the events of an arriving channel follow it in order."""

from __future__ import annotations

import asyncio
from typing import Any

from bridge.pbx.asterisk.adapter import AsteriskAdapter
from bridge.pbx.ports import CallArrived, ChannelHungUp, PbxEvent
from tests.support.calls import until
from tests.unit.test_asterisk_adapter import ScriptedAri


def stasis_start(cid: str) -> dict[str, Any]:
    return {"type": "StasisStart", "channel": {"id": cid, "dialplan": {"exten": "+3120"}}}


async def test_a_slow_arrival_does_not_hold_up_the_next_callers_take() -> None:
    adapter = AsteriskAdapter(ScriptedAri(lambda method, path, params: None))  # type: ignore[arg-type]
    gate = asyncio.Event()
    events: list[PbxEvent] = []

    async def sink(event: PbxEvent) -> None:
        if isinstance(event, CallArrived) and event.channel_id == "slow":
            await gate.wait()  # the service still writing its records for this caller
        events.append(event)

    adapter._sink = sink

    async def deliver(event: dict[str, Any]) -> None:
        # As AriClient does: one event at a time (bounded: inline handling would block here).
        await asyncio.wait_for(adapter._on_event(event), 5)

    await deliver(stasis_start("slow"))
    await deliver({"type": "ChannelHangupRequest", "channel": {"id": "slow"}, "cause": 16})
    await deliver({"type": "StasisEnd", "channel": {"id": "slow"}})
    await deliver(stasis_start("fast"))
    await until(lambda: events, "the second caller taken")
    requests = adapter.ari.requests  # type: ignore[attr-defined]
    take = {"variable": "TIMEOUT(absolute)", "value": "0"}
    assert ("POST", "/channels/fast/variable", take) in requests
    assert events == [CallArrived("fast", "+3120")]  # the slow caller's hangup waits for it
    gate.set()
    await until(lambda: len(events) == 3, "the slow caller's arrival and hangup")
    assert events[1:] == [CallArrived("slow", "+3120"), ChannelHungUp("slow", 16, None)]
    assert adapter._arriving == {}
