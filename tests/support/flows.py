"""Steps shared by the call-flow tests: the seed's set-up through the API, and waits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from bridge.lab.rtp import RtpPeer, rms
from bridge.lab.sipp import SippCall, SippUas
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


async def transfer_warm(api: Api, call_id: str, **fields: Any) -> None:
    """Warm-transfer the call to DESTINATION (issue 9 §2): a brief, acceptance by DTMF 1
    required, unless `fields` say otherwise."""
    body = {
        "type": "transfer",
        "destination": DESTINATION,
        "mode": "warm",
        "brief": "A caller about invoice forty two.",
        "require_accept": True,
        **fields,
    }
    await api.ok("POST", f"/calls/{call_id}/control", body)


async def transfer_in_state(api: Api, call_id: str, *states: str) -> dict[str, Any]:
    """The call once its last transfer is in one of `states`."""

    async def reached() -> dict[str, Any] | None:
        call = await api.ok("GET", f"/calls/{call_id}")
        transfers = call["transfers"]
        return call if transfers and transfers[-1]["state"] in states else None

    return await wait_for(reached, f"the transfer in {states}", timeout=30, every=0.02)


async def heard_speech(peer: RtpPeer, since: float, seconds: float = 10) -> bool:
    """True once the peer has received at least 0.5 s of clearly non-silent audio."""

    async def loud() -> bool:
        pcm = peer.received_pcm(since=since)
        return len(pcm) >= 8000 and rms(pcm) > 300

    return await wait_for(loud, "non-silent audio at the caller", timeout=seconds)


class LabCall:
    """A caller into the lab (SIPp with its RTP peer) and a destination behind it (a SIPp UAS
    with its own RTP peer), torn down so that nothing is left in the session's Asterisk.

        async with LabCall(asterisk_lab, api) as lab_call:
            world = await setup_directory(api, lab_call.uas, auth=False)
            call = await lab_call.dial()

    `uas_scenario=None`: no destination. `on_lab=True`: the UAS listens on the port of the
    lab's own `sipp-uas` endpoints (a route), not on a port of its own (a trunk's host).
    """

    def __init__(
        self,
        lab: Any,
        api: Api,
        uas_scenario: str | None = "uas_answer.xml",
        *,
        on_lab: bool = False,
        **uas_options: Any,
    ) -> None:
        self.lab = lab
        self.api = api
        self.uas_scenario = uas_scenario
        self.on_lab = on_lab
        self.uas_options = uas_options
        self.uas: SippUas | None = None
        self.caller: SippCall | None = None

    async def __aenter__(self) -> LabCall:
        self.caller_rtp = await RtpPeer().start()
        self.dest_rtp = await RtpPeer().start()
        if self.uas_scenario is not None:
            options = {"rtp_port": self.dest_rtp.port, **self.uas_options}
            self.uas = (
                SippUas.for_lab(self.lab, self.uas_scenario, **options)
                if self.on_lab
                else SippUas(self.uas_scenario, **options)
            )
            await self.uas.start()
        return self

    async def dial(self, number: str = DID, hold_ms: int = 30000) -> dict[str, Any]:
        """Place the call and return its record once callbridge has it active."""
        self.caller = SippCall.to_lab(
            self.lab, number, rtp_port=self.caller_rtp.port, hold_ms=hold_ms
        )
        await self.caller.start()
        return await active_call(self.api)

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.caller is not None:
                await self.caller.terminate()  # Asterisk hangs the call up first (a BYE)
            if self.uas is not None:
                await self.uas.stop()
        finally:
            self.caller_rtp.close()
            self.dest_rtp.close()


@contextlib.contextmanager
def pjsip_extension(lab: Any, name: str, contact_port: int | None) -> Iterator[str]:
    """A PJSIP endpoint `name` made at run time through ARI's dynamic configuration, whose
    AOR's contact is a SIPp UAS on `contact_port`; `None`: an AOR with no contact, as a
    phone that is not registered (Asterisk reports the endpoint offline)."""
    number = name.rpartition("-")[2]
    aor = {"contact": f"sip:{number}@127.0.0.1:{contact_port}"} if contact_port else {}
    for kind, fields in (
        ("aor", aor or {"max_contacts": "1"}),
        (
            "endpoint",
            {
                "aors": name,
                "context": "callbridge-outbound-only",
                "disallow": "all",
                "allow": "ulaw",
                "direct_media": "no",
            },
        ),
    ):
        body = {"fields": [{"attribute": k, "value": v} for k, v in fields.items()]}
        status, reply = lab.ari(
            "PUT", f"/asterisk/config/dynamic/res_pjsip/{kind}/{name}", body=body
        )
        assert status == 200, reply
    try:
        yield name
    finally:
        for kind in ("endpoint", "aor"):
            lab.ari("DELETE", f"/asterisk/config/dynamic/res_pjsip/{kind}/{name}")
