"""The chat history rebuilt from the stored transcript after a daemon restart."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from bridge.agent.history import history_from_transcript
from bridge.calls.model import CallEvent
from bridge.llm.base import Finished, TextDelta
from tests.support.agent import FakeSession, ScriptedLlm, ScriptedStt, Step, make_agent, speak
from tests.support.calls import until


def row(role: str, text: str, **data: Any) -> CallEvent:
    return CallEvent("transcript", datetime.now(UTC), {"role": role, "text": text, **data})


EVENTS = [
    CallEvent("call.answered", datetime.now(UTC)),
    row("assistant", "Hello, Acme here."),
    row("caller", "sales please"),
    row("assistant", "Sure."),
    row("tool_call", '{"destination": "sales_team"}', tool="transfer_call", call_id="c1"),
    row("tool_result", '{"outcome": "busy"}', tool="transfer_call", call_id="c1"),
    row("caller", "okay then"),
    row("tool_call", '{"destination": "sales_team"}', tool="transfer_call", call_id="c2"),
]


def test_history_is_rebuilt_with_tool_calls_and_their_results() -> None:
    history = history_from_transcript(EVENTS)
    assert [m.role for m in history] == [
        "assistant",
        "user",
        "assistant",
        "tool",
        "user",
        "assistant",
        "tool",
    ]
    assert history[2].content == "Sure." and history[2].tool_calls[0].id == "c1"
    assert history[2].tool_calls[0].name == "transfer_call"
    assert history[3].tool_call_id == "c1" and history[3].content == '{"outcome": "busy"}'
    # The call whose result died with the old process gets an explicit unknown outcome.
    assert history[5].content is None and history[5].tool_calls[0].id == "c2"
    assert json.loads(history[6].content or "")["outcome"] == "unknown"


async def test_resumed_agent_carries_on_the_conversation() -> None:
    session = FakeSession()
    llm = ScriptedLlm(Step([TextDelta("Anything else?"), Finished("stop")]))

    async def load() -> list[CallEvent]:
        return EVENTS[:7]

    agent = make_agent(session, llm, ScriptedStt("what now"), load_events=load)
    await agent.start(resumed=True)
    assert session.said == []  # no second greeting
    await speak(agent)
    await until(lambda: llm.requests, "the request to the model")
    roles = [m.role for m in llm.requests[0]]
    assert roles == ["system", "assistant", "user", "assistant", "tool", "user", "user"]
    assert llm.requests[0][-1].content == "what now"
    await agent.close()
