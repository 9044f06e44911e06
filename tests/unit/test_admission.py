"""Admission control and the event-loop lag monitor (issue 7, section 8)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bridge.calls.admission import Admission, LoopLagMonitor
from bridge.calls.model import CallStatus
from bridge.calls.service import CallService
from bridge.calls.store import CallStore
from bridge.config import CallSettings, Settings
from bridge.directory.models import AssistantIn, NumberIn
from bridge.directory.service import DirectoryService
from bridge.lab.harness import wait_for
from bridge.pbx.ports import CallArrived
from bridge.store.db import Database


def admission(
    *,
    active: int = 0,
    lag: LoopLagMonitor | None = None,
    backlog: int = 0,
    workers: int = 2,
    **settings: Any,
) -> Admission:
    return Admission(
        CallSettings(**settings),
        active=lambda: active,
        lag=lag,
        stt_backlog=lambda: backlog,
        stt_workers=workers,
    )


def test_a_new_call_is_admitted_when_nothing_is_overloaded() -> None:
    lag = LoopLagMonitor()
    lag.observe(12.0)
    assert admission(active=49, max_active=50, lag=lag, backlog=6).refuse_reason() is None


def test_max_active_is_a_hard_cap() -> None:
    gate = admission(active=50, max_active=50)
    assert gate.refuse_reason() == "overloaded: calls.max_active (50) reached"
    assert gate.refused == {"max_active": 1}
    assert admission(active=10**6).refuse_reason() is None  # no cap by default


def test_a_late_event_loop_refuses_until_the_lag_is_out_of_the_window() -> None:
    lag = LoopLagMonitor(window=2.0)
    gate = admission(lag=lag, max_loop_lag_ms=250)
    lag.observe(20.0, now=100.0)
    lag.observe(400.0, now=100.5)
    assert gate.refuse_reason() == (
        "overloaded: event loop 400 ms late (calls.max_loop_lag_ms 250)"
    )
    lag.observe(30.0, now=102.0)
    assert gate.refuse_reason() is not None  # 400 ms is 1.5 s old: still in the window
    lag.observe(30.0, now=102.6)
    assert gate.refuse_reason() is None
    assert admission(lag=lag, max_loop_lag_ms=None).refuse_reason() is None


def test_the_stt_backlog_is_bounded_per_worker() -> None:
    assert admission(backlog=6, workers=2).refuse_reason() is None  # default 3 per worker
    gate = admission(backlog=7, workers=2)
    assert gate.refuse_reason() == "overloaded: 7 utterances waiting for STT (bound 6)"
    assert admission(backlog=99, max_stt_backlog_per_worker=None).refuse_reason() is None


def test_lag_stats_give_percentiles() -> None:
    lag = LoopLagMonitor()
    for ms in range(100):
        lag.observe(float(ms))
    stats = lag.stats()
    assert stats["samples"] == 100 and stats["max_ms"] == 99.0
    assert stats["p50_ms"] == 50.0 and stats["p95_ms"] == 95.0


async def test_the_monitor_measures_a_blocked_loop() -> None:
    lag = LoopLagMonitor(interval=0.02, window=5.0)
    lag.start()
    try:
        await wait_for(lambda: lag.stats()["samples"] >= 3, "first samples", every=0.01)
        assert lag.lag_ms() < 150
        time.sleep(0.3)  # noqa: ASYNC251 - the point: CPU work on the loop blocks every call
        await wait_for(lambda: lag.lag_ms() >= 250, "the blocked loop measured", every=0.01)
    finally:
        await lag.stop()
    assert not lag.running


# --- the call site in CallService._new_call --------------------------------------------


class RecordingPbx:
    def __init__(self) -> None:
        self.verbs: list[tuple[str, Any]] = []

    async def continue_in_dialplan(self, channel_id: str, context: str, exten: str) -> None:
        self.verbs.append(("continue_in_dialplan", (channel_id, context, exten)))

    def __getattr__(self, name: str) -> Any:
        async def verb(*args: Any, **kwargs: Any) -> None:
            self.verbs.append((name, args))

        return verb


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    db = await Database.open(tmp_path / "cb.sqlite3")
    directory = DirectoryService(db)
    assistant = await directory.create_assistant(AssistantIn(name="Acme", first_message="Hi"))
    await directory.create_number(NumberIn(number="+31201234567", assistant_id=assistant.id))
    yield db, directory
    await db.close()


async def test_an_overloaded_daemon_sends_the_new_caller_to_the_fallback_at_once(
    world: Any,
) -> None:
    db, directory = world
    pbx = RecordingPbx()
    store = CallStore(db)
    # "hangup" for unknown numbers: an overloaded daemon still never hangs up on a caller.
    settings = Settings(calls={"max_active": 1, "unknown_number_action": "hangup"})
    service = CallService(
        settings=settings,
        pbx=pbx,  # type: ignore[arg-type]
        pbx_name="asterisk",
        store=store,
        directory=directory,
        tts=None,  # type: ignore[arg-type]
    )
    service.admission = Admission(settings.calls, active=lambda: 1)  # type: ignore[attr-defined]
    await service.on_pbx_event(CallArrived("chan-1", called_number="+31201234567"))
    assert pbx.verbs == [
        ("continue_in_dialplan", ("chan-1", "callbridge-fallback", "+31201234567"))
    ]
    (call,) = await store.list()
    assert call.status is CallStatus.ENDED
    assert call.end_reason == (
        "overloaded: calls.max_active (1) reached: sent to the dialplan fallback"
    )
    kinds = [(e.kind, e.data.get("reason")) for e in await store.events(call.id)]
    assert ("call.refused", "overloaded: calls.max_active (1) reached") in kinds
    assert service._by_id == {}  # no session runs for it
