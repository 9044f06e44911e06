"""The conversation around a transfer: the "transfer started" signal (contract 3), listening
again after a failed transfer, and tool calls that fail without breaking the call (issue 7,
section 3)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bridge.agent.voice import VoiceAgent
from bridge.calls.model import CallStatus, TransferCommand
from bridge.lab.harness import wait_for
from bridge.llm.base import Finished, LlmTimeout, TextDelta
from bridge.llm.openai_compat import OpenAICompatLlm
from bridge.pbx.ports import LegFailed, LegOutcome
from tests.support.agent import (
    FakeSession,
    ScriptedLlm,
    ScriptedStt,
    Step,
    failed_transfer,
    make_agent,
    make_assistant,
    speak,
)
from tests.support.fake_openai import FakeOpenAI, FakeToolCall, Reply, unanswered_tool_calls


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition (polling), failing the test if it never holds."""
    await wait_for(check, "condition", timeout=timeout, every=0.005)


def texts(session: FakeSession) -> list[str]:
    return [t for t, _ in session.said]


class SignallingSession(FakeSession):
    """Calls `on_transfer_started` when a transfer is accepted, as `CallSession.start_transfer`
    does (contract 3)."""

    agent: VoiceAgent | None = None

    async def command(self, command: Any, *, source: str = "api", label: str | None = None) -> Any:
        reply = await super().command(command, source=source, label=label)
        if isinstance(command, TransferCommand) and self.agent is not None:
            self.agent.on_transfer_started()
        return reply


API_TRANSFER = TransferCommand(
    type="transfer", destination="+31687654321", message="Putting you through."
)


async def test_api_transfer_mid_reply_cancels_the_rest_of_the_reply() -> None:
    session = SignallingSession(make_assistant(first_message=None), play_s=30)
    llm = ScriptedLlm(
        Step(
            [*(TextDelta(p) for p in ("One. ", "Two. ", "Three. ", "Four. ")), Finished("stop")],
            delay=0.1,
        )
    )
    agent = make_agent(session, llm, ScriptedStt("tell me everything"))
    session.agent = agent
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: texts(session) == ["One."])
    first = session.media.playouts[0]  # type: ignore[union-attr]
    await session.command(API_TRANSFER, source="api")
    await until(lambda: llm.abandoned == 1)  # the LLM stream was dropped
    assert first.done.done() and first.done.result() is False  # queued audio flushed
    assert texts(session) == ["One.", "Putting you through."]
    kept = session.media.playouts[1]  # type: ignore[union-attr]
    assert not kept.done.done()  # the transfer message (uninterruptible) plays on
    cancelled = [d for k, d in session.events if k == "agent.turn_cancelled"]
    assert cancelled == [{"reason": "transfer", "dropped": 1, "thinking": True}]
    await agent.close()


async def test_no_turn_during_a_transfer_and_listening_again_after_it_fails() -> None:
    session = SignallingSession(make_assistant(first_message=None))
    llm = ScriptedLlm(
        Step([TextDelta("Sorry, they are busy. Anything else?"), Finished("stop")]),
    )
    stt = ScriptedStt("is anyone there", "hello")
    agent = make_agent(session, llm, stt)
    session.agent = agent
    await agent.start(resumed=False)
    await session.command(API_TRANSFER, source="api")
    # The status is still ACTIVE here (the session may change it after the signal): the
    # signal alone stops the listening.
    session.call.status = CallStatus.ACTIVE
    await speak(agent)  # the caller talks over the ringback
    await until(lambda: agent._inbox.empty())
    assert stt.prompts == [] and llm.requests == []
    # The transfer fails; the session calls back once the caller is active with media.
    agent.on_transfer_result(failed_transfer(LegOutcome.BUSY))
    await speak(agent)
    await until(lambda: "Anything else?" in texts(session))
    assert len(stt.prompts) == 1  # only the turn after the result
    request = llm.requests[0]
    assert [m.role for m in request] == ["system", "system", "user"]
    assert "failed" in (request[1].content or "") and '"busy"' in (request[1].content or "")
    await agent.close()


async def test_the_assistants_own_transfer_is_not_cancelled_by_its_signal() -> None:
    session = SignallingSession(make_assistant(first_message=None))
    llm = ScriptedLlm(
        Step([TextDelta("Sure. "), _transfer_call("sales_team"), Finished("tool_calls")]),
        Step([TextDelta("Sales is busy. Can I help instead?"), Finished("stop")]),
    )
    agent = make_agent(session, llm, ScriptedStt("sales please", "okay"))
    session.agent = agent
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: len(session.commands) == 1)
    await until(lambda: agent._turn is not None and agent._turn.done())
    assert not agent._turn.cancelled()  # type: ignore[union-attr]
    assert texts(session) == ["Sure.", "I'm transferring you to our sales team."]
    session.call.status = CallStatus.ACTIVE
    agent.on_transfer_result(failed_transfer())
    await speak(agent)
    await until(lambda: len(llm.requests) == 2)
    second = llm.requests[1]
    assert [m.role for m in second] == ["system", "user", "assistant", "tool", "user"]
    assert json.loads(second[3].content or "")["outcome"] == "busy"
    await agent.close()


def _transfer_call(destination: str, call_id: str = "call_1", **extra: str) -> Any:
    from bridge.llm.base import ToolCall, ToolCallEvent

    return ToolCallEvent(
        ToolCall(call_id, "transfer_call", json.dumps({"destination": destination, **extra}))
    )


