"""Calls are never lost: ARI connection drops, daemon restarts, unknown numbers — on the real
Asterisk with real SIPp calls and real audio."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest

from bridge import faults
from bridge.lab.asterisk import free_port
from bridge.lab.rtp import RtpPeer, dominant_frequency
from bridge.lab.sipp import SippCall, SippUas
from bridge.pbx.asterisk.ari import AriError, AriUnavailable
from tests.support.daemon import Api, start_daemon, wait_for
from tests.support.flows import (
    DESTINATION,
    DID,
    active_call,
    heard_speech,
    setup_directory,
    transfer_settled,
)
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.asterisk


@pytest.fixture
async def proxied(asterisk_lab: Any, tmp_path: Path):
    """A daemon whose ARI connection runs through a proxy the test can cut."""
    proxy = await TcpProxy("127.0.0.1", asterisk_lab.http_port).start()
    daemon, api = await start_daemon(asterisk_lab, tmp_path, ari_url=proxy.url)
    try:
        yield proxy, daemon, api
    finally:
        await api.close()
        await daemon.stop()
        await proxy.close()


async def call_status(api: Api, call_id: str) -> str:
    return (await api.ok("GET", f"/calls/{call_id}"))["status"]


async def test_unknown_number_goes_to_the_dialplan_fallback(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    daemon, api = await start_daemon(asterisk_lab, tmp_path)
    try:
        async with RtpPeer() as caller_rtp:
            caller = SippCall.to_lab(
                asterisk_lab, "+31999999999", rtp_port=caller_rtp.port, hold_ms=15000
            )
            await caller.start()
            # The fallback context answers and plays an announcement: real audio, no silence.
            await heard_speech(caller_rtp, since=0)

            async def ended() -> list[dict[str, Any]]:
                return (await api.ok("GET", "/calls?status=ended"))["data"]

            (call,) = await wait_for(ended, "the refused call to be recorded")
            assert call["number"] == "+31999999999"
            assert call["end_reason"] == "unknown number: sent to the dialplan fallback"
            await asyncio.wait_for(caller.wait(), 20)
            assert caller.got_bye()  # the fallback hung up after its announcement
    finally:
        await api.close()
        await daemon.stop()


async def test_ari_connection_drop_keeps_the_call_and_control(
    asterisk_lab: Any, proxied: Any
) -> None:
    proxy, daemon, api = proxied
    async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
        uas = SippUas("uas_answer.xml", rtp_port=dest_rtp.port)
        await uas.start()
        await setup_directory(api, uas, auth=False)
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=60000)
        await caller.start()
        try:
            call = await active_call(api)
            await heard_speech(caller_rtp, since=0)

            proxy.cut()
            await wait_for(lambda: not daemon.calls.connected, "the daemon to see the drop", 5)
            # The outage lasts a second (a scenario length, not a wait for something): the
            # daemon keeps failing to reconnect meanwhile, the caller stays up.
            await asyncio.sleep(1.0)
            proxy.restore()
            await wait_for(lambda: daemon.calls.connected, "reconnect", 10)

            assert await call_status(api, call["id"]) == "active"
            t0 = asyncio.get_running_loop().time()
            say = {"type": "say", "message": "Still here."}
            await api.ok("POST", f"/calls/{call['id']}/control", say)
            await heard_speech(caller_rtp, since=t0)
            await api.ok(
                "POST",
                f"/calls/{call['id']}/control",
                {"type": "transfer", "destination": DESTINATION},
            )
            done = await transfer_settled(api, call["id"])
            assert done["transfers"][-1]["state"] == "bridged"
            assert not caller.got_bye()
            # End it through the API: both legs are released (nothing left in Asterisk).
            await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
            assert await asyncio.wait_for(caller.wait(), 10) == 0 and caller.got_bye()
            await asyncio.wait_for(uas.wait(), 10)
            assert uas.received_requests("BYE")
        finally:
            await caller.terminate()
            await uas.stop()


async def test_caller_leaving_during_an_outage_is_recorded_after_reconnect(
    asterisk_lab: Any, proxied: Any
) -> None:
    proxy, _, api = proxied
    async with RtpPeer() as caller_rtp:
        await setup_directory(api, None)
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=4000)
        await caller.start()
        call = await active_call(api)
        # Cut once the call is fully set up (media attached, greeting playing); a cut during
        # the attach is another case (the attach fails), which made this test flaky.
        await heard_speech(caller_rtp, since=0)
        proxy.cut()
        await asyncio.wait_for(caller.wait(), 15)  # hangs up while we are disconnected
        proxy.restore()

        async def ended() -> bool:
            return await call_status(api, call["id"]) == "ended"

        await wait_for(ended, "the call to be ended after reconnect", 15)
        data = await api.ok("GET", f"/calls/{call['id']}")
        assert data["end_reason"] == "caller hung up"
        (ended_event,) = [e for e in data["events"] if e["type"] == "call.ended"]
        assert "disconnected" in ended_event["cause_text"]
        # Its media channel, which nothing in Asterisk would ever hang up, is gone too.
        _, channels = asterisk_lab.ari("GET", "/channels")
        assert not [c for c in channels if data["channel_id"] in c["id"]], channels


async def test_daemon_restart_resumes_active_and_bridged_calls(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    daemon, api = await start_daemon(asterisk_lab, tmp_path)
    async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
        uas = SippUas("uas_answer.xml", rtp_port=dest_rtp.port)
        await uas.start()
        await setup_directory(api, uas, auth=False)
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=60000)
        await caller.start()
        try:
            call = await active_call(api)
            await heard_speech(caller_rtp, since=0)

            # The daemon stops (crash, upgrade): the caller stays in Asterisk meanwhile.
            await api.close()
            await daemon.stop()
            daemon, api = await start_daemon(asterisk_lab, tmp_path)

            # The same call is picked up: media re-attached, commands work.
            assert await call_status(api, call["id"]) == "active"
            t0 = asyncio.get_running_loop().time()
            await api.ok(
                "POST", f"/calls/{call['id']}/control", {"type": "say", "message": "I'm back."}
            )
            await heard_speech(caller_rtp, since=t0)
            await api.ok(
                "POST",
                f"/calls/{call['id']}/control",
                {"type": "transfer", "destination": DESTINATION},
            )
            done = await transfer_settled(api, call["id"])
            assert done["transfers"][-1]["state"] == "bridged"

            # A bridged call survives a restart too, and its end is still handled.
            await api.close()
            await daemon.stop()
            daemon, api = await start_daemon(asterisk_lab, tmp_path)
            assert await call_status(api, call["id"]) == "transferred"
            # (The caller is not terminated first: SippCall.terminate() now hangs its channel
            # up, which would end the call before the end_call under test.)
            await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})

            async def ended() -> bool:
                return await call_status(api, call["id"]) == "ended"

            await wait_for(ended, "the call to end", 10)
            assert await asyncio.wait_for(caller.wait(), 10) == 0 and caller.got_bye()
            await asyncio.wait_for(uas.wait(), 10)
            assert uas.received_requests("BYE"), "the destination leg was not released"
        finally:
            await caller.terminate()
            await uas.stop()
            await api.close()
            await daemon.stop()


async def test_caller_leaving_while_the_daemon_is_down_leaves_nothing_behind(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    daemon, api = await start_daemon(asterisk_lab, tmp_path)
    async with RtpPeer() as caller_rtp:
        await setup_directory(api, None)
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=4000)
        await caller.start()
        call = await active_call(api)
        await heard_speech(caller_rtp, since=0)
        await api.close()
        await daemon.stop()
        await asyncio.wait_for(caller.wait(), 15)  # hangs up while no daemon runs
    daemon, api = await start_daemon(asterisk_lab, tmp_path)
    try:
        # The reconciler ends the call after the connect, in the background.
        async def ended() -> bool:
            return await call_status(api, call["id"]) == "ended"

        await wait_for(ended, "the reconciler to end the call", 15)
        data = await api.ok("GET", f"/calls/{call['id']}")
        assert data["end_reason"] == "channel gone while callbridge was disconnected"
        # The externalMedia channel of the old process is dropped: Asterisk would keep it.
        _, channels = asterisk_lab.ari("GET", "/channels")
        assert not [c for c in channels if data["channel_id"] in c["id"]], channels
        _, bridges = asterisk_lab.ari("GET", "/bridges")
        assert f"cb-{data['channel_id']}" not in {b["id"] for b in bridges}
    finally:
        await api.close()
        await daemon.stop()


def inject_failures(daemon: Any, failures: dict[tuple[str, str], Exception]) -> list[str]:
    """Make the daemon's ARI client fail the first request matching each (method, path
    prefix) with the given exception; returns the list of failures injected so far."""
    client = daemon.calls.pbx.ari
    real = client.request
    injected: list[str] = []

    async def request(method: str, path: str, **kwargs: Any) -> Any:
        for (m, prefix), exc in list(failures.items()):
            if m == method and path.startswith(prefix):
                del failures[(m, prefix)]
                injected.append(f"{method} {path}")
                raise exc
        return await real(method, path, **kwargs)

    client.request = request
    return injected


async def pjsip_endpoints(lab: Any) -> set[str]:
    status, endpoints = lab.ari("GET", "/endpoints/PJSIP")
    assert status == 200
    return {e["resource"] for e in endpoints}


async def test_one_failed_request_on_reconnect_does_not_leave_the_daemon_half_connected(
    asterisk_lab: Any, proxied: Any
) -> None:
    """An HTTP 500 on the first PUT after a reconnect and a timed-out `GET /channels`: the
    daemon still reconnects fully (health, call reconcile) and provisions its trunk again."""
    proxy, daemon, api = proxied
    async with RtpPeer() as caller_rtp:
        await setup_directory(api, None)
        trunk = await api.ok("POST", "/sip-trunks", {"name": "t", "host": "127.0.0.1"})
        endpoint = f"cb-trunk-{trunk['id']}"
        assert endpoint in await pjsip_endpoints(asterisk_lab)
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=3000)
        await caller.start()
        call = await active_call(api)
        # Answered before the cut (the caller's 3 s hold starts at the answer; a caller cut
        # off before it is the next test's case).
        await heard_speech(caller_rtp, since=0)
        proxy.cut()
        await wait_for(lambda: not daemon.calls.connected, "the daemon to see the drop", 5)
        injected = inject_failures(
            daemon,
            {
                ("PUT", "/asterisk/config/dynamic/"): AriError(500, "injected", "PUT", "/x"),
                ("GET", "/channels"): AriUnavailable("ARI GET /channels: TimeoutError()"),
            },
        )
        # Stands for an Asterisk restart: its memory objects are gone.
        status, _ = asterisk_lab.ari(
            "DELETE", f"/asterisk/config/dynamic/res_pjsip/endpoint/{endpoint}"
        )
        assert status == 204
        await asyncio.wait_for(caller.wait(), 15)  # hangs up while we are disconnected
        proxy.restore()

        async def healthy() -> bool:
            status, health = await api.request("GET", "/health")
            return status == 200 and health["pbx_connected"] is True

        await wait_for(healthy, "/health to say connected", 15)
        assert len(injected) == 2, injected

        async def ended() -> bool:
            return await call_status(api, call["id"]) == "ended"

        await wait_for(ended, "the call that ended meanwhile to be reconciled", 15)

        async def provisioned() -> bool:
            return endpoint in await pjsip_endpoints(asterisk_lab)

        await wait_for(provisioned, "the trunk to be provisioned again", 15)


async def test_a_caller_arriving_as_ari_drops_is_answered_after_the_reconnect(
    asterisk_lab: Any, proxied: Any
) -> None:
    """The daemon takes the caller, then ARI drops before the answer: the caller still rings
    in Asterisk, so the call waits and is answered and greeted after the reconnect (it was
    recorded ended, "internal error", and the caller left ringing in Stasis)."""
    proxy, daemon, api = proxied
    reached, release = faults.hold("before_answer")
    try:
        async with RtpPeer() as caller_rtp:
            await setup_directory(api, None)
            caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=30000)
            await caller.start()
            await asyncio.wait_for(reached.wait(), 15)
            proxy.cut()
            await wait_for(lambda: not daemon.calls.connected, "the daemon to see the drop", 5)
            release.set()
            call = await active_call(api)

            async def waiting() -> bool:
                data = await api.ok("GET", f"/calls/{call['id']}")
                return "call.answer_waiting" in [e["type"] for e in data["events"]]

            await wait_for(waiting, "the answer to wait for the PBX")
            assert caller_rtp.loud_since(0) is None  # not answered, not greeted yet
            proxy.restore()
            await heard_speech(caller_rtp, since=0)  # answered and greeted after it
            data = await api.ok("GET", f"/calls/{call['id']}")
            assert data["status"] == "active" and data["answered_at"] is not None, data
            (only,) = (await api.ok("GET", "/calls"))["data"]  # one record for the caller
            assert only["id"] == call["id"]
            _, channels = asterisk_lab.ari("GET", "/channels")
            (channel,) = [c for c in channels if c["id"] == data["channel_id"]]
            assert channel["state"] == "Up"
            await caller.terminate()
    finally:
        faults.disarm()


async def test_trunks_deleted_while_disconnected_are_removed_on_reconnect(
    asterisk_lab: Any, proxied: Any
) -> None:
    proxy, daemon, api = proxied
    kept = await api.ok("POST", "/sip-trunks", {"name": "kept", "host": "127.0.0.1"})
    gone = await api.ok("POST", "/sip-trunks", {"name": "gone", "host": "127.0.0.2"})
    kept_ep, gone_ep = f"cb-trunk-{kept['id']}", f"cb-trunk-{gone['id']}"
    assert {kept_ep, gone_ep} <= await pjsip_endpoints(asterisk_lab)
    proxy.cut()
    await wait_for(lambda: not daemon.calls.connected, "the daemon to see the drop", 5)
    status, _ = await api.request("DELETE", f"/sip-trunks/{gone['id']}")
    assert status == 204
    assert gone_ep in await pjsip_endpoints(asterisk_lab)  # Asterisk could not be told
    proxy.restore()

    async def removed() -> bool:
        return gone_ep not in await pjsip_endpoints(asterisk_lab)

    await wait_for(removed, "the deleted trunk to be removed from Asterisk", 15)
    assert kept_ep in await pjsip_endpoints(asterisk_lab)
    assert "Unable to find object" in asterisk_lab.cli(f"pjsip show aor {gone_ep}")


def uas_sent(uas: SippUas, status: int) -> bool:
    return any(
        m.direction == "sent" and m.status_code == status and m.cseq_method == "INVITE"
        for m in uas.messages()
    )


async def test_a_destination_answering_during_an_ari_outage_is_bridged_after_it(
    asterisk_lab: Any, proxied: Any
) -> None:
    """The leg is created in our application before it rings, so its answer during the
    outage does not hang it up (an originate with `app=` entered Stasis only at the answer:
    Asterisk hung the destination up 2 ms after its 200 OK)."""
    proxy, _, api = proxied
    async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
        uas = SippUas("uas_answer.xml", rtp_port=dest_rtp.port, ring_ms=2000)
        await uas.start()
        await setup_directory(api, uas, auth=False)
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=60000)
        await caller.start()
        try:
            call = await active_call(api)
            await heard_speech(caller_rtp, since=0)
            await api.ok(
                "POST",
                f"/calls/{call['id']}/control",
                {"type": "transfer", "destination": DESTINATION, "ring_timeout": 20},
            )

            async def ringing() -> bool:
                data = await api.ok("GET", f"/calls/{call['id']}")
                return bool(data["transfers"]) and data["transfers"][-1]["state"] == "ringing"

            await wait_for(ringing, "the destination to ring")
            proxy.cut()
            await wait_for(lambda: uas_sent(uas, 200), "the destination to answer", 10)
            await wait_for(lambda: uas.received_requests("ACK"), "the ACK of its 200 OK", 10)
            assert not uas.received_requests("BYE"), "the destination was hung up"
            proxy.restore()
            done = await transfer_settled(api, call["id"])
            transfer = done["transfers"][-1]
            assert (transfer["state"], transfer["outcome"]) == ("bridged", "answered"), transfer
            assert done["status"] == "transferred"
            # Caller and destination talk to each other through Asterisk.
            await caller_rtp.send_tone(440, 0.3)
            assert await dest_rtp.wait_for_packet(timeout=5), "no audio reached the destination"
            t0 = asyncio.get_running_loop().time()
            await asyncio.gather(caller_rtp.send_tone(440, 1.5), dest_rtp.send_tone(1000, 1.5))
            assert abs(dominant_frequency(dest_rtp.received_pcm(since=t0)) - 440) < 20
            assert abs(dominant_frequency(caller_rtp.received_pcm(since=t0)) - 1000) < 20
            assert not uas.received_requests("BYE")
            await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
            assert await asyncio.wait_for(caller.wait(), 10) == 0 and caller.got_bye()
            await asyncio.wait_for(uas.wait(), 10)
        finally:
            await caller.terminate()
            await uas.stop()


async def test_a_busy_during_an_ari_outage_is_reported_with_its_sip_code_after_it(
    asterisk_lab: Any, proxied: Any
) -> None:
    """The leg's hangup handler records how it ended; the adapter reads it after the
    reconnect and reports the real 486 (it used to be `failed`, no code)."""
    proxy, _, api = proxied
    async with RtpPeer() as caller_rtp:
        uas = SippUas("uas_ring_then_busy.xml", ring_ms=2000)
        await uas.start()
        await setup_directory(api, uas, auth=False)
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=60000)
        await caller.start()
        try:
            call = await active_call(api)
            await heard_speech(caller_rtp, since=0)
            await api.ok(
                "POST",
                f"/calls/{call['id']}/control",
                {"type": "transfer", "destination": DESTINATION, "ring_timeout": 20},
            )

            async def ringing() -> bool:
                data = await api.ok("GET", f"/calls/{call['id']}")
                return bool(data["transfers"]) and data["transfers"][-1]["state"] == "ringing"

            await wait_for(ringing, "the destination to ring")
            proxy.cut()
            await wait_for(lambda: uas.received_requests("ACK"), "the busy to be acknowledged", 10)
            proxy.restore()
            done = await transfer_settled(api, call["id"])
            transfer = done["transfers"][-1]
            assert (transfer["state"], transfer["outcome"], transfer["sip_code"]) == (
                "failed",
                "busy",
                486,
            ), transfer
            assert done["status"] == "active"
            # Nothing of the leg is left in Asterisk (its record is read and cleared).
            (dialing,) = [e for e in done["events"] if e["type"] == "transfer.dialing"]
            leg = f"CALLBRIDGE_LEG_{dialing['leg']}"
            assert asterisk_lab.ari("GET", "/asterisk/variable", {"variable": leg}) == (
                200,
                {"value": ""},
            )
            await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
            assert await asyncio.wait_for(caller.wait(), 10) == 0 and caller.got_bye()
        finally:
            await caller.terminate()
            await uas.stop()


async def test_a_caller_the_hung_daemon_does_not_take_reaches_the_fallback_within_the_guard(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    """The daemon stays connected but handles no event (as when stopped or starved): the
    dialplan's take guard sends the caller to [callbridge-fallback] after 1 s instead of
    leaving it in Stasis, and the daemon, once it runs again, leaves that caller alone."""
    daemon, api = await start_daemon(asterisk_lab, tmp_path)
    client = daemon.calls.pbx.ari
    gate = asyncio.Event()
    real_dispatch = client._dispatch
    handled: list[str] = []

    async def hung_dispatch(raw: str, on_event: Any) -> None:
        await gate.wait()
        await real_dispatch(raw, on_event)
        handled.append(json.loads(raw)["type"])

    client._dispatch = hung_dispatch
    try:
        async with RtpPeer() as caller_rtp:
            await setup_directory(api, None)
            caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=30000)
            t0 = asyncio.get_running_loop().time()
            await caller.start()
            # The fallback answers and announces (ss-noservice), within the 1 s guard plus
            # the fallback's own Answer() pause and call set-up.
            await heard_speech(caller_rtp, since=t0)
            first = next(
                p.arrival for p in caller_rtp.packets if p.arrival >= t0 and p.payload_type == 0
            )
            assert first - t0 < 2.5, f"the caller waited {first - t0:.1f} s"
            _, channels = asterisk_lab.ari("GET", "/channels")
            (channel,) = [c for c in channels if c["id"].startswith("lab-")]
            assert channel["dialplan"]["context"] == "callbridge-fallback", channel
            gate.set()  # the daemon runs again and sees the StasisStart/StasisEnd it missed

            await wait_for(lambda: "StasisEnd" in handled, "the daemon to catch up")
            # It did not take the caller back, and it recorded why (no caller goes unseen);
            # the fallback ends the call.
            await assert_recorded_as_missed(api)
            await asyncio.wait_for(caller.wait(), 20)
            assert caller.got_bye()
    finally:
        gate.set()
        await api.close()
        await daemon.stop()


async def assert_recorded_as_missed(api: Any) -> None:
    """The only call record is the caller the take guard sent to the fallback, ended."""
    (call,) = (await api.ok("GET", "/calls"))["data"]
    assert call["status"] == "ended", call
    assert call["end_reason"] == (
        "not taken within the PBX's take guard: sent to the dialplan fallback"
    ), call


def log_sink(path: Path) -> IO[bytes]:
    return open(path, "wb")  # the daemon's stderr, read back by the test


async def test_a_sigstopped_callbridge_process_leaves_new_callers_to_the_fallback(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    """`callbridge run` is stopped (SIGSTOP) with its ARI websocket open: a new caller reaches
    [callbridge-fallback] within the 1 s take guard instead of waiting in Stasis; once the
    process runs again (SIGCONT) it leaves that caller where it is."""
    port = free_port(kind=socket.SOCK_STREAM)
    env = {
        **os.environ,
        "CALLBRIDGE_DATABASE": str(tmp_path / "cb.sqlite3"),
        "CALLBRIDGE_API__PORT": str(port),
        "CALLBRIDGE_ARI__URL": asterisk_lab.ari_url,
        "CALLBRIDGE_ARI__USERNAME": asterisk_lab.ari_username,
        "CALLBRIDGE_ARI__PASSWORD": asterisk_lab.ari_password,
        "CALLBRIDGE_LOG_FORMAT": "json",
        "CALLBRIDGE_AGENT__ENABLED": "false",  # greet only: no models to load
    }
    create = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "api-key", "create", "--name", "t",
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    key = (await create.communicate())[0].decode().strip()
    log_path = tmp_path / "daemon.log"
    with log_sink(log_path) as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "run", env=env, stderr=log_file,
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    api = Api(f"http://127.0.0.1:{port}", key)
    try:

        async def healthy() -> bool:
            try:
                status, health = await api.request("GET", "/health")
            except aiohttp.ClientError:
                return False
            return status == 200 and health["pbx_connected"] is True

        await wait_for(healthy, "the daemon to serve and connect", 20)
        await setup_directory(api, None)
        proc.send_signal(signal.SIGSTOP)
        async with RtpPeer() as caller_rtp:
            caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=30000)
            t0 = asyncio.get_running_loop().time()
            await caller.start()
            await heard_speech(caller_rtp, since=t0)  # the fallback's ss-noservice
            first = next(
                p.arrival for p in caller_rtp.packets if p.arrival >= t0 and p.payload_type == 0
            )
            assert first - t0 < 2.5, f"the caller waited {first - t0:.1f} s"
            _, channels = asterisk_lab.ari("GET", "/channels")
            (channel,) = [c for c in channels if c["id"].startswith("lab-")]
            assert channel["dialplan"]["context"] == "callbridge-fallback", channel
            proc.send_signal(signal.SIGCONT)

            def let_go() -> bool:
                return b"asterisk.caller_not_taken_in_time" in log_path.read_bytes()

            await wait_for(let_go, "the woken daemon to leave the caller alone", 15)
            await assert_recorded_as_missed(api)
            await asyncio.wait_for(caller.wait(), 20)
            assert caller.got_bye()  # the fallback's announcement ended the call
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await api.close()
