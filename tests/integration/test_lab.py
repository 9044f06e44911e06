"""The lab itself works: real Asterisk, real SIPp, Python RTP peers hearing each other.

If these fail, every other integration test's failure means nothing.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import pytest

from bridge.lab.asterisk import AsteriskLab
from bridge.lab.rtp import RtpPeer, dominant_frequency, rms, speech_like
from bridge.lab.sipp import SippCall, SippUas

pytestmark = pytest.mark.asterisk


async def _until(pred: object, timeout: float = 5.0) -> bool:
    """Poll a zero-argument predicate (SIPp traces are files) until true or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return False


def test_ari_answers(asterisk_lab: AsteriskLab) -> None:
    status, info = asterisk_lab.ari("GET", "/asterisk/info")
    assert status == 200, info
    assert info["system"]["version"].startswith("22"), info
    assert "sipp-caller" in asterisk_lab.cli("pjsip show endpoints")


async def test_selftest_call_hears_hello_world(asterisk_lab: AsteriskLab) -> None:
    async with RtpPeer() as peer:
        call = SippCall.to_lab(
            asterisk_lab, "100", rtp_port=peer.port, from_user="lab-selftest", hold_ms=8000
        )
        await call.start()
        try:
            await call.wait(15)
        finally:
            await call.terminate()
        assert call.final_status() == 200, call.output()
        assert call.got_bye(), "Asterisk should hang up after hello-world"
        pcm = peer.received_pcm()
        assert len(pcm) > 8000 * 2 * 0.5, f"only {len(peer.packets)} RTP packets"
        assert speech_like(pcm), f"rms {rms(pcm):.0f}: hello-world should not be silence"
        call.cleanup()


async def test_lab_dial_two_way_audio(asterisk_lab: AsteriskLab) -> None:
    async with RtpPeer() as caller, RtpPeer() as callee:
        uas = SippUas.for_lab(asterisk_lab, "uas_answer.xml", rtp_port=callee.port)
        await uas.start()
        call = SippCall.to_lab(
            asterisk_lab, "+31612345678", rtp_port=caller.port, from_user="lab-dial", hold_ms=3000
        )
        await call.start()
        try:
            assert await _until(call.answered, 5), call.output()
            invite = uas.invite
            assert invite is not None
            assert invite.request_uri is not None
            assert invite.request_uri.startswith("sip:+31612345678@"), invite.first_line
            callee_port = re.search(r"^m=audio (\d+)", invite.body, re.MULTILINE)
            assert callee_port, invite.body
            caller_port = call.sdp_port()
            assert caller_port
            caller.set_remote("127.0.0.1", caller_port)
            callee.set_remote("127.0.0.1", int(callee_port.group(1)))
            t0 = time.monotonic()
            await asyncio.gather(caller.send_tone(440, 1.2), callee.send_tone(1000, 1.2))
            heard_by_callee = callee.received_pcm(since=t0 + 0.3)
            heard_by_caller = caller.received_pcm(since=t0 + 0.3)
            assert abs(dominant_frequency(heard_by_callee) - 440) < 20
            assert abs(dominant_frequency(heard_by_caller) - 1000) < 20
            assert await call.wait(10) == 0, call.output()
            assert await uas.wait(5) == 0, uas.output()
        finally:
            await call.terminate()
            await uas.terminate()
        call.cleanup()
        uas.cleanup()


@pytest.mark.parametrize(("password_ok", "expected"), [(True, 200), (False, 403)])
async def test_lab_dial_digest_auth(
    asterisk_lab: AsteriskLab, password_ok: bool, expected: int
) -> None:
    async with RtpPeer() as caller, RtpPeer() as callee:
        uas = SippUas.for_lab(
            asterisk_lab,
            "uas_answer_auth.xml",
            rtp_port=callee.port,
            keys={
                "auth_user": asterisk_lab.uas_auth_user,
                "auth_pass": asterisk_lab.uas_auth_password if password_ok else "wrong",
            },
        )
        await uas.start()
        call = SippCall.to_lab(
            asterisk_lab, "200", rtp_port=caller.port, from_user="lab-dial-auth", hold_ms=500
        )
        await call.start()
        try:
            await call.wait(10)
        finally:
            await call.terminate()
            await uas.terminate()
        # 403 reaches the caller as 403 (cause 21): the lab dialplan passes the cause on.
        assert call.final_status() == expected, call.output()
        invites = uas.received_requests("INVITE")
        assert len(invites) == 2 and invites[0].header("Authorization") is None
        assert f'username="{asterisk_lab.uas_auth_user}"' in (
            invites[1].header("Authorization") or ""
        )
        call.cleanup()
        uas.cleanup()


async def test_busy_callee_gives_caller_486(asterisk_lab: AsteriskLab) -> None:
    async with RtpPeer() as caller:
        uas = SippUas.for_lab(asterisk_lab, "uas_busy.xml")
        await uas.start()
        call = SippCall.to_lab(asterisk_lab, "300", rtp_port=caller.port, from_user="lab-dial")
        await call.start()
        try:
            await call.wait(10)
            assert await uas.wait(5) == 0, uas.output()
        finally:
            await call.terminate()
            await uas.terminate()
        assert call.final_status() == 486, call.output()
        call.cleanup()
        uas.cleanup()


@pytest.fixture
def lab_never_used() -> Iterator[AsteriskLab]:
    """An Asterisk of its own (it starts in about a second) that no daemon ever connected to.
    The session's lab once still listed the callbridge application 15 s after every earlier
    daemon had stopped, with no channel and no bridge left (a loaded full run; the likely
    cause, a stopped daemon's subscription that Asterisk keeps, was not verified)."""
    lab = AsteriskLab()
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


async def test_inbound_without_daemon_goes_to_fallback(lab_never_used: AsteriskLab) -> None:
    """No ARI app connected: Stasis fails and [callbridge-fallback] plays ss-noservice."""
    asterisk_lab = lab_never_used
    async with RtpPeer() as peer:
        call = SippCall.to_lab(asterisk_lab, "+3120555", rtp_port=peer.port, hold_ms=8000)
        await call.start()
        try:
            await call.wait(15)
        finally:
            await call.terminate()
        assert call.final_status() == 200, call.output()
        assert call.got_bye()
        assert speech_like(peer.received_pcm()), "expected the ss-noservice announcement"
        call.cleanup()
