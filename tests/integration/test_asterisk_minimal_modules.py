"""The README's module list for `autoload = no` is enough: an Asterisk that loads exactly
dialplan/modules-minimal.conf greets, transfers through an authenticated trunk with audio
both ways, and sends an unknown number to the fallback's announcement."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.lab.asterisk import AsteriskLab, LabUnavailable
from bridge.lab.rtp import RtpPeer, dominant_frequency
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

pytestmark = pytest.mark.asterisk


@pytest.fixture(scope="module")
def minimal_lab(asterisk_lab: AsteriskLab) -> Iterator[AsteriskLab]:
    lab = AsteriskLab(modules_conf="modules-minimal.conf")
    try:
        lab.check_installed()
    except LabUnavailable as exc:  # asterisk_lab already skipped or failed in that case
        pytest.skip(str(exc))
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


async def test_minimal_modules_run_a_call_a_transfer_and_the_fallback(
    minimal_lab: AsteriskLab, tmp_path: Path
) -> None:
    loaded = minimal_lab.cli("module show like res_pjsip_registrar")
    assert "0 modules loaded" in loaded, loaded  # autoload is really off
    daemon, api = await start_daemon(minimal_lab, tmp_path)
    try:
        async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
            uas = SippUas.for_lab(
                minimal_lab,
                "uas_answer_auth.xml",
                rtp_port=dest_rtp.port,
                keys={"auth_user": "hms-sovereign", "auth_pass": "secure-password"},
            )
            await uas.start()
            await setup_directory(api, uas)
            caller = SippCall.to_lab(minimal_lab, DID, rtp_port=caller_rtp.port, hold_ms=60000)
            await caller.start()
            try:
                call = await active_call(api)
                await heard_speech(caller_rtp, since=0)
                await api.ok(
                    "POST",
                    f"/calls/{call['id']}/control",
                    {"type": "transfer", "destination": DESTINATION},
                )
                done = await transfer_settled(api, call["id"])
                assert done["transfers"][-1]["state"] == "bridged", done["transfers"][-1]
                await caller_rtp.send_tone(440, 0.3)
                assert await dest_rtp.wait_for_packet(timeout=5)
                t0 = asyncio.get_running_loop().time()
                await asyncio.gather(caller_rtp.send_tone(440, 1.5), dest_rtp.send_tone(1000, 1.5))
                assert abs(dominant_frequency(dest_rtp.received_pcm(since=t0)) - 440) < 20
                assert abs(dominant_frequency(caller_rtp.received_pcm(since=t0)) - 1000) < 20
                await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
                assert await asyncio.wait_for(caller.wait(), 10) == 0 and caller.got_bye()
            finally:
                await caller.terminate()
                await uas.stop()

        async with RtpPeer() as caller_rtp:
            caller = SippCall.to_lab(
                minimal_lab, "+31999999999", rtp_port=caller_rtp.port, hold_ms=15000
            )
            await caller.start()
            try:
                await heard_speech(caller_rtp, since=0)  # ss-noservice from the fallback

                async def ended() -> list[dict[str, Any]]:
                    return (await api.ok("GET", "/calls?status=ended"))["data"]

                await wait_for(ended, "the refused call to be recorded")
                await asyncio.wait_for(caller.wait(), 20)
                assert caller.got_bye()
            finally:
                await caller.terminate()
    finally:
        await api.close()
        await daemon.stop()
