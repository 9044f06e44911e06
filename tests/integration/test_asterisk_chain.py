"""Fallback chains and the extension check (issue 9 §3) on the real Asterisk, with SIPp.

Each test makes its own extensions (PJSIP endpoints `chain<n>-<k>` made through ARI, each
AOR at its own SIPp UAS, or with no contact: an unregistered phone) and transfers a SIPp
caller through the control API: busy then the fallback answers (bridged, audio through,
one announcement, ringback in between), everything fails (the caller is back with the
assistant once, every attempt recorded), an offline and a busy extension skipped without
an INVITE, a fallback the policy refuses skipped and recorded, and a daemon restart during
an attempt going on with the next attempt, not the first."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.lab.rtp import RtpPeer, dominant_frequency, ringback_windows
from bridge.lab.sipp import SippUas
from tests.support.daemon import Api, start_daemon, wait_for
from tests.support.flows import DID, LabCall, heard_speech, pjsip_extension

pytestmark = pytest.mark.asterisk

ANNOUNCEMENT = "Let me put you through to our team, one moment please."
FAILURE_LINES = (
    "Sorry, I could not reach them. I'm still here with you.",
    "Sorry, that line is busy. I'm still here with you.",
    "Sorry, nobody answered. I'm still here with you.",
)


class Extensions:
    """The test's extensions (`chain<n>-<k>`), each with its SIPp UAS (or none), torn down
    together."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.prefix = f"chain{random.randrange(1000, 9999)}"
        self.uas: dict[str, SippUas] = {}
        self.peers: list[RtpPeer] = []
        self._stack = contextlib.ExitStack()

    async def add(
        self, k: int, scenario: str | None, ring_ms: int = 200
    ) -> tuple[str, RtpPeer | None]:
        """Extension `<prefix>-<k>` answering with `scenario` (after ringing `ring_ms`), or
        offline (`None`)."""
        name = f"{self.prefix}-{k}"
        peer = None
        port = None
        if scenario is not None:
            peer = await RtpPeer().start()
            self.peers.append(peer)
            uas = SippUas(scenario, rtp_port=peer.port, ring_ms=ring_ms)
            await uas.start()
            self.uas[name] = uas
            port = uas.local_port
        self._stack.enter_context(pjsip_extension(self.lab, name, port))
        return name, peer

    def invites(self, name: str) -> int:
        return len(self.uas[name].received_requests("INVITE"))

    async def close(self) -> None:
        for uas in self.uas.values():
            await uas.stop()
        self._stack.close()
        for peer in self.peers:
            peer.close()


def destination(name: str, **extra: Any) -> dict[str, Any]:
    return {"type": "extension", "extension": name, "description": f"Agent {name}", **extra}


@pytest.fixture
async def lab_api(asterisk_lab: Any, tmp_path: Path) -> AsyncIterator[tuple[Api, Extensions]]:
    daemon, client = await start_daemon(asterisk_lab, tmp_path, transfer={"allow_any": True})
    extensions = Extensions(asterisk_lab)
    try:
        yield client, extensions
    finally:
        await client.close()
        await daemon.stop()
        await extensions.close()


async def configure(api: Api, destinations: list[dict[str, Any]]) -> None:
    assistant = await api.ok(
        "POST",
        "/assistants",
        {
            "name": "Front desk",
            "first_message": "Welcome to Acme, how can I help you?",
            "llm_config": {"tools": [{"type": "transfer_call", "destinations": destinations}]},
        },
    )
    await api.ok("POST", "/numbers", {"number": DID, "assistant_id": assistant["id"]})


async def chain_settled(api: Api, call_id: str, attempts: int) -> dict[str, Any]:
    """The call once `attempts` transfers are stored, the last final, and the call out of
    `transferring` (and, when it failed, the chain's record completed)."""

    async def check() -> dict[str, Any] | None:
        call = await api.ok("GET", f"/calls/{call_id}")
        rows = call["transfers"]
        if len(rows) != attempts or call["status"] == "transferring":
            return None
        last = rows[-1]
        if last["state"] == "failed":
            ended = any(e["type"] == "transfer.attempts_ended" for e in call["events"])
            return call if ended else None
        return call if last["state"] == "bridged" else None

    return await wait_for(check, f"{attempts} attempts settled", timeout=60)


