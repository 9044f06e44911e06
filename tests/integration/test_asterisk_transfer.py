"""The foundation's whole flow on a real Asterisk, real SIPp peers and real RTP audio.

A SIPp caller dials a number; callbridge attaches through Stasis, answers and greets with
flite speech; the control API transfers the call through the number's SIP trunk to a SIPp UAS
(which challenges with digest auth), and caller and destination are bridged with audio both
ways. Busy and no-answer leave the caller with the assistant, outcome recorded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bridge.lab.rtp import RtpPeer, dominant_frequency, rms
from bridge.lab.sipp import SippCall, SippUas
from tests.support.daemon import Api, start_daemon, wait_for

pytestmark = pytest.mark.asterisk

DID = "+31201234567"
DESTINATION = "+31612345678"


async def setup_directory(api: Api, uas: SippUas | None, *, auth: bool = True) -> dict[str, Any]:
    """The seed's set-up: an assistant, a trunk (at the UAS) and a number routed through it."""
    assistant = await api.ok(
        "POST",
        "/assistants",
        {
            "name": "Support Assistant",
            "first_message": "Welcome to Acme support, how can I help you?",
            "llm_config": {
                "provider": "local",
                "messages": [{"role": "system", "content": "You are a support agent for Acme."}],
                "tools": [
                    {
                        "type": "transfer_call",
                        "destinations": [
                            {
                                "type": "number",
                                "number": DESTINATION,
                                "description": "Human support for complex issues",
                                "message": "I'm transferring you, one moment please.",
                            }
                        ],
                    },
                    {"type": "end_call"},
                ],
            },
        },
    )
    number = await api.ok("POST", "/numbers", {"number": DID, "assistant_id": assistant["id"]})
    trunk = None
    if uas is not None:
        body: dict[str, Any] = {"name": "Office PBX", "host": "127.0.0.1", "port": uas.local_port}
        if auth:
            body |= {"username": "hms-sovereign", "password": "secure-password"}
        trunk = await api.ok("POST", "/sip-trunks", body)
        await api.ok("PATCH", f"/numbers/{number['id']}", {"transfer_trunk_id": trunk["id"]})
    return {"assistant": assistant, "number": number, "trunk": trunk}


async def active_call(api: Api) -> dict[str, Any]:
    async def find() -> dict[str, Any] | None:
        calls = (await api.ok("GET", "/calls?status=active"))["data"]
        return calls[0] if calls else None

    return await wait_for(find, "an active call")


async def transfer_settled(api: Api, call_id: str, timeout: float = 30) -> dict[str, Any]:
    async def settled() -> dict[str, Any] | None:
        call = await api.ok("GET", f"/calls/{call_id}")
        transfers = call["transfers"]
        if transfers and transfers[-1]["state"] in ("bridged", "failed", "cancelled", "handed_off"):
            return call
        return None

    return await wait_for(settled, "the transfer to settle", timeout=timeout)


async def heard_speech(peer: RtpPeer, since: float, seconds: float = 10) -> bool:
    """True once the peer has received at least 0.5 s of clearly non-silent audio."""

    async def loud() -> bool:
        pcm = peer.received_pcm(since=since)
        return len(pcm) >= 8000 and rms(pcm) > 300

    return await wait_for(loud, "non-silent audio at the caller", timeout=seconds)


@pytest.fixture
async def daemon_api(asterisk_lab: Any, tmp_path: Path):
    daemon, api = await start_daemon(asterisk_lab, tmp_path)
    try:
        yield daemon, api
    finally:
        await api.close()
        await daemon.stop()


