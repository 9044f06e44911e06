"""The ARI client never logs its credentials, whatever aiohttp puts in an exception."""

from __future__ import annotations

import asyncio
import base64

from aiohttp import web
from structlog.testing import capture_logs

from bridge.pbx.asterisk.ari import AriClient
from tests.support.daemon import wait_for


async def test_a_refused_websocket_is_logged_without_the_credentials() -> None:
    async def events(request: web.Request) -> web.Response:
        return web.Response(status=401, text="Authentication required")

    app = web.Application()
    app.router.add_get("/ari/events", events)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = AriClient(
        f"http://127.0.0.1:{port}",
        "callbridge",
        "s3cret-pass",
        "callbridge",
        reconnect_initial_delay=0.05,
        reconnect_max_delay=0.05,
    )

    async def nothing(*_: object) -> None:
        return None

    with capture_logs() as logs:
        task = asyncio.create_task(client.run_events(nothing, nothing, nothing))
        try:
            await wait_for(
                lambda: any(e["event"] == "ari.connect_failed" for e in logs),
                "the refused connection to be logged",
            )
        finally:
            await client.close()
            task.cancel()
            await runner.cleanup()
    failed = [e for e in logs if e["event"] == "ari.connect_failed"]
    assert "401" in failed[0]["error"], failed[0]  # still says what went wrong
    token = base64.b64encode(b"callbridge:s3cret-pass").decode()
    for entry in logs:
        text = repr(entry)
        assert token not in text and "s3cret-pass" not in text, entry
