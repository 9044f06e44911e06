"""Run the real daemon in-process against a lab Asterisk and talk to its API over HTTP
(shared by the integration tests and the demo)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from bridge.api.keys import create_api_key
from bridge.app import Daemon
from bridge.config import Settings
from bridge.log import configure_logging


class Api:
    """A tiny HTTP client for the daemon's REST API (real HTTP, real auth)."""

    def __init__(self, base: str, key: str) -> None:
        self.base = base
        self.session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"})

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, f"{self.base}/api/v1{path}", json=body) as resp:
            text = await resp.text()
            return resp.status, (await resp.json() if text else None)

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, data = await self.request(method, path, body)
        assert status < 300, f"{method} {path} -> {status}: {data}"
        return data

    async def close(self) -> None:
        await self.session.close()


async def start_daemon(
    lab: Any, tmp: Path, *, ari_url: str | None = None, **overrides: Any
) -> tuple[Daemon, Api]:
    """A daemon on `lab` (or on `ari_url`, e.g. a cuttable proxy in front of it) with its
    database in `tmp`: starting a second one on the same `tmp` is a daemon restart."""
    overrides.setdefault("log_format", "console")
    overrides.setdefault("log_level", "debug")
    # Admission control refuses a new call while the event loop runs late or STT is backed
    # up: beside other CPU-heavy work (the suite must pass so) it refused the very calls the
    # tests place ("overloaded: event loop 607 ms late"). Off unless a test sets `calls`
    # itself; tests/unit/test_admission.py covers it.
    overrides.setdefault("calls", {"max_loop_lag_ms": None, "max_stt_backlog_per_worker": None})
    settings = Settings(
        database=tmp / "callbridge.sqlite3",
        api={"host": "127.0.0.1", "port": 0},
        ari={
            "url": ari_url or lab.ari_url,
            "username": lab.ari_username,
            "password": lab.ari_password,
            "app": lab.app_name,
            "reconnect_initial_delay": 0.2,
            "reconnect_max_delay": 1.0,
        },
        **overrides,
    )
    configure_logging(settings.log_format, settings.log_level)
    daemon = Daemon(settings)
    await daemon.start()
    assert daemon.db is not None
    key = await create_api_key(daemon.db, "tests")
    api = Api(f"http://127.0.0.1:{daemon.api_port}", key)
    await wait_for(lambda: daemon.calls and daemon.calls.connected, "ARI connected", timeout=10)
    return daemon, api


async def wait_for(
    check: Callable[[], Any], what: str, timeout: float = 15.0, every: float = 0.1
) -> Any:
    """Poll `check` (plain or async) until it returns something truthy; fail with `what`
    after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
