"""The ARI client's fault handling. Asterisk never sends malformed events, drops on cue or
answers 500 on demand, so these faults come from a small aiohttp server on loopback; the
behaviour with the real Asterisk is covered by tests/integration."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from bridge.pbx.asterisk.ari import (
    AriClient,
    AriConflict,
    AriError,
    AriNotFound,
    AriUnavailable,
)
from tests.support.daemon import wait_for


class FakeAri:
    def __init__(self) -> None:
        self.connections = 0
        self.sockets: list[web.WebSocketResponse] = []
        self.auth: list[str | None] = []

    async def events(self, request: web.Request) -> web.WebSocketResponse:
        self.auth.append(request.headers.get("Authorization"))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections += 1
        self.sockets.append(ws)
        if self.connections == 1:
            await ws.send_str("not json")
            await ws.send_str("[1, 2, 3]")
            await ws.send_str('{"no_type": true}')
            await ws.send_str('{"type": "Boom"}')
            await ws.send_str('{"type": "StasisStart", "channel": {"id": "c1"}}')
            await ws.close()  # the connection drops
        else:
            await ws.send_str('{"type": "StasisEnd", "channel": {"id": "c1"}}')
            async for msg in ws:
                if msg.type is WSMsgType.CLOSE:
                    break
        return ws

    async def channel(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        if cid == "gone":
            return web.json_response({"message": "Channel not found"}, status=404)
        if cid == "busy":
            return web.json_response({"message": "Channel not in Stasis application"}, status=409)
        if cid == "broken":
            return web.Response(status=500, text="<html>oops</html>")
        return web.json_response({"id": cid})


@pytest.fixture
async def fake_ari() -> Any:
    fake = FakeAri()
    app = web.Application()
    app.router.add_get("/ari/events", fake.events)
    app.router.add_get("/ari/channels/{cid}", fake.channel)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_bad_events_are_skipped_and_the_stream_reconnects(fake_ari: Any) -> None:
    fake, url = fake_ari
    client = AriClient(url, "u", "p", "callbridge", reconnect_initial_delay=0.05)
    seen: list[str] = []
    connects = 0

    async def on_event(event: dict[str, Any]) -> None:
        if event["type"] == "Boom":
            raise RuntimeError("a handler bug")
        seen.append(event["type"])

    async def on_connect() -> None:
        nonlocal connects
        connects += 1

    async def on_disconnect() -> None:
        pass

    task = asyncio.create_task(client.run_events(on_event, on_connect, on_disconnect))
    await wait_for(lambda: len(seen) >= 2, "both events")
    assert seen == ["StasisStart", "StasisEnd"]  # garbage skipped, the handler bug contained
    assert connects == 2 and fake.connections == 2
    assert fake.auth[0] == "Basic dTpw"  # u:p
    await client.close()
    await asyncio.wait_for(task, 2)


async def test_rest_errors_are_typed(fake_ari: Any) -> None:
    _, url = fake_ari
    client = AriClient(url, "u", "p", "callbridge")
    assert await client.get("/channels/ok") == {"id": "ok"}
    with pytest.raises(AriNotFound):
        await client.get("/channels/gone")
    with pytest.raises(AriConflict, match="not in Stasis"):
        await client.get("/channels/busy")
    with pytest.raises(AriError) as info:
        await client.get("/channels/broken")
    assert info.value.status == 500
    await client.close()


async def test_unreachable_asterisk_is_unavailable_not_a_crash() -> None:
    client = AriClient("http://127.0.0.1:9", "u", "p", "callbridge", request_timeout=1)
    with pytest.raises(AriUnavailable):
        await client.get("/asterisk/info")
    await client.close()


async def test_a_failed_resync_drops_the_connection_and_resyncs_on_the_next(
    fake_ari: Any,
) -> None:
    """One failed request in the reconnect handler (an HTTP 500, a timeout) must not leave a
    half-connected client reading events that nobody resynced: it connects again."""
    fake, url = fake_ari
    client = AriClient(url, "u", "p", "callbridge", reconnect_initial_delay=0.01)
    seen: list[str] = []
    connects = 0
    disconnects = 0
    resynced = asyncio.Event()

    async def on_event(event: dict[str, Any]) -> None:
        seen.append(event["type"])

    async def on_connect() -> None:
        nonlocal connects
        connects += 1
        if connects == 1:
            raise AriError(500, "injected", "PUT", "/asterisk/config/dynamic/x")
        resynced.set()

    async def on_disconnect() -> None:
        nonlocal disconnects
        disconnects += 1

    task = asyncio.create_task(client.run_events(on_event, on_connect, on_disconnect))
    await asyncio.wait_for(resynced.wait(), 5)
    assert (connects, disconnects, fake.connections) == (2, 1, 2)
    assert seen == ["StasisEnd"]  # only what came after a successful resync
    await client.close()
    await asyncio.wait_for(task, 2)