async def test_greeting_then_api_transfer_through_trunk_bridges_both_ways(
    asterisk_lab: Any, daemon_api: Any
) -> None:
    _, api = daemon_api
    async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
        uas = SippUas.for_lab(
            asterisk_lab,
            "uas_answer_auth.xml",
            rtp_port=dest_rtp.port,
            keys={"auth_user": "hms-sovereign", "auth_pass": "secure-password"},
        )
        await uas.start()
        await setup_directory(api, uas)
        # The caller hangs up (BYE) 20 s after answer: after greeting, transfer and tones.
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=20000)
        await caller.start()
        try:
            call = await active_call(api)
            assert call["number"] == DID
            assert call["caller_number"] == "sipp-caller"
            # The greeting is real flite speech arriving as RTP at the SIPp caller's media port.
            await heard_speech(caller_rtp, since=0)

            status, accepted = await api.request(
                "POST",
                f"/calls/{call['id']}/control",
                {
                    "type": "transfer",
                    "destination": DESTINATION,
                    "message": "One moment, I'm transferring you to a colleague.",
                },
            )
            assert status == 202, accepted
            assert accepted["accepted"] == "transfer"

            done = await transfer_settled(api, call["id"])
            transfer = done["transfers"][-1]
            assert transfer["state"] == "bridged", transfer
            assert transfer["outcome"] == "answered"
            assert [h["state"] for h in transfer["history"]][:2] == ["announcing", "dialing"]
            assert done["status"] == "transferred"

            # The UAS behind the trunk got an INVITE for the destination, and (the scenario
            # verifies the digest) answered only after valid trunk credentials.
            invites = uas.received_requests("INVITE")
            assert DESTINATION in (invites[0].request_uri or "")
            authorized = [m.header("Authorization") for m in invites[1:]]
            assert any(a and 'username="hms-sovereign"' in a for a in authorized), invites
            assert any(
                m.direction == "sent" and m.status_code == 200 and m.cseq_method == "INVITE"
                for m in uas.messages()
            ), "the UAS never accepted the authenticated INVITE"

            # Caller and destination are bridged: audio flows both ways through Asterisk.
            await dest_rtp.wait_for_packet(timeout=5)
            t0 = asyncio.get_running_loop().time()
            await asyncio.gather(caller_rtp.send_tone(440, 1.5), dest_rtp.send_tone(1000, 1.5))
            heard_by_dest = dest_rtp.received_pcm(since=t0)
            heard_by_caller = caller_rtp.received_pcm(since=t0)
            assert abs(dominant_frequency(heard_by_dest) - 440) < 20
            assert abs(dominant_frequency(heard_by_caller) - 1000) < 20
            assert await asyncio.wait_for(caller.wait(), 30) == 0
            assert not caller.got_bye(), "the caller, not callbridge, ends this call"
            await asyncio.wait_for(uas.wait(), 10)  # the destination got its BYE
            assert uas.received_requests("BYE")
        finally:
            await caller.terminate()
            await uas.stop()

        # The caller hung up: the destination is released and the call is recorded as ended.
        async def ended() -> dict[str, Any] | None:
            data = await api.ok("GET", f"/calls/{call['id']}")
            return data if data["status"] == "ended" else None

        final = await wait_for(ended, "the call to end")
        kinds = [e["type"] for e in final["events"]]
        for kind in ("call.started", "call.answered", "transfer.requested", "transfer.completed"):
            assert kind in kinds, kinds
        assert final["end_reason"] == "caller hung up"


@pytest.mark.parametrize(
    ("scenario", "outcome", "sip_code"),
    [("uas_busy.xml", "busy", 486), ("uas_noanswer.xml", "no_answer", None)],
)
async def test_failed_transfer_keeps_caller_with_assistant(
    asterisk_lab: Any, daemon_api: Any, scenario: str, outcome: str, sip_code: int | None
) -> None:
    _, api = daemon_api
    async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
        uas = SippUas.for_lab(asterisk_lab, scenario, rtp_port=dest_rtp.port)
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
                {"type": "transfer", "destination": DESTINATION, "ring_timeout": 3},
            )
            done = await transfer_settled(api, call["id"])
            transfer = done["transfers"][-1]
            assert transfer["state"] == "failed", transfer
            assert transfer["outcome"] == outcome
            if sip_code is not None and transfer["sip_code"] is not None:
                assert transfer["sip_code"] == sip_code
            assert done["status"] == "active"
            # The caller is still connected and hears the assistant explain.
            t0 = asyncio.get_running_loop().time()
            await heard_speech(caller_rtp, since=t0)
            assert caller.proc is not None and caller.proc.returncode is None
            assert not caller.got_bye()
            # And the call can still be controlled: end it with a goodbye.
            await api.ok(
                "POST", f"/calls/{call['id']}/control", {"type": "end_call", "message": "Goodbye."}
            )
            await asyncio.wait_for(caller.wait(), 15)
            assert caller.got_bye()
        finally:
            await caller.terminate()
            await uas.stop()