def said(call: dict[str, Any]) -> list[str]:
    return [e["text"] for e in call["events"] if e["type"] == "assistant.said"]


async def test_busy_then_the_fallback_answers_with_one_announcement(
    asterisk_lab: Any, lab_api: tuple[Api, Extensions]
) -> None:
    """The assistant's configured chain: the first extension is busy (486), its fallback
    answers. The caller hears the announcement once, ringback, then the second agent."""
    api, ext = lab_api
    busy, _ = await ext.add(1, "uas_busy.xml")
    agent, agent_rtp = await ext.add(2, "uas_answer.xml", ring_ms=2000)
    assert agent_rtp is not None
    await configure(api, [destination(busy, message=ANNOUNCEMENT, fallbacks=[destination(agent)])])
    async with LabCall(asterisk_lab, api, None) as lab_call:
        call = await lab_call.dial(hold_ms=60000)
        caller_rtp = lab_call.caller_rtp
        await heard_speech(caller_rtp, since=0)
        asked = asyncio.get_running_loop().time()
        await api.ok(
            "POST",
            f"/calls/{call['id']}/control",
            {"type": "transfer", "destination": f"extension:{busy}", "message": ANNOUNCEMENT},
        )
        done = await chain_settled(api, call["id"], 2)
        first, second = done["transfers"]
        assert (first["outcome"], first["sip_code"]) == ("busy", 486), first
        assert (second["state"], second["outcome"]) == ("bridged", "answered"), second
        assert second["destination"] == f"extension:{agent}"
        assert first["chain_id"] == second["chain_id"] == first["id"]
        assert [a["outcome"] for a in second["attempts"]] == ["busy"]
        assert done["status"] == "transferred"
        assert (ext.invites(busy), ext.invites(agent)) == (1, 1)
        # One announcement, no failure line; ringback while the fallback rang.
        assert said(done).count(ANNOUNCEMENT) == 1
        assert not set(said(done)) & set(FAILURE_LINES)
        assert ringback_windows(caller_rtp.received_pcm(since=asked)) > 0
        # The caller is bridged to the second agent: the agent hears the caller's tone.
        talking = asyncio.create_task(caller_rtp.send_tone(440, 30.0))
        try:
            t0 = asyncio.get_running_loop().time()

            def agent_hears() -> bool:
                pcm = agent_rtp.received_pcm(since=t0)
                return len(pcm) >= 16000 and abs(dominant_frequency(pcm[-16000:]) - 440) < 20

            await wait_for(agent_hears, "the caller at the fallback agent", 10)
        finally:
            talking.cancel()
        await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})


