"""Destinations inside the PBX (issue 9 §1) on the real Asterisk, with SIPp and real audio.

Each test makes its own extension (a PJSIP endpoint `lab-<n>` whose AOR is its own SIPp UAS,
through ARI's dynamic configuration): an extension destination (`PJSIP/lab-<n>`), a dialplan
target (`<n>@lab-extensions`, whose Dial reaches it) and a queue (`lab-support`, the extension
added as its member) are each bridged with audio both ways; a blind transfer to a dialplan
target; and the policy refusing an internal destination that is not configured, whatever
`allow_any` says."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.lab.rtp import RtpPacket, RtpPeer, dominant_frequency
from bridge.lab.sipp import SippCall, SippUas
from tests.support.daemon import Api, start_daemon, wait_for
from tests.support.flows import (
    DID,
    active_call,
    heard_speech,
    pjsip_extension,
    transfer_settled,
)

pytestmark = pytest.mark.asterisk

EXT = ""  # each test's own lab extension (endpoint lab-<EXT>), set by the `api` fixture


def destinations() -> list[dict[str, str]]:
    return [
        {"type": "extension", "extension": f"lab-{EXT}", "description": "Alice's desk phone"},
        {"type": "dialplan", "context": "lab-extensions", "extension": EXT, "description": "Sales"},
        {"type": "queue", "queue": "lab-support", "description": "The support queue"},
    ]


@contextlib.contextmanager
def lab_extension(lab: Any, uas: SippUas) -> Iterator[str]:
    """Endpoint `lab-<EXT>` with an AOR at `uas`, and it as the lab queue's member."""
    with pjsip_extension(lab, f"lab-{EXT}", uas.local_port) as name:
        lab.cli(f"queue add member PJSIP/{name} to lab-support")
        try:
            yield name
        finally:
            lab.cli(f"queue remove member PJSIP/{name} from lab-support")


@pytest.fixture
async def api(asterisk_lab: Any, tmp_path: Path) -> AsyncIterator[Api]:
    # allow_any is on: internal destinations must still be configured on the assistant.
    global EXT
    EXT = str(random.randrange(1000, 9999))  # never the previous test's extension
    daemon, client = await start_daemon(asterisk_lab, tmp_path, transfer={"allow_any": True})
    try:
        assistant = await client.ok(
            "POST",
            "/assistants",
            {
                "name": "Front desk",
                "first_message": "Welcome to Acme, how can I help you?",
                "llm_config": {
                    "tools": [{"type": "transfer_call", "destinations": destinations()}],
                },
            },
        )
        await client.ok("POST", "/numbers", {"number": DID, "assistant_id": assistant["id"]})
        yield client
    finally:
        await client.close()
        await daemon.stop()


async def bridged_with_audio(
    asterisk_lab: Any,
    api: Api,
    destination: str,
    uas_scenario: str = "uas_answer.xml",
    summary: str | None = None,
    dest_packets: list[RtpPacket] | None = None,
) -> tuple[dict[str, Any], SippUas]:
    """Call in, transfer to `destination`, check the bridge carries audio both ways."""
    async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
        uas = SippUas(uas_scenario, rtp_port=dest_rtp.port)
        await uas.start()
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=60000)
        await caller.start()
        extension = contextlib.ExitStack()
        try:
            extension.enter_context(lab_extension(asterisk_lab, uas))
            call = await active_call(api)
            await heard_speech(caller_rtp, since=0)
            await api.ok(
                "POST",
                f"/calls/{call['id']}/control",
                {
                    "type": "transfer",
                    "destination": destination,
                    "ring_timeout": 15,
                    **({"summary": summary} if summary else {}),
                },
            )
            done = await transfer_settled(api, call["id"])
            transfer = done["transfers"][-1]
            assert (transfer["state"], transfer["outcome"]) == ("bridged", "answered"), transfer
            assert transfer["destination"] == destination
            if dest_packets is not None:  # what the destination got up to the bridge
                dest_packets.extend(dest_rtp.packets)
            # Both sides talk continuously, as phones do (RTP with no gaps in its clock), until
            # each has heard the other for a second.
            talking = asyncio.create_task(caller_rtp.send_tone(440, 30.0))
            try:
                assert await dest_rtp.wait_for_packet(timeout=5), "no audio at the destination"
                answering = asyncio.create_task(dest_rtp.send_tone(1000, 30.0))
                try:
                    t0 = asyncio.get_running_loop().time()

                    def heard(peer: RtpPeer, hz: int) -> bool:
                        pcm = peer.received_pcm(since=t0)
                        return len(pcm) >= 16000 and abs(dominant_frequency(pcm[-16000:]) - hz) < 20

                    await wait_for(lambda: heard(dest_rtp, 440), "the caller at the destination")
                    await wait_for(lambda: heard(caller_rtp, 1000), "the destination at the caller")
                finally:
                    answering.cancel()
            finally:
                talking.cancel()
            await hang_up(api, call["id"], uas)
            return done, uas
        finally:
            await caller.terminate()
            await uas.stop()
            extension.close()


