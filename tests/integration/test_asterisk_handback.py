"""Hand back to the assistant (issue 9 §5) on the real Asterisk, with real speech.

A SIPp caller talks to the assistant (whisper + silero in the daemon, the fake OpenAI server
as its model), is transferred (bridge mode) through the trunk to a SIPp UAS, and comes back:
by the destination pressing `##` (RFC 4733 from the destination's RTP peer), by the control
API's `return`, or because the destination hangs up first (a BYE from the UAS) when the
assistant is set to take the caller back. Each time the caller must HEAR the return line
(whisper transcribes what reached the caller's RTP peer), and a new spoken question must be
answered by a model that was told of the hand back and still has the earlier conversation.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.speech.whisper import WhisperStt
from tests.integration import test_conversation_asterisk as conversation_lab
from tests.integration.test_asterisk_transfer import transfer_settled
from tests.integration.test_conversation_asterisk import (
    SALES,
    Call,
    greeting_done,
    provision,
    say,
    wait_transcript,
)
from tests.support.daemon import Api, start_daemon, wait_for
from tests.support.fake_openai import FakeOpenAI, Reply
from tests.support.flows import DESTINATION, LabCall, heard_speech, setup_directory

# The conversation lab's fixtures: speech models, the fake OpenAI server, the daemon.
speech_models = conversation_lab.speech_models
fake_llm = conversation_lab.fake_llm
lab_daemon = conversation_lab.lab_daemon

pytestmark = pytest.mark.asterisk

HOURS = "We are open from nine to five."
SATURDAYS = "Yes, we are open on Saturdays until noon."
RETURN_LINE = "Welcome back. Is there anything else I can help you with?"


async def set_up(api: Api, lab: Any, **handback: Any) -> None:
    """The conversation lab's assistant and trunk, with its hand-back settings."""
    await provision(api, lab.uas_port, "openai", "Acme, how can I help?")
    (assistant,) = (await api.ok("GET", "/assistants"))["data"]
    body = {"handback": {"message": RETURN_LINE, **handback}}
    await api.ok("PATCH", f"/assistants/{assistant['id']}", body)


async def talk_then_transfer(api: Api, call: Call, fake_llm: FakeOpenAI) -> dict[str, Any]:
    """A first question answered, then the control API bridges the caller to the UAS."""
    fake_llm.script(Reply(text=HOURS), Reply(text=SATURDAYS))
    await call.dial()
    assert call.id is not None
    await greeting_done(call.caller_rtp)
    await say(call.caller_rtp, "What are your opening hours?")
    await wait_transcript(api, call.id, "assistant", count=2)
    transfer = {"type": "transfer", "destination": SALES, "mode": "bridge"}
    await api.ok("POST", f"/calls/{call.id}/control", transfer)
    done = await transfer_settled(api, call.id)
    assert done["transfers"][-1]["state"] == "bridged", done["transfers"][-1]
    # Caller and destination hear each other (the destination's peer latches Asterisk's
    # address from the caller's audio, so it can press keys later).
    await call.caller_rtp.send_tone(440, 0.5)
    assert await call.dest_rtp.wait_for_packet(timeout=5), "no media from the bridged caller"
    return done


async def returned(api: Api, call_id: str) -> dict[str, Any]:
    async def back() -> dict[str, Any] | None:
        data = await api.ok("GET", f"/calls/{call_id}")
        last = data["transfers"][-1]
        kinds = [e["type"] for e in data["events"]]
        attached = "transfer.returned" in kinds and (
            "media.attached" in kinds[kinds.index("transfer.returned") :]
        )  # the assistant's media is back, not only the record
        return (
            data
            if data["status"] == "active" and last["state"] == "returned" and attached
            else None
        )

    return await wait_for(back, "the caller back with the assistant", timeout=20)