async def test_all_fail_and_the_caller_is_back_with_the_assistant_once(
    asterisk_lab: Any, lab_api: tuple[Api, Extensions]
) -> None:
    """Busy, declined, no answer: each attempt recorded, the caller back with the assistant,
    which says its failure line once (after the last attempt), and the call goes on."""
    api, ext = lab_api
    busy, _ = await ext.add(1, "uas_busy.xml")
    declines, _ = await ext.add(2, "uas_decline.xml")
    silent, _ = await ext.add(3, "uas_noanswer.xml")
    await configure(api, [destination(busy), destination(declines), destination(silent)])
    async with LabCall(asterisk_lab, api, None) as lab_call:
        call = await lab_call.dial(hold_ms=60000)
        caller_rtp = lab_call.caller_rtp
        await heard_speech(caller_rtp, since=0)
        await api.ok(
            "POST",
            f"/calls/{call['id']}/control",
            {
                "type": "transfer",
                "destination": f"extension:{busy}",
                "message": ANNOUNCEMENT,
                "fallbacks": [f"extension:{declines}", f"extension:{silent}"],
                "ring_timeout": 3,
            },
        )
        done = await chain_settled(api, call["id"], 3)
        outcomes = [(t["attempt"], t["outcome"]) for t in done["transfers"]]
        assert outcomes == [(0, "busy"), (1, "declined"), (2, "no_answer")], outcomes
        last = done["transfers"][-1]
        assert [a["outcome"] for a in last["attempts"]] == ["busy", "declined", "no_answer"]
        assert done["status"] == "active"
        assert [ext.invites(n) for n in (busy, declines, silent)] == [1, 1, 1]
        back = asyncio.get_running_loop().time()
        await wait_for(lambda: _said_failure(api, call["id"]), "the assistant's failure line", 15)
        final = await api.ok("GET", f"/calls/{call['id']}")
        failure = [t for t in said(final) if t in FAILURE_LINES]
        assert failure == ["Sorry, nobody answered. I'm still here with you."], failure
        # The caller hears the assistant again, not ringback.
        await heard_speech(caller_rtp, since=back)
        assert ringback_windows(caller_rtp.received_pcm(since=back)) == 0
        assert said(final).count(ANNOUNCEMENT) == 1
        caller = lab_call.caller
        assert caller is not None and caller.proc is not None and caller.proc.returncode is None
        await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})


async def _said_failure(api: Api, call_id: str) -> bool:
    call = await api.ok("GET", f"/calls/{call_id}")
    return any(t in FAILURE_LINES for t in said(call))


async def test_offline_and_busy_extensions_are_skipped_without_ringing(
    asterisk_lab: Any, lab_api: tuple[Api, Extensions]
) -> None:
    """An unregistered extension (Asterisk: endpoint offline) and one on a call (a channel
    of it exists) are skipped without an INVITE; the third answers."""
    api, ext = lab_api
    offline, _ = await ext.add(1, None)
    busy, _ = await ext.add(2, "uas_noanswer.xml")  # on a call: it rings from elsewhere
    agent, _ = await ext.add(3, "uas_answer.xml")
    await configure(api, [destination(offline), destination(busy), destination(agent)])
    occupying = f"{ext.prefix}-occupying"
    status, reply = asterisk_lab.ari(
        "POST",
        "/channels",
        params={
            "endpoint": f"PJSIP/{busy}",
            "context": "lab-selftest",
            "extension": "1",
            "timeout": "60",
            "channelId": occupying,
        },
    )
    assert status == 200, reply
    await wait_for(lambda: ext.invites(busy) == 1, "the busy extension ringing elsewhere", 10)
    async with LabCall(asterisk_lab, api, None) as lab_call:
        call = await lab_call.dial(hold_ms=60000)
        caller_rtp = lab_call.caller_rtp
        try:
            await heard_speech(caller_rtp, since=0)
            await api.ok(
                "POST",
                f"/calls/{call['id']}/control",
                {
                    "type": "transfer",
                    "destination": f"extension:{offline}",
                    "message": ANNOUNCEMENT,
                    "fallbacks": [f"extension:{busy}", f"extension:{agent}"],
                },
            )
            done = await chain_settled(api, call["id"], 3)
            skipped_offline, skipped_busy, bridged = done["transfers"]
            assert skipped_offline["outcome"] == "unreachable"
            assert (
                skipped_offline["skipped"]
                == f"extension {offline} is offline (not registered): not rung"
            )
            assert skipped_busy["outcome"] == "busy"
            assert skipped_busy["skipped"] == f"extension {busy} is busy (on a call): not rung"
            assert bridged["state"] == "bridged" and bridged["attempt"] == 2
            # Skipped means not rung: no leg, no INVITE beyond the one keeping it busy.
            dialled = [e for e in done["events"] if e["type"] == "transfer.dialing"]
            assert [e["transfer_id"] for e in dialled] == [bridged["id"]]
            assert ext.invites(busy) == 1 and ext.invites(agent) == 1
            skipped = [e for e in done["events"] if e["type"] == "transfer.skipped"]
            assert [e["state"] for e in skipped] == ["offline", "busy"]
            # The announcement is said by the first attempt that dials, once.
            assert said(done).count(ANNOUNCEMENT) == 1
            await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
        finally:
            asterisk_lab.ari("DELETE", f"/channels/{occupying}")