# --- tool calls that fail: every call answered, barge-in back (real OpenAI protocol) -------


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def openai_llm(fake: FakeOpenAI) -> AsyncIterator[OpenAICompatLlm]:
    provider = OpenAICompatLlm(
        base_url=fake.base_url,
        model="gpt-test",
        api_key="test-key",
        first_token_timeout=2.0,
        total_timeout=5.0,
    )
    yield provider
    await provider.aclose()


def _assistant_without_messages() -> Any:
    """Destinations without a configured message: the model's own preface is used."""
    assistant = make_assistant(first_message=None)
    for tool in assistant.llm_config.tools:  # type: ignore[union-attr]
        for dest in getattr(tool, "destinations", None) or []:
            dest.message = None
    return assistant


def _agent(session: FakeSession, llm: Any, *said: str, **settings: Any) -> VoiceAgent:
    return make_agent(session, llm, ScriptedStt(*said), **settings)  # type: ignore[arg-type]


async def test_a_long_preface_is_answered_and_the_next_request_is_valid(
    fake: FakeOpenAI, openai_llm: OpenAICompatLlm
) -> None:
    session = FakeSession(_assistant_without_messages())
    preface = "Please hold while I connect you. " * 40  # > 1000 characters
    fake.script(
        Reply(
            tool_calls=[
                FakeToolCall("transfer_call", {"destination": "sales_team", "message": preface})
            ]
        ),
        Reply(text="Let me try that again."),
        Reply(text="Anything else?"),
    )
    agent = _agent(session, openai_llm, "sales please", "hello")
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: "Let me try that again." in texts(session))
    await speak(agent)
    await until(lambda: "Anything else?" in texts(session))
    assert len(fake.requests) == 3
    for body in fake.requests:
        assert unanswered_tool_calls(body["messages"]) == []
    result = fake.requests[1]["messages"][-1]
    assert result["role"] == "tool" and result["tool_call_id"] == "call_fake0001"
    assert "characters long" in result["content"]  # the model is told to shorten it
    assert session.commands == []
    await agent.close()


async def test_a_transfer_that_raises_answers_the_call_and_restores_barge_in(
    fake: FakeOpenAI, openai_llm: OpenAICompatLlm
) -> None:
    session = FakeSession(make_assistant(first_message=None), play_s=30)
    session.command_error = ValueError("message: text the caller cannot hear")
    fake.script(
        Reply(tool_calls=[FakeToolCall("transfer_call", {"destination": "sales_team"})]),
        Reply(
            text="I could not transfer you. I can take a message. Or call back later.",
            text_pieces=3,
        ),
    )
    agent = _agent(session, openai_llm, "sales please")
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: len(session.said) >= 1 and len(fake.requests) == 2)
    assert unanswered_tool_calls(fake.requests[1]["messages"]) == []
    result = json.loads(fake.requests[1]["messages"][-1]["content"])
    assert result["transferred"] is False and "cannot hear" in result["cause"]
    await until(lambda: session.media is not None and session.media.playing)
    await speak(agent, ms=300, then_silence_ms=0)  # the caller talks over the reply
    await until(lambda: session.media is not None and session.media.flushes == 1)
    assert any(k == "agent.barge_in" for k, _ in session.events)
    await agent.close()


async def test_llm_failure_with_a_preface_the_command_refuses_still_apologises() -> None:
    """transfer_first: the apology plus the destination's message is too long for a
    TransferCommand; the caller hears the apology and barge-in still works."""
    session = FakeSession(make_assistant(first_message=None), play_s=30)
    apology = "Sorry, I'm having trouble right now. " * 27  # ~1000 characters
    llm = ScriptedLlm(Step(error=LlmTimeout("slow", phase="first_token")))
    agent = make_agent(session, llm, ScriptedStt("hello"), llm_failure_message=apology)
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: (apology, True) in session.said)
    assert session.commands == []
    assert not agent._committed
    await speak(agent, ms=300, then_silence_ms=0)
    await until(lambda: session.media is not None and session.media.flushes == 1)
    await agent.close()


async def test_a_fallback_chain_answers_the_tool_call_once_with_every_attempt() -> None:
    """Issue 9 §3: the assistant's destination has a fallback; both are busy. The tool call
    (which the command's reply names by the chain's first transfer) gets one result, after
    the last attempt, listing both; the failure line is said once."""
    assistant = make_assistant(first_message=None)
    tool = assistant.llm_config.tools[0]
    first, second = tool.destinations  # type: ignore[union-attr]
    first.fallbacks = [second]
    session = SignallingSession(assistant)
    llm = ScriptedLlm(
        Step([TextDelta("Sure. "), _transfer_call("sales_team"), Finished("tool_calls")]),
        Step([TextDelta("Both lines are busy. Can I help instead?"), Finished("stop")]),
    )
    agent = make_agent(session, llm, ScriptedStt("sales please", "okay"))
    session.agent = agent
    session.conversation = agent
    await agent.start(resumed=False)
    await speak(agent)
    for attempt in (1, 2):
        await until(lambda n=attempt: len(session.pbx.verbs("originate")) == n)  # type: ignore[misc]
        leg = session.leg
        assert leg is not None
        session.post(LegFailed(leg, 17, "User busy", 486))
    await until(lambda: session.call.status is CallStatus.ACTIVE and not agent._pending)
    await speak(agent)
    await until(lambda: len(llm.requests) == 2)
    tool_results = [m for m in llm.requests[1] if m.role == "tool"]
    assert len(tool_results) == 1
    result = json.loads(tool_results[0].content or "")
    assert result["outcome"] == "busy"
    assert [a["destination"] for a in result["attempts"]] == [first.number, second.number]
    failure = session.service.settings.transfer.busy_message
    assert texts(session).count(failure) == 1
    await agent.close()