async def assert_resumed(
    api: Api, call: Call, fake_llm: FakeOpenAI, since: float, by: str
) -> dict[str, Any]:
    """The caller heard the return line, and a new question is answered by a model that
    knows of the hand back and still has the first question."""
    assert call.id is not None
    data = await returned(api, call.id)
    transfer = data["transfers"][-1]
    assert transfer["returned"]["by"] == by and transfer["returned"]["at"]
    assert [h["state"] for h in transfer["history"]][-2:] == ["bridged", "returned"]
    kinds = [e["type"] for e in data["events"]]
    back = kinds.index("transfer.returned")
    assert kinds[back + 1] == "call.resumed" and "media.attached" in kinds[back:]

    async def line_heard() -> bool:
        return call.caller_rtp.loud_since(since) is not None and call.caller_rtp.went_quiet(0.6)

    await wait_for(line_heard, "the return line to play to the caller", timeout=20)
    assert "anything else" in await heard_text(call, since)

    asked = time.monotonic()
    await say(call.caller_rtp, "Are you open on Saturdays?")
    rows = await wait_transcript(api, call.id, "assistant", count=3)
    assert rows[-1]["text"] == SATURDAYS
    messages = fake_llm.requests[-1]["messages"]
    contents = " ".join(str(m.get("content") or "") for m in messages)
    assert "handed back" in contents and "opening hours" in contents.lower()
    assert messages[-1]["role"] == "user" and "saturday" in messages[-1]["content"].lower()

    async def answer_heard() -> bool:
        spoken = call.caller_rtp.loud_since(asked + 0.1)
        return spoken is not None and call.caller_rtp.went_quiet(0.6)

    await wait_for(answer_heard, "the answer to play to the caller", timeout=20)
    assert "saturday" in await heard_text(call, asked)
    return data


async def heard_text(call: Call, since: float) -> str:
    """What reached the caller's phone since `since`, as whisper hears it."""
    pcm = call.caller_rtp.received_pcm(since=since)
    return (await WhisperStt().transcribe(pcm, 8000)).text.lower()


async def test_rest_return_brings_the_caller_back_and_the_conversation_resumes(
    asterisk_lab: Any, lab_daemon: Any, fake_llm: FakeOpenAI
) -> None:
    _, api = lab_daemon
    async with Call(asterisk_lab, api, "uas_answer.xml") as call:
        await set_up(api, asterisk_lab)
        await talk_then_transfer(api, call, fake_llm)
        since = time.monotonic()
        reply = await api.ok("POST", f"/calls/{call.id}/control", {"type": "return"})
        assert reply["accepted"] == "return"
        data = await assert_resumed(api, call, fake_llm, since, "api")
        # The destination's leg was hung up: the UAS got Asterisk's BYE.
        await asyncio.wait_for(call.uas.wait(), 10)
        assert call.uas.received_requests("BYE"), "the destination was left up"
        assert "call.resumed" in [e["type"] for e in data["events"]]
        # Returned twice: 409 naming why.
        status, body = await api.request("POST", f"/calls/{call.id}/control", {"type": "return"})
        assert status == 409 and "no bridged transfer" in body["error"]["message"]


async def test_the_destination_pressing_the_code_hands_the_caller_back(
    asterisk_lab: Any, lab_daemon: Any, fake_llm: FakeOpenAI
) -> None:
    _, api = lab_daemon
    async with Call(asterisk_lab, api, "uas_answer.xml") as call:
        await set_up(api, asterisk_lab, dtmf="#1")
        await talk_then_transfer(api, call, fake_llm)
        # The caller's own `#1` is not the agent's: nothing happens.
        await call.caller_rtp.send_dtmf("#1")
        current = await api.ok("GET", f"/calls/{call.id}")
        assert current["status"] == "transferred"
        since = time.monotonic()
        await call.dest_rtp.send_dtmf("#1")
        data = await assert_resumed(api, call, fake_llm, since, "agent_dtmf")
        assert data["transfers"][-1]["returned"]["detail"] == "#1"
        at = {e["type"]: e["at"] for e in data["events"]}
        assert at["transfer.returned"] > at["transfer.completed"]


