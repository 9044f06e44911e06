"""The warm transfer's brief written by the assistant's model (issue 9 §2): a real session and
store, the PBX faked, the model a real OpenAI-protocol server on loopback (`FakeOpenAI`).

The model's brief is used when it comes within `[transfer] brief_summary_timeout`; a slow
model, an error, an empty reply or the offline `local` provider leave the transcript brief;
a configured brief never asks the model. Which one was spoken is in `transfer.warm_briefing`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.agent.dialogue import Dialogue
from bridge.agent.voice import VoiceAgent
from bridge.calls.model import CallStatus
from bridge.calls.session import CallSession
from bridge.llm.base import ChatMessage, LlmProvider, ToolCall
from bridge.llm.brief import BRIEF_INSTRUCTION, MAX_BRIEF, brief_request, speakable_brief
from bridge.llm.local import LocalRouter
from bridge.llm.openai_compat import OpenAICompatLlm
from bridge.pbx.ports import LegAnswered
from tests.support.calls import CallEnv, RecordingConversation, open_env
from tests.support.fake_openai import FakeOpenAI, Reply

SECRET = "SYSTEM PROMPT: internal discount code 7781"
HISTORY = [
    ChatMessage.system(SECRET),
    ChatMessage.assistant("Hello, Acme here. How can I help?"),
    ChatMessage.user("Hi, this is Anna Berg, invoice 42 charged me twice."),
    ChatMessage.assistant(
        None, [ToolCall("call_1", "transfer_call", '{"destination": "billing"}')]
    ),
]
WRITTEN = "Anna Berg is calling because invoice 42 was charged twice."


class ModelConversation(RecordingConversation):
    """A conversation whose assistant has a model: `brief_summary` is `VoiceAgent`'s own."""

    brief_summary = VoiceAgent.brief_summary

    def __init__(self, session: CallSession, llm: LlmProvider) -> None:
        super().__init__(session)
        self.dialogue = Dialogue(None, llm)
        self.history = list(HISTORY)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


async def open_with(tmp_path: Path, llm: LlmProvider, timeout: float = 3.0) -> CallEnv:
    env = await open_env(tmp_path, brief_summary_timeout=timeout)

    def factory(session: CallSession) -> ModelConversation:
        conversation = ModelConversation(session, llm)
        env.conversations.append(conversation)
        return conversation

    env.service.conversation_factory = factory
    return env


@pytest.fixture
async def model(fake: FakeOpenAI) -> AsyncIterator[OpenAICompatLlm]:
    llm = OpenAICompatLlm(base_url=fake.base_url, model="gpt-test", api_key="test-key")
    yield llm
    await llm.aclose()


async def briefed(env: CallEnv, **fields: Any) -> dict[str, Any]:
    """A warm transfer (no accept key) answered at once: the `transfer.warm_briefing` event,
    once the caller joined the destination."""
    session = await env.arrive()
    await session.record("transcript", role="caller", text="Invoice 42 was charged twice.")
    transfer = await env.transfer(session, mode="warm", summary="Billing", **fields)
    assert transfer.leg_id is not None
    await env.push(LegAnswered(transfer.leg_id))
    stored = await env.wait_status(session.call.id, CallStatus.TRANSFERRED)
    events = [e for e in stored["events"] if e["type"] == "transfer.warm_briefing"]
    assert len(events) == 1
    plan = stored["transfers"][-1]["warm"]  # the record's plan says what was heard
    assert (plan["brief"], plan["brief_source"]) == (events[0]["brief"], events[0]["brief_source"])
    return dict(events[0])


TRANSCRIPT_BRIEF = (
    "A caller from +31655501234 is being transferred to you. About: Billing. "
    "They said: Invoice 42 was charged twice."
)


async def test_the_models_brief_is_spoken_to_the_destination(
    tmp_path: Path, fake: FakeOpenAI, model: OpenAICompatLlm
) -> None:
    fake.script(Reply(text=WRITTEN))
    env = await open_with(tmp_path, model)
    try:
        event = await briefed(env)
        assert event["brief_source"] == "llm" and event["brief"] == WRITTEN
        assert WRITTEN in env.tts.texts and TRANSCRIPT_BRIEF not in env.tts.texts
    finally:
        await env.close()
    # The model saw the conversation's words only: no system prompt, no tools.
    (request,) = fake.requests
    sent = str(request["messages"])
    assert "tools" not in request and SECRET not in sent and "transfer_call" not in sent
    assert "invoice 42 charged me twice" in sent and "How can I help?" in sent


async def test_a_model_slower_than_the_budget_leaves_the_transcript_brief(
    tmp_path: Path, fake: FakeOpenAI, model: OpenAICompatLlm
) -> None:
    fake.script(Reply(text=WRITTEN, hang=True))  # headers, then nothing
    env = await open_with(tmp_path, model, timeout=0.3)
    try:
        event = await briefed(env)  # waits at most 5 s: the model would never answer
        assert event["brief_source"] == "transcript" and event["brief"] == TRANSCRIPT_BRIEF
        assert "within 0.3 s" in event["summary_error"]
        assert TRANSCRIPT_BRIEF in env.tts.texts
        assert len(fake.requests) == 1  # the model was asked
    finally:
        await env.close()


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (Reply(status=500, error_message="overloaded"), "LlmServerError: overloaded"),
        (Reply(text="** ##"), "no usable brief"),  # nothing speakable
    ],
)
async def test_a_failing_or_empty_model_leaves_the_transcript_brief(
    tmp_path: Path, fake: FakeOpenAI, model: OpenAICompatLlm, reply: Reply, error: str
) -> None:
    fake.script(reply)
    env = await open_with(tmp_path, model)
    try:
        event = await briefed(env)
        assert event["brief_source"] == "transcript" and event["brief"] == TRANSCRIPT_BRIEF
        assert error in event["summary_error"]
    finally:
        await env.close()


async def test_the_local_provider_briefs_from_the_transcript(tmp_path: Path) -> None:
    env = await open_with(tmp_path, LocalRouter(use_embeddings=False))
    try:
        event = await briefed(env)
        assert event["brief_source"] == "transcript" and event["brief"] == TRANSCRIPT_BRIEF
    finally:
        await env.close()


async def test_a_configured_brief_wins_without_asking_the_model(
    tmp_path: Path, fake: FakeOpenAI, model: OpenAICompatLlm
) -> None:
    env = await open_with(tmp_path, model)
    try:
        event = await briefed(env, brief="Anna, invoice 42.")
        assert event["brief_source"] == "configured" and event["brief"] == "Anna, invoice 42."
        assert "summary_error" not in event
    finally:
        await env.close()
    assert fake.requests == []


def test_the_request_carries_only_spoken_words_and_the_brief_is_one_short_line() -> None:
    messages = brief_request(HISTORY)
    assert messages is not None and messages[0].content == BRIEF_INSTRUCTION
    assert [m.role for m in messages] == ["system", "user"]
    assert SECRET not in str(messages) and "transfer_call" not in str(messages)
    assert brief_request([ChatMessage.system(SECRET)]) is None  # nobody spoke: no request
    assert speakable_brief("  **Anna**\n calls about   invoice 42. ") == (
        "Anna calls about invoice 42."
    )
    long = speakable_brief("word " * 200)
    assert long is not None and len(long) <= MAX_BRIEF + 1 and long.endswith("word.")
