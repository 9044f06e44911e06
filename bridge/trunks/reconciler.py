"""Bring the PBX's trunks to the directory's desired state, on every connect and on demand.

PBX-neutral: it needs only the adapter's `provision_trunk`, `remove_trunk` and
`provisioned_trunks`. A run provisions every trunk of the directory (a PBX restart loses
Asterisk's memory objects; provisioning is idempotent, so a changed trunk is simply written
again) and removes every trunk the PBX has from us that the directory no longer lists (deleted
while the PBX was unreachable). A failed run is retried in the background with backoff; it
never blocks the caller of `kick()`, so the call reconcile after a reconnect never waits on it.
A trunk saved or deleted through the API reaches a connected PBX at once (`push`, `drop`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from bridge.log import get_logger
from bridge.pbx.ports import TrunkSpec

log = get_logger(__name__)


class TrunkPort(Protocol):
    async def provision_trunk(self, trunk: TrunkSpec) -> None: ...

    async def remove_trunk(self, trunk_id: str) -> None: ...

    async def provisioned_trunks(self) -> set[str]: ...


class TrunkReconciler:
    def __init__(
        self,
        pbx: TrunkPort,
        desired: Callable[[], Awaitable[list[TrunkSpec]]],
        *,
        connected: Callable[[], bool] = lambda: True,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
    ) -> None:
        self.pbx = pbx
        self._desired = desired
        self._connected = connected
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        self.runs = 0  # completed runs (for tests and the log)
        self.settled = asyncio.Event()  # set when the last run succeeded and none is pending
        # Held by a run and by whoever provisions or removes one trunk meanwhile (the
        # directory's save/delete hooks), so the two never interleave.
        self.lock = asyncio.Lock()

    def kick(self) -> None:
        """Ask for a run now (e.g. the PBX (re)connected). Runs in the background; a kick
        during a run makes it run once more when it ends."""
        self._dirty = True
        self.settled.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def push(self, spec: TrunkSpec) -> None:
        """A trunk saved through the API, to the PBX now when it is connected; the error is the
        saver's, and the trunk is then retried in the background until the PBX takes it.
        Disconnected, the next connect's run provisions it."""
        if self._connected():
            await self._now(self.pbx.provision_trunk(spec))

    async def drop(self, trunk_id: str) -> None:
        """A trunk deleted through the API, as `push`; disconnected, the next run removes it
        (no longer in the directory)."""
        if self._connected():
            await self._now(self.pbx.remove_trunk(trunk_id))

    async def _now(self, change: Awaitable[None]) -> None:
        try:
            async with self.lock:  # never interleaved with a run
                await change
        except Exception:
            self.kick()
            raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        delay = self._retry_initial
        while self._dirty:
            self._dirty = False
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("trunks.reconcile_failed", error=str(exc), retry_in=delay)
                self._dirty = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            delay = self._retry_initial
        self.settled.set()

    async def run_once(self) -> None:
        """One pass; raises if anything could not be brought to the desired state (after
        trying every trunk, so that one bad trunk does not hold the others back)."""
        async with self.lock:
            await self._run_once()

    async def _run_once(self) -> None:
        # What the PBX has first, the directory second: a trunk saved in between is then in
        # both lists, never taken for a stale one.
        present = await self.pbx.provisioned_trunks()
        desired = {spec.id: spec for spec in await self._desired()}
        failures: list[str] = []
        for spec in desired.values():
            try:
                await self.pbx.provision_trunk(spec)
            except Exception as exc:
                log.error("trunks.provision_failed", trunk=spec.id, error=str(exc))
                failures.append(spec.id)
        for trunk_id in sorted(present - desired.keys()):
            try:
                await self.pbx.remove_trunk(trunk_id)
                log.info("trunks.stale_removed", trunk=trunk_id)
            except Exception as exc:
                log.error("trunks.remove_failed", trunk=trunk_id, error=str(exc))
                failures.append(trunk_id)
        self.runs += 1
        if failures:
            raise RuntimeError(f"trunks not reconciled: {', '.join(failures)}")
        log.info("trunks.reconciled", trunks=len(desired), removed=len(present - desired.keys()))