async def test_destination_hanging_up_first_returns_the_caller_when_enabled(
    asterisk_lab: Any, lab_daemon: Any, fake_llm: FakeOpenAI
) -> None:
    _, api = lab_daemon
    async with Call(asterisk_lab, api, "uas_answer_then_bye.xml") as call:
        await set_up(api, asterisk_lab, return_on_destination_hangup=True)
        await talk_then_transfer(api, call, fake_llm)
        since = time.monotonic()
        data = await assert_resumed(api, call, fake_llm, since, "destination_hangup")
        assert "transfer.destination_hung_up" in [e["type"] for e in data["events"]]
        assert call.uas.received_responses("BYE"), "the BYE was not the destination's"


async def test_destination_hanging_up_first_hangs_the_caller_up_by_default(
    asterisk_lab: Any, lab_daemon: Any, fake_llm: FakeOpenAI
) -> None:
    _, api = lab_daemon
    async with Call(asterisk_lab, api, "uas_answer_then_bye.xml") as call:
        await set_up(api, asterisk_lab)
        await talk_then_transfer(api, call, fake_llm)
        assert call.id is not None
        await asyncio.wait_for(call.caller.wait(), 15)
        assert call.caller.got_bye(), "the caller was left on a dead bridge"

        async def ended() -> dict[str, Any] | None:
            data = await api.ok("GET", f"/calls/{call.id}")
            return data if data["status"] == "ended" else None

        data = await wait_for(ended, "the call to end")
        assert data["end_reason"] == "destination hung up"
        assert data["transfers"][-1]["state"] == "bridged"


async def test_hand_back_after_a_daemon_restart_while_bridged(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    """The daemon restarts while caller and destination talk; the new process adopts the
    call and its leg, and the destination's `##` still gives the caller back."""
    daemon, api = await start_daemon(asterisk_lab, tmp_path)
    async with LabCall(asterisk_lab, api) as lab_call:
        await setup_directory(api, lab_call.uas, auth=False)
        call = await lab_call.dial(hold_ms=60000)
        await heard_speech(lab_call.caller_rtp, since=0)
        control = f"/calls/{call['id']}/control"
        await api.ok("POST", control, {"type": "transfer", "destination": DESTINATION})
        done = await transfer_settled(api, call["id"])
        assert done["transfers"][-1]["state"] == "bridged"
        await lab_call.caller_rtp.send_tone(440, 0.5)
        assert await lab_call.dest_rtp.wait_for_packet(timeout=5)

        await api.close()
        await daemon.stop()
        daemon, api = await start_daemon(asterisk_lab, tmp_path)
        try:
            resumed = await wait_for(
                lambda: _event(api, call["id"], "call.resumed"), "the call adopted"
            )
            assert resumed["status"] == "transferred"
            since = time.monotonic()
            await lab_call.dest_rtp.send_dtmf("##")
            data = await returned(api, call["id"])
            assert data["transfers"][-1]["returned"]["by"] == "agent_dtmf"
            # The default return line, said through media attached by the new process.
            await wait_for(
                lambda: _said(api, call["id"], "Is there anything else I can help you with?"),
                "the return line said",
            )
            assert await heard_speech(lab_call.caller_rtp, since=since)
            await api.ok("POST", control, {"type": "end_call"})
        finally:
            await api.close()
            await daemon.stop()


async def _event(api: Api, call_id: str, kind: str) -> dict[str, Any] | None:
    data = await api.ok("GET", f"/calls/{call_id}")
    return next((e for e in data["events"] if e["type"] == kind), None)


async def _said(api: Api, call_id: str, text: str) -> bool:
    data = await api.ok("GET", f"/calls/{call_id}")
    return any(e["type"] == "assistant.said" and e["text"] == text for e in data["events"])
