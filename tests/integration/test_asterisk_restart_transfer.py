"""A daemon restart while a transfer rings, on the real Asterisk (issue 7, section 3): the new
process stops the ringback its predecessor started (the playback id is derived from the
transfer), settles the transfer, and the caller is back with the assistant, never left on
endless ringback nor adopted as a second call."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bridge import faults
from bridge.lab.rtp import RtpPeer
from bridge.lab.sipp import SippCall, SippUas
from tests.support.daemon import start_daemon, wait_for
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


async def test_restart_while_the_destination_rings_stops_the_ringback(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    daemon, api = await start_daemon(asterisk_lab, tmp_path)
    async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
        uas = SippUas("uas_noanswer.xml", rtp_port=dest_rtp.port)
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
                {"type": "transfer", "destination": DESTINATION, "ring_timeout": 6},
            )

            async def ringing() -> dict[str, Any] | None:
                data = await api.ok("GET", f"/calls/{call['id']}")
                last = data["transfers"][-1] if data["transfers"] else None
                return last if last and last["state"] == "ringing" else None

            transfer = await wait_for(ringing, "the destination to ring")
            playback = f"cbring-{transfer['id']}"
            status, _ = asterisk_lab.ari("GET", f"/playbacks/{playback}")
            assert status == 200  # the ringback plays under the derived id

            # The daemon stops while the destination rings; a new one takes over.
            await api.close()
            await daemon.stop()
            daemon, api = await start_daemon(asterisk_lab, tmp_path)

            done = await transfer_settled(api, call["id"])
            last = done["transfers"][-1]
            assert (last["state"], last["outcome"]) == ("failed", "no_answer"), last
            assert done["status"] == "active"
            # The predecessor's ringback is stopped by the new process...
            await wait_for(
                lambda: asterisk_lab.ari("GET", f"/playbacks/{playback}")[0] == 404,
                "the ringback to stop",
            )
            # ... and the caller is back with the assistant, which speaks and is controllable.
            t0 = asyncio.get_running_loop().time()
            await heard_speech(caller_rtp, since=t0)
            calls = (await api.ok("GET", "/calls"))["data"]
            assert [c["id"] for c in calls] == [call["id"]]  # never adopted as a second call
            await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
            assert await asyncio.wait_for(caller.wait(), 10) == 0 and caller.got_bye()
        finally:
            await caller.terminate()
            await uas.stop()
            await api.close()
            await daemon.stop()


@pytest.mark.parametrize("how", ["end_call", "caller_hangup"])
async def test_ending_the_call_while_the_destination_rings_cancels_it_at_once(
    asterisk_lab: Any, tmp_path: Path, how: str
) -> None:
    daemon, api = await start_daemon(asterisk_lab, tmp_path)
    async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
        uas = SippUas("uas_noanswer.xml", rtp_port=dest_rtp.port)
        await uas.start()
        await setup_directory(api, uas, auth=False)
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=60000)
        await caller.start()
        try:
            call = await active_call(api)
            # The ring timeout is long: only our hang-up can stop the destination ringing.
            await api.ok(
                "POST",
                f"/calls/{call['id']}/control",
                {"type": "transfer", "destination": DESTINATION, "ring_timeout": 120},
            )
            await wait_for(lambda: uas.received_requests("INVITE"), "the destination to ring")
            if how == "end_call":
                await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
            else:  # the caller hangs up (from Asterisk's side: deterministic timing)
                status, _ = asterisk_lab.ari("DELETE", f"/channels/{call['channel_id']}")
                assert status == 204
            await wait_for(
                lambda: uas.received_requests("CANCEL"), "the leg to be cancelled", timeout=5
            )
            done = await transfer_settled(api, call["id"])
            last = done["transfers"][-1]
            assert (done["status"], last["state"], last["outcome"]) == (
                "ended",
                "cancelled",
                "cancelled",
            )
            stats = await api.ok("GET", "/transfers/stats")
            assert (stats["by_outcome"], stats["in_progress"]) == ({"cancelled": 1}, 0)
        finally:
            await caller.terminate()
            await uas.stop()
            await api.close()
            await daemon.stop()


async def test_a_transfer_asked_while_ari_is_down_is_placed_when_it_is_back(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    proxy = await TcpProxy("127.0.0.1", asterisk_lab.http_port).start()
    daemon, api = await start_daemon(asterisk_lab, tmp_path, ari_url=proxy.url)
    async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
        uas = SippUas("uas_answer.xml", rtp_port=dest_rtp.port)
        await uas.start()
        await setup_directory(api, uas, auth=False)
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=60000)
        await caller.start()
        try:
            call = await active_call(api)
            await heard_speech(caller_rtp, since=0)  # media attached, greeting played
            proxy.cut()
            await wait_for(lambda: not daemon.calls.connected, "the daemon to see the drop", 5)
            await api.ok(
                "POST",
                f"/calls/{call['id']}/control",
                {"type": "transfer", "destination": DESTINATION, "ring_timeout": 30},
            )

            async def waiting() -> bool:
                data = await api.ok("GET", f"/calls/{call['id']}")
                return "transfer.pbx_unavailable" in [e["type"] for e in data["events"]]

            await wait_for(waiting, "the transfer to wait for the PBX")
            data = await api.ok("GET", f"/calls/{call['id']}")
            assert data["transfers"][-1]["state"] == "dialing"  # not failed, not blamed
            proxy.restore()
            done = await transfer_settled(api, call["id"])
            last = done["transfers"][-1]
            assert (done["status"], last["state"], last["outcome"]) == (
                "transferred",
                "bridged",
                "answered",
            )
            assert len(uas.received_requests("INVITE")) == 1
            await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
            assert await asyncio.wait_for(caller.wait(), 10) == 0 and caller.got_bye()
        finally:
            await caller.terminate()
            await uas.stop()
            await api.close()
            await daemon.stop()
            await proxy.close()


# --- the daemon dies at each point of placing the leg (issue 7 section 3, issue 8 section 4) -
#
# In-process, "dying" at a point (bridge.faults) stops the coroutine there for good; the call
# service is then stopped (ARI connection closed, nothing else sent) and a new daemon starts
# on the same database. The destination must be INVITEd exactly once, and the caller must
# not be left on ringback: bridged, or back with the assistant with the attempt recorded.


@pytest.mark.parametrize(
    ("point", "message", "scenario", "expect", "invites"),
    [
        # A message recorded the request first; the leg was never created: dialled now.
        ("before_originate", "One moment please.", "uas_answer.xml", "bridged", 1),
        # One request created and dialled the leg (there is no undialled leg any more); our
        # application was not subscribed to it yet: the leg is adopted, not dialled again.
        ("before_subscribe", "One moment please.", "uas_answer.xml", "bridged", 1),
        # ... and its events reach the new daemon (it subscribes again at the reconnect):
        # the 486 that comes while it rings is the transfer's outcome.
        ("before_subscribe", "One moment please.", "uas_ring_then_busy.xml", "busy", 1),
        # Dialled, the record says only "requested": the leg is adopted, not dialled again.
        ("after_originate", "One moment please.", "uas_answer.xml", "bridged", 1),
        # No message: the originate goes first and the record is written during its round
        # trip (the POST's 202 once it is durable): the leg is adopted after the restart.
        ("before_subscribe", None, "uas_answer.xml", "bridged", 1),
        ("after_originate", None, "uas_answer.xml", "bridged", 1),
        # The daemon dies with the leg placed and nothing recorded (the POST never answered):
        # the leg nobody recorded is hung up (a CANCEL), the attempt recorded from its
        # CALLBRIDGE_* variables, and the caller stays with the assistant.
        ("before_record", None, "uas_noanswer.xml", "abandoned", 1),
    ],
)
async def test_daemon_dying_while_placing_the_leg_never_dials_twice_nor_strands_the_caller(
    asterisk_lab: Any,
    tmp_path: Path,
    point: str,
    message: str | None,
    scenario: str,
    expect: str,
    invites: int,
) -> None:
    daemon, api = await start_daemon(asterisk_lab, tmp_path)
    async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
        # Busy: it rings long enough for the new daemon to be there when the 486 comes.
        ring_ms = 8000 if expect == "busy" else 1000
        uas = SippUas(scenario, rtp_port=dest_rtp.port, ring_ms=ring_ms)
        await uas.start()
        await setup_directory(api, uas, auth=False)
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=60000)
        await caller.start()
        try:
            call = await active_call(api)
            await heard_speech(caller_rtp, since=0)
            reached = faults.arm(point)
            body: dict[str, Any] = {"type": "transfer", "destination": DESTINATION}
            if message:
                body["message"] = message
            post = asyncio.create_task(api.request("POST", f"/calls/{call['id']}/control", body))
            await asyncio.wait_for(reached.wait(), 15)
            if point == "before_originate":
                assert uas.received_requests("INVITE") == []  # nothing was dialled
            else:
                await wait_for(lambda: uas.invite is not None, "the INVITE at the destination")
            recorded = point != "before_record"
            if recorded:  # the 202 comes once the transfer is on record, not after the PBX
                status, body = await asyncio.wait_for(post, 5)
                assert status == 202, body
                assert body["state"] == ("announcing" if message else "dialing"), body
            # The daemon "dies" here: its sessions stop where they are, ARI is closed.
            assert daemon.calls is not None
            await daemon.calls.stop()
            status, _ = await asyncio.wait_for(post, 5)  # answered, never left hanging
            assert status == (202 if recorded else 409)
            await api.close()
            await daemon.stop()
            daemon, api = await start_daemon(asterisk_lab, tmp_path)

            if expect == "bridged":
                done = await transfer_settled(api, call["id"])
                last = done["transfers"][-1]
                assert (done["status"], last["state"], last["outcome"]) == (
                    "transferred",
                    "bridged",
                    "answered",
                ), last
            elif expect == "busy":
                done = await transfer_settled(api, call["id"])
                last = done["transfers"][-1]
                assert (done["status"], last["state"], last["outcome"], last["sip_code"]) == (
                    "active",
                    "failed",
                    "busy",
                    486,
                ), last
                t0 = asyncio.get_running_loop().time()
                await heard_speech(caller_rtp, since=t0)  # the assistant is back
            else:
                if invites:
                    await wait_for(
                        lambda: uas.received_requests("CANCEL"), "the unrecorded leg cancelled"
                    )

                async def abandoned() -> dict[str, Any] | None:
                    data = await api.ok("GET", f"/calls/{call['id']}")
                    kinds = [e["type"] for e in data["events"]]
                    return data if "transfer.abandoned" in kinds else None

                data = await wait_for(abandoned, "the attempt recorded")
                assert data["status"] == "active" and data["transfers"] == []
                t0 = asyncio.get_running_loop().time()
                await heard_speech(caller_rtp, since=t0)  # the assistant is back
            assert len(uas.received_requests("INVITE")) == invites  # never twice
            calls = (await api.ok("GET", "/calls"))["data"]
            assert [c["id"] for c in calls] == [call["id"]]
            await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
            assert await asyncio.wait_for(caller.wait(), 10) == 0 and caller.got_bye()
        finally:
            faults.disarm()
            await caller.terminate()
            await uas.stop()
            await api.close()
            await daemon.stop()
