"""The OpenAI-compatible provider against a real loopback HTTP server speaking the protocol."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from bridge.llm.base import (
    ChatMessage,
    Finished,
    LlmAuthError,
    LlmBadRequest,
    LlmConnectionError,
    LlmRateLimited,
    LlmServerError,
    LlmTimeout,
    TextDelta,
    ToolCall,
    ToolCallEvent,
    collect,
)
from bridge.llm.openai_compat import OpenAICompatLlm
from bridge.llm.tools import Toolset, TransferIntent
from tests.support.calls import until
from tests.support.fake_openai import FakeOpenAI, FakeToolCall, Reply

TOOLS = [
    {
        "type": "transfer_call",
        "destinations": [
            {"type": "number", "number": "+31612345678", "description": "Sales team - pricing"},
            {"type": "number", "number": "+31687654321", "description": "Technical support"},
        ],
    },
    {"type": "end_call"},
]
MESSAGES = [ChatMessage.system("You are a receptionist."), ChatMessage.user("Sales please")]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def llm(fake: FakeOpenAI) -> AsyncIterator[OpenAICompatLlm]:
    provider = OpenAICompatLlm(
        base_url=fake.base_url,
        model="gpt-test",
        api_key="test-key",
        first_token_timeout=1.0,
        total_timeout=3.0,
    )
    yield provider
    await provider.aclose()


async def test_streams_text_deltas_in_order(fake: FakeOpenAI, llm: OpenAICompatLlm) -> None:
    fake.script(Reply(text="Hello, how can I help you today?", text_pieces=5))
    events = [e async for e in llm.stream(MESSAGES)]
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert len(deltas) == 5
    assert "".join(deltas) == "Hello, how can I help you today?"
    assert events[-1] == Finished("stop")
    body = fake.requests[0]
    assert body["stream"] is True and body["model"] == "gpt-test"
    assert body["messages"][1] == {"role": "user", "content": "Sales please"}
    assert "tools" not in body
    assert fake.headers[0]["Authorization"] == "Bearer test-key"


async def test_tool_call_fragments_are_assembled_and_parse(
    fake: FakeOpenAI, llm: OpenAICompatLlm
) -> None:
    toolset = Toolset.from_assistant_tools(TOOLS)
    fake.script(
        Reply(
            text="Let me connect you.",
            tool_calls=[FakeToolCall("transfer_call", {"destination": "sales_team"}, "call_A")],
            arg_pieces=4,
        )
    )
    text, calls, reason = await collect(llm.stream(MESSAGES, toolset.specs))
    assert text == "Let me connect you." and reason == "tool_calls"
    assert calls == [ToolCall("call_A", "transfer_call", '{"destination": "sales_team"}')]
    intent = toolset.parse(calls[0])
    assert isinstance(intent, TransferIntent) and intent.destination.target == "+31612345678"
    sent = fake.requests[0]["tools"]
    assert sent[0]["type"] == "function"
    assert sent[0]["function"]["parameters"]["properties"]["destination"]["enum"] == [
        "sales_team",
        "technical_support",
    ]
    assert fake.requests[0]["tool_choice"] == "auto"


async def test_two_parallel_tool_calls_keep_their_index(
    fake: FakeOpenAI, llm: OpenAICompatLlm
) -> None:
    fake.script(
        Reply(
            tool_calls=[
                FakeToolCall("transfer_call", {"destination": "technical_support"}, "c1"),
                FakeToolCall("end_call", {"reason": "done"}, "c1"),
            ]
        )
    )
    events = [e async for e in llm.stream(MESSAGES)]
    calls = [e.call for e in events if isinstance(e, ToolCallEvent)]
    assert [c.name for c in calls] == ["transfer_call", "end_call"]
    assert [c.id for c in calls] == ["c1", "c1_1"]
    assert json.loads(calls[1].arguments) == {"reason": "done"}
    assert isinstance(events[-1], Finished)


async def test_history_with_tool_results_is_sent_in_openai_shape(
    fake: FakeOpenAI, llm: OpenAICompatLlm
) -> None:
    call = ToolCall("call_9", "transfer_call", '{"destination":"nowhere"}')
    history = [
        *MESSAGES,
        ChatMessage.assistant(None, [call]),
        ChatMessage.tool("call_9", "'nowhere' is not a destination."),
    ]
    await collect(llm.stream(history))
    sent = fake.requests[0]["messages"]
    assert sent[2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_9",
                "type": "function",
                "function": {"name": "transfer_call", "arguments": '{"destination":"nowhere"}'},
            }
        ],
    }
    assert sent[3] == {
        "role": "tool",
        "content": "'nowhere' is not a destination.",
        "tool_call_id": "call_9",
    }


async def test_first_token_timeout(fake: FakeOpenAI, llm: OpenAICompatLlm) -> None:
    llm.first_token_timeout = 0.2
    # The token comes after 30 s: only the timeout ends the request before it (a bound far
    # from both, so a loaded machine cannot fail it, and a missing timeout cannot pass).
    fake.script(Reply(text="late", first_token_delay=30.0))
    started = time.monotonic()
    with pytest.raises(LlmTimeout) as err:
        await collect(llm.stream(MESSAGES))
    assert err.value.phase == "first_token" and err.value.retryable
    assert time.monotonic() - started < 10


async def test_hang_before_headers_is_a_first_token_timeout(
    fake: FakeOpenAI, llm: OpenAICompatLlm
) -> None:
    llm.first_token_timeout = 0.2
    fake.script(Reply(hang=True))
    with pytest.raises(LlmTimeout, match="no first token"):
        await collect(llm.stream(MESSAGES))


async def test_total_timeout_after_first_token(fake: FakeOpenAI, llm: OpenAICompatLlm) -> None:
    llm.total_timeout = 0.4
    fake.script(Reply(text="Hello there, this never ends", hang_after_first=True))
    seen: list[str] = []
    with pytest.raises(LlmTimeout) as err:
        async for event in llm.stream(MESSAGES):
            if isinstance(event, TextDelta):
                seen.append(event.text)
    assert err.value.phase == "total"
    assert seen  # the first piece arrived before the stall


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, LlmBadRequest),
        (404, LlmBadRequest),
        (429, LlmRateLimited),
        (500, LlmServerError),
        (503, LlmServerError),
    ],
)
async def test_http_errors_are_typed(
    fake: FakeOpenAI, llm: OpenAICompatLlm, status: int, error: type[Exception]
) -> None:
    fake.script(Reply(status=status, error_message="The model `gpt-x` does not exist"))
    with pytest.raises(error, match="does not exist") as info:
        await collect(llm.stream(MESSAGES))
    assert getattr(info.value, "status", None) == status


async def test_wrong_key_is_an_auth_error(fake: FakeOpenAI) -> None:
    llm = OpenAICompatLlm(base_url=fake.base_url, model="m", api_key="wrong")
    with pytest.raises(LlmAuthError, match="Incorrect API key") as info:
        await collect(llm.stream(MESSAGES))
    assert not info.value.retryable
    await llm.aclose()


async def test_azure_style_key_header_and_api_version(fake: FakeOpenAI) -> None:
    llm = OpenAICompatLlm(
        base_url=fake.base_url, model="m", api_key="test-key", api_version="2024-06-01"
    )
    text, _, _ = await collect(llm.stream(MESSAGES))
    assert text == "Hello from the fake model."
    assert fake.headers[0]["api-key"] == "test-key" and "Authorization" not in fake.headers[0]
    await llm.aclose()


async def test_connection_refused_is_typed() -> None:
    llm = OpenAICompatLlm(base_url="http://127.0.0.1:9/v1", model="m", first_token_timeout=2)
    with pytest.raises(LlmConnectionError):
        await collect(llm.stream(MESSAGES))
    await llm.aclose()


async def test_abandoning_the_stream_releases_the_connection(
    fake: FakeOpenAI, llm: OpenAICompatLlm
) -> None:
    # Barge-in: the consumer stops after the first delta; the next request still works.
    fake.script(
        Reply(text="A long answer " * 20, text_pieces=20, chunk_delay=0.05), Reply(text="Again.")
    )
    stream = llm.stream(MESSAGES)
    async for _event in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    text, _, _ = await asyncio.wait_for(collect(llm.stream(MESSAGES)), 2)
    assert text == "Again."
    await until(lambda: fake.disconnects, "the server to see the abandoned stream go")
    assert fake.disconnects == 1
