"""Issue 10 on the real Asterisk: a lab call's transfer shows in a scraped /metrics, and a
webhook receiver gets the signed `transfer.completed` exactly once, even when it is down at
the event and the daemon restarts before it comes back."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bridge.lab.asterisk import free_port
from bridge.lab.rtp import RtpPeer
from bridge.lab.sipp import SippCall, SippUas
from bridge.ops.webhooks import SIGNATURE_HEADER, verify
from tests.integration.test_conversation_asterisk import (
    SALES_SENTENCE,
    Call,
    greeting_done,
    provision,
    say,
    speech_models,  # noqa: F401 (a fixture)
)
from tests.support.daemon import start_daemon, wait_for
from tests.support.flows import DESTINATION, DID, active_call, setup_directory, transfer_settled
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.asterisk

POLICY = {"allowed_prefixes": ["+31"], "allowed_sip_domains": ["127.0.0.1"]}
SECRET = "test-webhook-secret-0123456789"
METRICS_TOKEN = "scrape-only-token-abcdef"
FAST_RETRIES = {"retry_initial": 0.2, "retry_max": 0.5, "timeout": 2}


class Receiver:
    """A webhook receiver on a fixed port (it can be down, then come up on the same URL)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.got: list[tuple[dict[str, str], bytes]] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        async def hook(request: web.Request) -> web.Response:
            self.got.append((dict(request.headers), await request.read()))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def events(self, kind: str) -> list[dict[str, Any]]:
        out = []
        for headers, body in self.got:
            payload = json.loads(body)
            if payload["type"] != kind:
                continue
            # Every delivery is signed over timestamp + body with the subscription's secret.
            assert verify(SECRET, headers[SIGNATURE_HEADER], body), headers
            assert headers["Callbridge-Event-Id"] == payload["id"]
            out.append(payload)
        return out