async def hang_up(api: Api, call_id: str, uas: SippUas) -> None:
    """End the call through the API and wait for the destination's BYE."""
    await api.ok("POST", f"/calls/{call_id}/control", {"type": "end_call"})
    await wait_for(lambda: uas.received_requests("BYE"), "the BYE at the destination", 10)


async def test_transfer_to_an_extension_bridges_with_context_on_the_invite(
    asterisk_lab: Any, api: Api
) -> None:
    """Issue 9 §6 too: the INVITE carries X-CallBridge-* headers (SIPp logs them) and the
    caller's CDR(userfield) records the outcome."""
    summary = "Caller wants a refund for order 1234"
    done, uas = await bridged_with_audio(asterisk_lab, api, f"extension:lab-{EXT}", summary=summary)
    transfer = done["transfers"][-1]
    assert transfer["route"] == f"extension lab-{EXT}" and transfer["summary"] == summary
    (invite, *_) = uas.received_requests("INVITE")
    assert (invite.request_uri or "").startswith(f"sip:{EXT}@"), invite.request_uri
    assert invite.header("X-CallBridge-Call-Id") == done["id"], invite
    assert invite.header("X-CallBridge-Transfer-Id") == transfer["id"]
    assert invite.header("X-CallBridge-Summary") == summary
    # The caller's CDR (the lab's CSV backend, written when the call ends) has the outcome.
    expected = f'"callbridge:answered:extension:lab-{EXT}"'
    await wait_for(lambda: expected in cdr_csv(asterisk_lab), "the outcome in the CDR", 10)


def cdr_csv(lab: Any) -> str:
    path = Path(lab.instance_dir) / "log" / "cdr-csv" / "Master.csv"
    return path.read_text(errors="replace") if path.exists() else ""


async def test_transfer_to_a_dialplan_target_bridges(asterisk_lab: Any, api: Api) -> None:
    done, uas = await bridged_with_audio(asterisk_lab, api, f"dialplan:{EXT}@lab-extensions")
    assert done["transfers"][-1]["route"] == f"dialplan {EXT}@lab-extensions"
    (invite, *_) = uas.received_requests("INVITE")
    assert (invite.request_uri or "").startswith(f"sip:{EXT}@"), invite.request_uri


async def test_transfer_to_a_queue_bridges_with_its_member(asterisk_lab: Any, api: Api) -> None:
    done, uas = await bridged_with_audio(asterisk_lab, api, "queue:lab-support")
    assert done["transfers"][-1]["route"] == "queue lab-support"
    assert uas.received_requests("INVITE"), "the queue never rang its member"


