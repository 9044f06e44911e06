"""Admission control: a call the daemon cannot serve well goes to the dialplan fallback at
once, so the calls already up keep their quality (issue 7, section 8).

`Admission.refuse_reason()` is asked once per arriving call, before it is answered. It refuses
when:

- `calls.max_active` calls are already up (a hard cap; None: no cap);
- the event loop is late: `LoopLagMonitor` measures how late a periodic timer fires, and the
  worst lag of the last `calls.lag_window_s` seconds is above `calls.max_loop_lag_ms`. A late
  loop delays every call's RTP pacing, ARI events and API requests at once: one more call only
  makes it later;
- more utterances wait for STT than `calls.max_stt_backlog_per_worker` per worker (replies
  would come seconds late).

The refused caller is not answered by us: `turn_away` records the reason on the call
(`call.refused` event, and the end reason) and continues the channel in the dialplan's
fallback context, where a human queue or voicemail takes it.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from bridge.calls.model import CallStatus, utcnow
from bridge.config import CallSettings
from bridge.errors import BridgeError
from bridge.log import get_logger
from bridge.pbx.ports import ChannelGone

if TYPE_CHECKING:
    from bridge.calls.model import Call
    from bridge.calls.service import CallService


class Arrival(Protocol):
    """The arriving call's session, as far as `turn_away` needs it."""

    call: Call

    async def record(self, kind: str, **data: Any) -> None: ...


log = get_logger(__name__)


class LoopLagMonitor:
    """How late the event loop runs a timer that should fire every `interval` seconds.

    `lag_ms()` is the worst lag of the last `window` seconds (what admission looks at);
    `stats()` gives percentiles over the recent samples (the event-loop lag metric)."""

    def __init__(
        self,
        interval: float = 0.05,
        window: float = 2.0,
        *,
        warn_ms: float | None = None,
        keep: int = 12000,
    ) -> None:
        self.interval = interval
        self.window = window
        self.warn_ms = warn_ms
        self._recent: collections.deque[tuple[float, float]] = collections.deque()
        self._samples: collections.deque[float] = collections.deque(maxlen=keep)
        self._task: asyncio.Task[None] | None = None
        self._last_warning = 0.0
        self.max_ms = 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            now = loop.time()
            self.observe(max(0.0, (now - before - self.interval) * 1000), now)

    def observe(self, lag_ms: float, now: float | None = None) -> None:
        """Record one measurement (the monitor's own task calls this; tests may too)."""
        now = time.monotonic() if now is None else now
        self._recent.append((now, lag_ms))
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()
        self._samples.append(lag_ms)
        self.max_ms = max(self.max_ms, lag_ms)
        if self.warn_ms is not None and lag_ms > self.warn_ms and now - self._last_warning > 5:
            self._last_warning = now
            log.warning("loop.lagging", lag_ms=round(lag_ms), threshold_ms=self.warn_ms)

    def lag_ms(self) -> float:
        """The worst lag of the last `window` seconds (0 before any measurement)."""
        return max((lag for _, lag in self._recent), default=0.0)

    def stats(self) -> dict[str, float]:
        samples = sorted(self._samples)
        if not samples:
            return {"samples": 0, "p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}

        def pct(p: float) -> float:
            return round(samples[min(len(samples) - 1, int(p * len(samples)))], 1)

        return {
            "samples": len(samples),
            "mean_ms": round(statistics.fmean(samples), 1),
            "p50_ms": pct(0.50),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "max_ms": round(self.max_ms, 1),
        }


class Admission:
    """Decides, per arriving call, whether the daemon can serve one more call well."""

    def __init__(
        self,
        settings: CallSettings,
        *,
        active: Callable[[], int],
        lag: LoopLagMonitor | None = None,
        stt_backlog: Callable[[], int] | None = None,
        stt_workers: int = 1,
    ) -> None:
        self.settings = settings
        self.active = active
        self.lag = lag
        self.stt_backlog = stt_backlog
        self.stt_workers = max(1, stt_workers)
        self.refused: collections.Counter[str] = collections.Counter()  # by rule

    def refuse_reason(self) -> str | None:
        """Why a new call must go to the fallback now, or None to answer it."""
        s = self.settings
        if s.max_active is not None and self.active() >= s.max_active:
            return self._refuse("max_active", f"calls.max_active ({s.max_active}) reached")
        if self.lag is not None and s.max_loop_lag_ms is not None:
            lag = self.lag.lag_ms()
            if lag > s.max_loop_lag_ms:
                return self._refuse(
                    "loop_lag",
                    f"event loop {lag:.0f} ms late (calls.max_loop_lag_ms {s.max_loop_lag_ms})",
                )
        if self.stt_backlog is not None and s.max_stt_backlog_per_worker is not None:
            backlog = self.stt_backlog()
            bound = s.max_stt_backlog_per_worker * self.stt_workers
            if backlog > bound:
                return self._refuse(
                    "stt_backlog", f"{backlog} utterances waiting for STT (bound {bound})"
                )
        return None

    def _refuse(self, rule: str, reason: str) -> str:
        self.refused[rule] += 1
        return f"overloaded: {reason}"

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "max_active": s.max_active,
            "max_loop_lag_ms": s.max_loop_lag_ms,
            "max_stt_backlog": (
                None
                if s.max_stt_backlog_per_worker is None
                else s.max_stt_backlog_per_worker * self.stt_workers
            ),
            "refused": dict(self.refused),
        }


async def turn_away(service: CallService, session: Arrival, reason: str) -> None:
    """Send an arriving call we will not serve to the dialplan fallback, reason recorded.
    Whatever `calls.unknown_number_action` says: an overloaded daemon never hangs up."""
    call = session.call
    log.warning("call.refused", channel=call.channel_id, reason=reason)
    await session.record("call.refused", reason=reason)
    try:
        await service.pbx.continue_in_dialplan(
            call.channel_id, service.settings.calls.fallback_context, call.number or "s"
        )
        end = f"{reason}: sent to the dialplan fallback"
    except ChannelGone:
        end = f"{reason}: caller already gone"
    except BridgeError as exc:
        end = f"{reason}: fallback failed ({exc})"
        log.error("call.fallback_failed", channel=call.channel_id, error=str(exc))
    call.status = CallStatus.ENDED
    call.ended_at = utcnow()
    call.end_reason = end
    await service.store.save(call)
    await session.record("call.ended", reason=end)
