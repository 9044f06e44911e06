"""A warm transfer's brief written by the assistant's model (issue 9 §2), on the real Asterisk
with real speech: the SIPp caller talks to the assistant (whisper + silero in the daemon, the
fake OpenAI server as its model), the control API transfers it warm without a brief, and the
agent's phone (the UAS's RTP peer) must HEAR the model's brief (whisper transcribes it).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from bridge.llm.brief import BRIEF_INSTRUCTION
from bridge.speech.whisper import WhisperStt
from tests.integration.test_conversation_asterisk import (  # and the lab's fixtures
    SALES,
    SYSTEM_PROMPT,
    Call,
    fake_llm,  # noqa: F401
    greeting_done,
    lab_daemon,  # noqa: F401
    provision,
    say,
    speech_models,  # noqa: F401
    wait_transcript,
)
from tests.support.fake_openai import FakeOpenAI, Reply
from tests.support.flows import transfer_settled

pytestmark = pytest.mark.asterisk

OPENING = "We open at nine every weekday."
# "warehouse" is in no other text of the call: heard at the agent, it is the model's brief.
WRITTEN = "Jane Doe is calling about opening hours before she visits the warehouse."


async def test_the_agent_hears_the_brief_the_model_wrote(
    asterisk_lab: Any,
    lab_daemon: Any,  # noqa: F811
    fake_llm: FakeOpenAI,  # noqa: F811
) -> None:
    _, api = lab_daemon
    fake_llm.script(Reply(text=OPENING), Reply(text=WRITTEN))
    async with Call(asterisk_lab, api, "uas_answer.xml") as call:
        await provision(api, asterisk_lab.uas_port, "openai", "Acme, how can I help?")
        await call.dial()
        assert call.id is not None
        await greeting_done(call.caller_rtp)
        await say(call.caller_rtp, "What are your opening hours?")
        await wait_transcript(api, call.id, "assistant", count=2)
        since = time.monotonic()
        command = {"type": "transfer", "destination": SALES, "mode": "warm"}
        await api.ok("POST", f"/calls/{call.id}/control", command)
        done = await transfer_settled(api, call.id)
        assert done["transfers"][-1]["state"] == "bridged", done["transfers"][-1]
        (briefing,) = [e for e in done["events"] if e["type"] == "transfer.warm_briefing"]
        assert briefing["brief_source"] == "llm" and briefing["brief"] == WRITTEN

        # The model was asked for the brief with the conversation's words only.
        request = fake_llm.requests[-1]
        assert request["messages"][0] == {"role": "system", "content": BRIEF_INSTRUCTION}
        assert "tools" not in request and SYSTEM_PROMPT not in json.dumps(request)
        assert "opening hours" in request["messages"][-1]["content"].lower()

        # The brief played (the transfer bridged after it): what reached the agent's phone.
        pcm = call.dest_rtp.received_pcm(since=since)
        heard = (await WhisperStt().transcribe(pcm, 8000)).text.lower()
        assert "warehouse" in heard, heard
