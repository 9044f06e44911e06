"""Admission control on the real Asterisk (issue 7 §8): a caller the daemon cannot serve well
goes to the dialplan fallback at once, its reason recorded, and the call already up keeps its
assistant. The cap is `calls.max_active` here: the loop-lag and STT-backlog triggers take the
same path (tests/unit/test_admission.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.lab.rtp import RtpPeer
from bridge.lab.sipp import SippCall
from tests.support.daemon import start_daemon, wait_for
from tests.support.flows import DID, LabCall, heard_speech, setup_directory

pytestmark = pytest.mark.asterisk

REFUSED = "overloaded: calls.max_active (1) reached: sent to the dialplan fallback"


async def test_a_caller_over_the_cap_goes_to_the_fallback_and_the_call_up_keeps_its_assistant(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    calls = {"max_active": 1, "max_loop_lag_ms": None, "max_stt_backlog_per_worker": None}
    daemon, api = await start_daemon(asterisk_lab, tmp_path, calls=calls)
    try:
        async with LabCall(asterisk_lab, api, uas_scenario=None) as first:
            await setup_directory(api, None)
            call = await first.dial(hold_ms=60000)
            await heard_speech(first.caller_rtp, since=0)  # greeted by its assistant
            async with RtpPeer() as second_rtp:
                second = SippCall.to_lab(asterisk_lab, DID, rtp_port=second_rtp.port, hold_ms=20000)
                await second.start()
                # The fallback answers and announces: the second caller is never left waiting.
                await heard_speech(second_rtp, since=0)

                async def refused() -> list[dict[str, Any]]:
                    return (await api.ok("GET", "/calls?status=ended"))["data"]

                (other,) = await wait_for(refused, "the refused caller to be recorded")
                assert other["end_reason"] == REFUSED and other["id"] != call["id"]
                await asyncio.wait_for(second.wait(), 20)
                assert second.got_bye()  # the fallback ended it after its announcement

            # The call that was up keeps its assistant: still active, and what it says next
            # reaches its caller (after the greeting has ended, so this is new speech).
            assert (await api.ok("GET", f"/calls/{call['id']}"))["status"] == "active"
            await wait_for(lambda: first.caller_rtp.went_quiet(0.5), "the greeting to end")
            said_at = time.monotonic()
            await api.ok(
                "POST", f"/calls/{call['id']}/control", {"type": "say", "message": "Still here."}
            )
            await heard_speech(first.caller_rtp, since=said_at)
            (only_active,) = (await api.ok("GET", "/calls?status=active"))["data"]
            assert only_active["id"] == call["id"]
    finally:
        await api.close()
        await daemon.stop()
