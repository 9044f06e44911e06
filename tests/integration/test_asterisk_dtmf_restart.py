"""DTMF after answer across a daemon restart, on the real Asterisk (issue 9 §4): the digits
reach the destination once. The daemon stops after recording `transfer.dtmf_sent` and before
the bridge; the new process bridges the answered leg without sending them again."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

import pytest

import tests.integration.test_asterisk_internal as internal
from bridge.lab.rtp import RtpPeer
from bridge.lab.sipp import SippCall, SippUas
from tests.support.daemon import start_daemon, wait_for
from tests.support.flows import DID, active_call, heard_speech, transfer_settled

pytestmark = pytest.mark.asterisk

# Pauses first, so that the restart happens while Asterisk still plays them.
DIGITS = "WWW1234#"


async def test_a_restart_after_the_dtmf_went_out_does_not_send_it_again(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    internal.EXT = str(random.randrange(1000, 9999))  # the lab extension's number
    daemon, api = await start_daemon(asterisk_lab, tmp_path, transfer={"allow_any": True})
    destination = f"extension:lab-{internal.EXT}"
    async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
        uas = SippUas("uas_answer.xml", rtp_port=dest_rtp.port)
        await uas.start()
        extension = contextlib.ExitStack()
        caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=60000)
        try:
            extension.enter_context(internal.lab_extension(asterisk_lab, uas))
            dest = {"type": "extension", "extension": f"lab-{internal.EXT}",
                    "description": "Behind the IVR", "dtmf": DIGITS}  # fmt: skip
            assistant = await api.ok(
                "POST",
                "/assistants",
                {"name": "Desk", "first_message": "Welcome to Acme, how can I help you?",
                 "llm_config": {"tools": [{"type": "transfer_call", "destinations": [dest]}]}},
            )  # fmt: skip
            await api.ok("POST", "/numbers", {"number": DID, "assistant_id": assistant["id"]})
            await caller.start()
            call = await active_call(api)
            await heard_speech(caller_rtp, since=0)
            await api.ok(
                "POST",
                f"/calls/{call['id']}/control",
                {"type": "transfer", "destination": destination, "ring_timeout": 15},
            )

            async def dtmf_recorded() -> bool:
                data = await api.ok("GET", f"/calls/{call['id']}")
                return any(e["type"] == "transfer.dtmf_sent" for e in data["events"])

            await wait_for(dtmf_recorded, "transfer.dtmf_sent")
            # The daemon stops before the bridge (the digits still play); a new one resumes.
            await api.close()
            await daemon.stop()
            daemon, api = await start_daemon(asterisk_lab, tmp_path, transfer={"allow_any": True})
            done = await transfer_settled(api, call["id"])
            transfer = done["transfers"][-1]
            assert (transfer["state"], transfer["outcome"]) == ("bridged", "answered"), transfer
            sent = [e for e in done["events"] if e["type"] == "transfer.dtmf_sent"]
            assert len(sent) == 1
            # What reached the destination: the digits once.
            await wait_for(
                lambda: internal.rfc2833_digits(dest_rtp.packets) == "1234#", "the digits"
            )
            assert internal.rfc2833_digits(dest_rtp.packets) == "1234#"
            await internal.hang_up(api, call["id"], uas)
        finally:
            await caller.terminate()
            await uas.stop()
            extension.close()
            await api.close()
            await daemon.stop()
