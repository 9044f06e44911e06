"""`callbridge run` as a real process: config from the environment, API keys from the CLI,
attached to the lab Asterisk, stopped cleanly by SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.lab.asterisk import free_port
from bridge.lab.harness import wait_for

pytestmark = pytest.mark.asterisk


async def test_run_serves_the_api_with_keys_and_stops_on_sigterm(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    port = free_port(kind=socket.SOCK_STREAM)
    env = {
        **os.environ,
        "CALLBRIDGE_DATABASE": str(tmp_path / "cb.sqlite3"),
        "CALLBRIDGE_API__PORT": str(port),
        "CALLBRIDGE_ARI__URL": asterisk_lab.ari_url,
        "CALLBRIDGE_ARI__USERNAME": asterisk_lab.ari_username,
        "CALLBRIDGE_ARI__PASSWORD": asterisk_lab.ari_password,
        "CALLBRIDGE_LOG_FORMAT": "json",
    }
    create = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "api-key",
        "create",
        "--name",
        "t",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await create.communicate()
    key = out.decode().strip()
    assert create.returncode == 0 and key.startswith("cb_")

    daemon = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        async with aiohttp.ClientSession() as http:

            async def healthy() -> dict[str, Any] | None:
                try:
                    async with http.get(f"{base}/health") as resp:
                        data = await resp.json()
                        return data if data.get("pbx_connected") else None
                except aiohttp.ClientError:
                    return None

            health = await wait_for(healthy, "the daemon to serve and connect", timeout=20)
            assert health["status"] == "ok"
            async with http.get(f"{base}/assistants") as resp:
                assert resp.status == 401
            auth = {"Authorization": f"Bearer {key}"}
            async with http.get(f"{base}/assistants", headers=auth) as resp:
                assert resp.status == 200 and (await resp.json()) == {"data": []}
        daemon.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(daemon.wait(), 10) == 0
        _, err = await daemon.communicate()
        assert b'"callbridge.stopped"' in err
        # `run` puts the daemon on its configured loop with its GIL switch interval (the
        # process says so itself): uvloop and 1 ms by default.
        started = next(
            json.loads(line) for line in err.splitlines() if b'"callbridge.started"' in line
        )
        assert (started["event_loop"], started["gil_switch_interval_ms"]) == ("uvloop", 1.0)
        assert asterisk_lab.ari_password.encode() not in err  # no secret in the logs
    finally:
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()


async def test_ari_credentials_in_the_url_connect(asterisk_lab: Any, tmp_path: Path) -> None:
    """`[ari] url = "http://user:pw@host:port"` alone: the daemon connects (the credentials
    move out of the URL) instead of running with a dead events task."""
    port = free_port(kind=socket.SOCK_STREAM)
    scheme, rest = asterisk_lab.ari_url.split("://", 1)
    url = f"{scheme}://{asterisk_lab.ari_username}:{asterisk_lab.ari_password}@{rest}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CALLBRIDGE_")},
        "CALLBRIDGE_DATABASE": str(tmp_path / "cb.sqlite3"),
        "CALLBRIDGE_API__PORT": str(port),
        "CALLBRIDGE_ARI__URL": url,
        "CALLBRIDGE_AGENT__ENABLED": "false",
        "CALLBRIDGE_LOG_FORMAT": "json",
    }
    daemon = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as http:

            async def connected() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/api/v1/health") as resp:
                        return bool((await resp.json()).get("pbx_connected"))
                except aiohttp.ClientError:
                    return False

            await wait_for(connected, "the daemon to connect to ARI", timeout=20)
        daemon.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(daemon.wait(), 10) == 0
        _, err = await daemon.communicate()
        assert asterisk_lab.ari_password.encode() not in err  # the URL is logged without it
    finally:
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()
