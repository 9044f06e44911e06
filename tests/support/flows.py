"""Steps shared by the call-flow tests: the seed's set-up through the API, and waits."""

from __future__ import annotations

from typing import Any

from bridge.lab.rtp import RtpPeer, rms
from bridge.lab.sipp import SippUas
from tests.support.daemon import Api, wait_for

DID = "+31201234567"
DESTINATION = "+31612345678"
FINAL_TRANSFER_STATES = ("bridged", "failed", "cancelled", "handed_off")


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
        if not transfers or transfers[-1]["state"] not in FINAL_TRANSFER_STATES:
            return None
        # The call and its transfer are saved one after the other: wait for both.
        return call if call["status"] != "transferring" else None

    return await wait_for(settled, "the transfer to settle", timeout=timeout)


async def heard_speech(peer: RtpPeer, since: float, seconds: float = 10) -> bool:
    """True once the peer has received at least 0.5 s of clearly non-silent audio."""

    async def loud() -> bool:
        pcm = peer.received_pcm(since=since)
        return len(pcm) >= 8000 and rms(pcm) > 300

    return await wait_for(loud, "non-silent audio at the caller", timeout=seconds)