async def test_blind_transfer_to_a_dialplan_target(asterisk_lab: Any, api: Api) -> None:
    async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
        uas = SippUas("uas_answer.xml", rtp_port=dest_rtp.port)
        await uas.start()
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=10000)
        await caller.start()
        extension = contextlib.ExitStack()
        try:
            extension.enter_context(lab_extension(asterisk_lab, uas))
            call = await active_call(api)
            destination = f"dialplan:{EXT}@lab-extensions"
            await api.ok(
                "POST",
                f"/calls/{call['id']}/control",
                {"type": "transfer", "destination": destination, "mode": "blind"},
            )
            done = await transfer_settled(api, call["id"])
            assert done["transfers"][-1]["state"] == "handed_off"
            await wait_for(lambda: uas.received_requests("INVITE"), "the INVITE at the UAS", 10)
            await caller_rtp.send_tone(440, 0.3)
            assert await dest_rtp.wait_for_packet(timeout=5), "the PBX did not connect them"
            # The PBX has the call now: the caller's own BYE (after hold_ms) ends it.
            assert await asyncio.wait_for(caller.wait(), 20) == 0
            await wait_for(lambda: uas.received_requests("BYE"), "the BYE at the UAS", 10)
        finally:
            await caller.terminate()
            await uas.stop()
            extension.close()


async def test_unconfigured_internal_destination_is_refused(asterisk_lab: Any, api: Api) -> None:
    async with RtpPeer() as caller_rtp:
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=60000)
        await caller.start()
        try:
            call = await active_call(api)
            for other in ("extension:1001", "dialplan:601@lab-extensions", "queue:other"):
                status, body = await api.request(
                    "POST",
                    f"/calls/{call['id']}/control",
                    {"type": "transfer", "destination": other},
                )
                assert status == 403, body
                assert body["error"]["details"]["rule"] == "assistant.destinations"
            data = await api.ok("GET", f"/calls/{call['id']}")
            refused = [e for e in data["events"] if e["type"] == "transfer.refused"]
            assert len(refused) == 3 and data["transfers"] == []
        finally:
            await caller.terminate()


def rfc2833_digits(packets: list[RtpPacket]) -> str:
    """The digits of the RFC 2833 telephone-events (payload type 101, as the UAS's SDP
    offers it) in `packets`, in the order they began (one event per RTP timestamp)."""
    events: dict[int, tuple[float, int]] = {}
    for p in packets:
        if p.payload_type == 101 and len(p.payload) >= 4:
            events.setdefault(p.timestamp, (p.arrival, p.payload[0]))
    return "".join("0123456789*#ABCD"[event] for _, event in sorted(events.values()))


async def test_dtmf_after_answer_reaches_the_destination_before_the_bridge(
    asterisk_lab: Any, api: Api
) -> None:
    """Issue 9 §4: the extension's `dtmf` ("wwww12w34#") goes to the answered leg as RFC 2833
    telephone-events, all of them before the transfer is bridged; recorded as an event."""
    (assistant,) = (await api.ok("GET", "/assistants"))["data"]
    with_dtmf = [
        {**d, "dtmf": "wwww12w34#"} if d["type"] == "extension" else d for d in destinations()
    ]
    await api.ok(
        "PATCH",
        f"/assistants/{assistant['id']}",
        {"llm_config": {"tools": [{"type": "transfer_call", "destinations": with_dtmf}]}},
    )
    packets: list[RtpPacket] = []
    done, _uas = await bridged_with_audio(
        asterisk_lab, api, f"extension:lab-{EXT}", dest_packets=packets
    )
    assert rfc2833_digits(packets) == "1234#"
    kinds = [e["type"] for e in done["events"]]
    assert kinds.index("transfer.answered") < kinds.index("transfer.dtmf_sent")
    assert kinds.index("transfer.dtmf_sent") < kinds.index("transfer.completed")
    (sent,) = [e for e in done["events"] if e["type"] == "transfer.dtmf_sent"]
    assert sent["dtmf"] == "wwww12w34#"
    assert done["transfers"][-1]["dtmf"] == "wwww12w34#"