async def _scrape(port: int, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as resp:
            return resp.status, await resp.text()


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _bridged_lab_call(
    lab: Any, api: Any, caller_rtp: RtpPeer, uas: SippUas
) -> tuple[SippCall, str, str]:
    """A lab call transferred by the control API to the UAS, which answers: bridged.
    Returns the SIPp caller, the call id and the assistant id."""
    setup = await setup_directory(api, uas)
    caller = SippCall.to_lab(lab, DID, rtp_port=caller_rtp.port, hold_ms=20000)
    await caller.start()
    call = await active_call(api)
    await api.ok(
        "POST", f"/calls/{call['id']}/control", {"type": "transfer", "destination": DESTINATION}
    )
    done = await transfer_settled(api, call["id"])
    assert done["transfers"][-1]["state"] == "bridged", done["transfers"][-1]
    return caller, call["id"], setup["assistant"]["id"]


async def test_transfer_outcome_in_scraped_metrics_and_signed_webhook(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    receiver = Receiver(free_port(socket.SOCK_STREAM))
    await receiver.start()
    daemon, api = await start_daemon(
        asterisk_lab,
        tmp_path,
        transfer=POLICY,
        metrics={"token": METRICS_TOKEN},
        webhooks=FAST_RETRIES,
    )
    try:
        await api.ok("POST", "/webhooks", {"url": receiver.url, "events": ["*"], "secret": SECRET})
        async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
            uas = SippUas(
                "uas_answer_auth.xml",
                rtp_port=dest_rtp.port,
                keys={"auth_user": "hms-sovereign", "auth_pass": "secure-password"},
            )
            await uas.start()
            caller, call_id, assistant_id = await _bridged_lab_call(
                asterisk_lab, api, caller_rtp, uas
            )
            try:
                port = daemon.api_port
                assert port is not None
                assert (await _scrape(port, None))[0] == 401
                assert (await _scrape(port, "wrong-token-xxxxxxxx"))[0] == 401
                status, text = await _scrape(port, METRICS_TOKEN)
                assert status == 200
                m = _samples(text)
                transfer_labels = frozenset(
                    {
                        ("source", "api"),
                        ("destination", "other"),  # an API transfer's number is no label
                        ("mode", "bridge"),
                        ("outcome", "answered"),
                    }
                )
                assert m[("callbridge_transfers_total", transfer_labels)] == 1.0
                dest = frozenset({("destination", "other")})
                assert m[("callbridge_transfer_ring_seconds_count", dest)] == 1.0
                assert m[("callbridge_transfer_decided_to_bridged_seconds_count", dest)] == 1.0
                assistant = frozenset({("assistant", assistant_id)})
                assert m[("callbridge_calls_started_total", assistant)] == 1.0
                assert m[("callbridge_calls_active", assistant)] == 1.0  # bridged, still up
                assert m[("callbridge_pbx_connected", frozenset({("pbx", "asterisk")}))] == 1.0
                control = frozenset(
                    {("route", "/api/v1/calls/{id}/control"), ("method", "POST"), ("status", "202")}
                )
                assert m[("callbridge_api_requests_total", control)] == 1.0
                # An API key opens /metrics too.
                assert (await _scrape(port, api.session.headers["Authorization"][7:]))[0] == 200

                # The receiver gets the signed transfer.completed, with its typed outcome.
                await wait_for(lambda: receiver.events("transfer.completed"), "the webhook")
                (completed,) = receiver.events("transfer.completed")
                assert completed["call_id"] == call_id
                _, text = await _scrape(port, METRICS_TOKEN)
                delivered = frozenset({("event", "transfer.completed"), ("result", "delivered")})
                assert _samples(text)[("callbridge_webhook_attempts_total", delivered)] == 1.0
                assert completed["transfer"]["outcome"] == "answered"
                assert completed["transfer"]["destination"] == DESTINATION
                assert receiver.events("transfer.requested")
                assert receiver.events("call.started")
            finally:
                await caller.terminate()
                await uas.stop()
    finally:
        await api.close()
        await daemon.stop()
        await receiver.stop()


async def test_webhook_survives_a_restart_while_the_receiver_is_down(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    receiver = Receiver(free_port(socket.SOCK_STREAM))  # not started: connections are refused
    daemon, api = await start_daemon(asterisk_lab, tmp_path, transfer=POLICY, webhooks=FAST_RETRIES)
    running = daemon
    try:
        hook = await api.ok(
            "POST",
            "/webhooks",
            {"url": receiver.url, "events": ["transfer.completed"], "secret": SECRET},
        )
        deliveries = f"/webhooks/{hook['id']}/deliveries"
        async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
            uas = SippUas("uas_answer.xml", rtp_port=dest_rtp.port)
            await uas.start()
            caller, _, _ = await _bridged_lab_call(asterisk_lab, api, caller_rtp, uas)
            try:

                async def failed_once() -> dict[str, Any] | None:
                    rows = (await api.ok("GET", deliveries))["data"]
                    return rows[0] if rows and rows[0]["attempts"] >= 1 else None

                before = await wait_for(failed_once, "a refused delivery attempt")
                assert before["status"] == "pending" and before["last_error"], before
                # The daemon stops with the event undelivered; the receiver comes up; a new
                # daemon on the same database delivers it.
                await api.close()
                await daemon.stop()
                running = None
                await receiver.start()
                running, api = await start_daemon(
                    asterisk_lab, tmp_path, transfer=POLICY, webhooks=FAST_RETRIES
                )

                async def delivered() -> dict[str, Any] | None:
                    rows = (await api.ok("GET", deliveries))["data"]
                    return rows[0] if rows and rows[0]["status"] == "delivered" else None

                row = await wait_for(delivered, "the delivery after the restart")
                assert row["event_id"] == before["event_id"]
                (completed,) = receiver.events("transfer.completed")  # exactly once
                assert completed["id"] == before["event_id"]
                assert completed["transfer"]["outcome"] == "answered"
                # Nothing else is queued: a later look still shows one delivery, one receipt.
                rows = (await api.ok("GET", deliveries))["data"]
                assert len(rows) == 1 and len(receiver.got) == 1
            finally:
                await caller.terminate()
                await uas.stop()
    finally:
        await api.close()
        if running is not None:
            await running.stop()
        await receiver.stop()


@pytest.mark.usefixtures("speech_models")
async def test_assistant_transfer_on_real_speech_feeds_metrics_webhook_and_analytics(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    """The caller speaks; the assistant (local router, whisper, silero) transfers by itself:
    the turn's recorded latencies land in the histograms, the tool call in a webhook, and the
    caller's words in the analytics as the reason for the transfer."""
    receiver = Receiver(free_port(socket.SOCK_STREAM))
    await receiver.start()
    daemon, api = await start_daemon(
        asterisk_lab,
        tmp_path,
        vad={"engine": "silero"},
        metrics={"token": METRICS_TOKEN},
        webhooks=FAST_RETRIES,
    )
    try:
        await api.ok("POST", "/webhooks", {"url": receiver.url, "events": ["*"], "secret": SECRET})
        async with Call(asterisk_lab, api, "uas_answer.xml") as call:
            await provision(api, asterisk_lab.uas_port, "local", "Acme, how can I help?")
            await call.dial()
            assert call.id is not None
            await greeting_done(call.caller_rtp)
            await say(call.caller_rtp, SALES_SENTENCE)
            done = await transfer_settled(api, call.id)
            assert done["transfers"][-1]["state"] == "bridged"
            assert done["transfers"][-1]["source"] == "assistant"

            assert daemon.api_port is not None
            status, text = await _scrape(daemon.api_port, METRICS_TOKEN)
            assert status == 200
            m = _samples(text)
            sales = "Sales team - for pricing and quotes"
            labels = frozenset(
                {("source", "assistant"), ("destination", sales), ("mode", "bridge"),
                 ("outcome", "answered")}
            )  # fmt: skip
            assert m[("callbridge_transfers_total", labels)] == 1.0
            assert m[("callbridge_assistant_tool_calls_total",
                      frozenset({("tool", "transfer_call")}))] == 1.0  # fmt: skip
            assert m[("callbridge_stt_seconds_count", frozenset())] >= 1.0
            assert m[("callbridge_tts_seconds_count", frozenset())] >= 2.0  # greeting, message

            await wait_for(lambda: receiver.events("assistant.tool_called"), "the tool webhook")
            (tool,) = receiver.events("assistant.tool_called")
            assert tool["data"]["tool"] == "transfer_call"
            assert json.loads(tool["data"]["arguments"]) == {"destination": "sales_team"}

            analytics = await api.ok("GET", "/analytics/transfers")
            (assistant,) = analytics["assistants"]
            assert assistant["transfer_rate"] == 1.0 and assistant["outcomes"] == {"answered": 1}
            (reason,) = assistant["reasons"]
            assert "sales" in " ".join(reason["caller_said"]).lower(), reason
            (dest,) = analytics["destinations"]
            assert dest["id"] == sales and dest["median_ring_seconds"] is not None
    finally:
        await api.close()
        await daemon.stop()
        await receiver.stop()


async def test_pbx_connection_state_and_reconnects_in_metrics(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    """The ARI connection is cut (a TCP proxy in front of the real Asterisk) and restored:
    /metrics shows the drop and counts the reconnect; the trunk page shows 'unknown' while
    the PBX is away and 'provisioned' after."""
    proxy = await TcpProxy("127.0.0.1", asterisk_lab.http_port).start()
    daemon, api = await start_daemon(
        asterisk_lab, tmp_path, ari_url=proxy.url, metrics={"token": METRICS_TOKEN}
    )
    pbx = frozenset({("pbx", "asterisk")})
    try:
        assert daemon.api_port is not None
        port = daemon.api_port
        await api.ok("POST", "/sip-trunks", {"name": "t", "host": "127.0.0.1"})

        async def metric(name: str) -> float:
            status, text = await _scrape(port, METRICS_TOKEN)
            assert status == 200
            return _samples(text)[(name, pbx)]

        assert await metric("callbridge_pbx_connected") == 1.0
        assert await metric("callbridge_pbx_reconnects_total") == 0.0
        proxy.cut()
        await wait_for(
            lambda: _value_is(metric("callbridge_pbx_connected"), 0.0), "the drop in /metrics", 10
        )
        trunks = await api.ok("GET", "/ops/trunks")
        assert trunks["pbx_connected"] is False and trunks["data"][0]["pbx_state"] == "unknown"
        proxy.restore()
        await wait_for(
            lambda: _value_is(metric("callbridge_pbx_connected"), 1.0), "the reconnect", 15
        )
        assert await metric("callbridge_pbx_reconnects_total") == 1.0

        async def provisioned() -> bool:
            data = (await api.ok("GET", "/ops/trunks"))["data"]
            return data[0]["pbx_state"] == "provisioned"

        await wait_for(provisioned, "the trunk back on the PBX", 15)
    finally:
        await api.close()
        await daemon.stop()
        await proxy.close()


async def _value_is(value: Any, expected: float) -> bool:
    return bool(await value == expected)