async def test_a_fallback_the_policy_refuses_is_skipped_and_recorded(
    asterisk_lab: Any, lab_api: tuple[Api, Extensions]
) -> None:
    """A fallback that is not configured on the assistant (internal destinations must be,
    whatever allow_any says) is refused by the same policy, recorded, and skipped."""
    api, ext = lab_api
    busy, _ = await ext.add(1, "uas_busy.xml")
    agent, _ = await ext.add(2, "uas_answer.xml")
    await configure(api, [destination(busy), destination(agent)])
    async with LabCall(asterisk_lab, api, None) as lab_call:
        call = await lab_call.dial(hold_ms=60000)
        await api.ok(
            "POST",
            f"/calls/{call['id']}/control",
            {
                "type": "transfer",
                "destination": f"extension:{busy}",
                "fallbacks": ["extension:9999", f"extension:{agent}"],
            },
        )
        done = await chain_settled(api, call["id"], 2)
        busy_row, bridged = done["transfers"]
        assert busy_row["outcome"] == "busy" and bridged["state"] == "bridged"
        assert bridged["attempt"] == 2  # attempt 1 was the refused one
        refused = [e for e in done["events"] if e["type"] == "transfer.refused"]
        assert [e["destination"] for e in refused] == ["extension:9999"]
        (skipped,) = [e for e in done["events"] if e["type"] == "transfer.skipped"]
        assert (skipped["attempt"], skipped["rule"]) == (1, "assistant.destinations")
        assert [a["outcome"] for a in bridged["attempts"]] == ["busy", "refused"]
        await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})


async def test_a_restart_during_an_attempt_goes_on_with_the_next_not_the_first(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    """The daemon restarts while attempt 1 rings: the new one adopts attempt 1 (its leg and
    the chain's rest travel on the stored transfer); when it ends unanswered, attempt 2 runs.
    The first destination is never rung again; the record keeps every attempt."""
    daemon, api = await start_daemon(asterisk_lab, tmp_path, transfer={"allow_any": True})
    ext = Extensions(asterisk_lab)
    try:
        busy, _ = await ext.add(1, "uas_busy.xml")
        ringing, _ = await ext.add(2, "uas_noanswer.xml")
        agent, _ = await ext.add(3, "uas_answer.xml")
        await configure(api, [destination(busy), destination(ringing), destination(agent)])
        async with LabCall(asterisk_lab, api, None) as lab_call:
            call = await lab_call.dial(hold_ms=60000)
            await api.ok(
                "POST",
                f"/calls/{call['id']}/control",
                {
                    "type": "transfer",
                    "destination": f"extension:{busy}",
                    "fallbacks": [f"extension:{ringing}", f"extension:{agent}"],
                    "ring_timeout": 6,
                },
            )

            async def attempt_1_rings() -> bool:
                rows = (await api.ok("GET", f"/calls/{call['id']}"))["transfers"]
                return len(rows) == 2 and rows[-1]["state"] == "ringing"

            await wait_for(attempt_1_rings, "attempt 1 ringing", 15)
            await api.close()
            await daemon.stop()
            daemon, api = await start_daemon(asterisk_lab, tmp_path, transfer={"allow_any": True})
            done = await chain_settled(api, call["id"], 3)
            outcomes = [(t["attempt"], t["state"], t["outcome"]) for t in done["transfers"]]
            assert outcomes == [
                (0, "failed", "busy"),
                (1, "failed", "no_answer"),
                (2, "bridged", "answered"),
            ], outcomes
            assert len({t["chain_id"] for t in done["transfers"]}) == 1
            assert [ext.invites(n) for n in (busy, ringing, agent)] == [1, 1, 1]
            assert [c["id"] for c in (await api.ok("GET", "/calls"))["data"]] == [call["id"]]
            await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
    finally:
        await api.close()
        await daemon.stop()
        await ext.close()
