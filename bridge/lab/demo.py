"""`python -m bridge.lab.demo`: see callbridge work in one go on a local, real Asterisk.

It starts a lab Asterisk, the daemon, a SIPp "human agent" behind a SIP trunk, configures
everything through the REST API exactly as the seed's curl examples do, and places a SIPp
call. The caller is greeted with real speech, says (real speech, over RTP) that they want
sales, and the assistant transfers them by its own decision (the offline `local` provider):
caller and agent end up bridged, audio checked both ways. Nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from bridge.lab.asterisk import AsteriskLab
from bridge.lab.harness import Api, start_daemon, wait_for
from bridge.lab.rtp import RtpPeer, dominant_frequency, rms
from bridge.lab.sipp import SippCall, SippUas
from bridge.speech.tts import FliteTts

DID = "+31201234567"
SALES = "+31612345678"


def show(title: str, data: Any = None) -> None:
    print(f"\n== {title}", flush=True)
    if data is not None:
        print(json.dumps(data, indent=2), flush=True)


async def demo(workdir: Path) -> int:
    with AsteriskLab() as lab:
        show(f"Asterisk {lab.ari_url} (SIP udp 127.0.0.1:{lab.sip_port})")
        daemon, api = await start_daemon(lab, workdir, log_format="console", log_level="info")
        try:
            return await _call_flow(lab, api)
        finally:
            await api.close()
            await daemon.stop()


async def _call_flow(lab: AsteriskLab, api: Api) -> int:
    async with RtpPeer() as caller_rtp, RtpPeer() as agent_rtp:
        agent = SippUas(
            "uas_answer_auth.xml",
            rtp_port=agent_rtp.port,
            keys={"auth_user": "hms-sovereign", "auth_pass": "secure-password"},
        )
        await agent.start()
        assistant = await api.ok(
            "POST",
            "/assistants",
            {
                "name": "Support Assistant",
                "first_message": "Welcome to Acme support, how can I help you?",
                "llm_config": {
                    "provider": "local",
                    "messages": [{"role": "system", "content": "You are a support agent."}],
                    "tools": [
                        {
                            "type": "transfer_call",
                            "destinations": [
                                {
                                    "type": "number",
                                    "number": SALES,
                                    "description": "Sales team - for pricing and quotes",
                                    "message": "I'm transferring you to our sales team.",
                                },
                                {
                                    "type": "number",
                                    "number": "+31687654321",
                                    "description": "Technical support - for product issues",
                                    "message": "I'm transferring you to technical support.",
                                },
                            ],
                        },
                        {"type": "end_call"},
                    ],
                },
            },
        )
        show("POST /api/v1/assistants", assistant)
        trunk = await api.ok(
            "POST",
            "/sip-trunks",
            {
                "name": "Office PBX",
                "host": "127.0.0.1",
                "port": agent.local_port,
                "username": "hms-sovereign",
                "password": "secure-password",
            },
        )
        show("POST /api/v1/sip-trunks (the password is never shown again)", trunk)
        number = await api.ok("POST", "/numbers", {"number": DID, "assistant_id": assistant["id"]})
        number = await api.ok(
            "PATCH", f"/numbers/{number['id']}", {"transfer_trunk_id": trunk["id"]}
        )
        show("PATCH /api/v1/numbers/{id} {transfer_trunk_id}", number)

        caller = SippCall.to_lab(lab, DID, rtp_port=caller_rtp.port, hold_ms=25000)
        await caller.start()
        show(f"SIPp calls {DID}")

        async def active() -> dict[str, Any] | None:
            calls = (await api.ok("GET", "/calls?status=active"))["data"]
            return calls[0] if calls else None

        call = await wait_for(active, "the call")
        await wait_for(lambda: _loud(caller_rtp), "the greeting at the caller", timeout=10)
        show(f"The caller hears the greeting (RMS {rms(caller_rtp.received_pcm()):.0f})")

        await _quiet(caller_rtp)
        sentence = "I'd like to talk to someone in sales about pricing."
        show(f'The caller says: "{sentence}"')
        pcm = await FliteTts().synthesize(sentence)
        await caller_rtp.send_pcm(pcm + bytes(16000))  # the words, then a second of silence

        async def settled() -> dict[str, Any] | None:
            data = await api.ok("GET", f"/calls/{call['id']}")
            transfers = data["transfers"]
            return (
                data
                if transfers
                and transfers[-1]["state"] not in ("announcing", "dialing", "ringing", "answered")
                else None
            )

        data = await wait_for(settled, "the transfer", timeout=30)
        transfer = data["transfers"][-1]
        turns = [
            {"role": e["role"], "text": e["text"]}
            for e in data["events"]
            if e["type"] == "transcript"
        ]
        show("GET /api/v1/calls/{id} -> the transcript", turns)
        show("GET /api/v1/calls/{id} -> transfers[-1] (decided by the assistant)", transfer)
        if transfer["state"] == "bridged":
            await caller_rtp.send_tone(440, 0.3)  # a bridge forwards only what arrives
            if not await agent_rtp.wait_for_packet(timeout=5):
                show("No audio reached the agent")
                return 1
            t0 = asyncio.get_running_loop().time()
            await asyncio.gather(caller_rtp.send_tone(440, 1.0), agent_rtp.send_tone(1000, 1.0))
            show(
                "Bridged: the agent hears the caller's 440 Hz as "
                f"{dominant_frequency(agent_rtp.received_pcm(since=t0)):.0f} Hz, the caller "
                f"hears the agent's 1000 Hz as "
                f"{dominant_frequency(caller_rtp.received_pcm(since=t0)):.0f} Hz"
            )
        await caller.terminate()
        await agent.stop()
        return 0 if transfer["state"] == "bridged" else 1


async def _quiet(peer: RtpPeer, gap: float = 0.4) -> None:
    """Wait until the greeting is over: `gap` seconds of silence after speech."""
    await wait_for(lambda: peer.went_quiet(gap), "the greeting to end", timeout=15, every=0.05)


async def _loud(peer: RtpPeer) -> bool:
    pcm = peer.received_pcm()
    return len(pcm) >= 8000 and rms(pcm) > 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="callbridge-demo-") as tmp:
        raise SystemExit(asyncio.run(demo(Path(tmp))))


if __name__ == "__main__":
    main()
