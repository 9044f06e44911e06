"""The LLM provider interface: chat messages in, a stream of text deltas and tool calls out.

Providers differ (an OpenAI-compatible server, the local router); the conversation code only
sees `LlmProvider.stream()`. Timeouts are the caller's policy, but a provider raises typed
errors (`LlmTimeout`, `LlmError` subclasses) rather than transport exceptions, so the caller
can decide to retry, apologise or transfer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ToolCall:
    """A complete function call requested by the model; `arguments` is the raw JSON text."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class Knowledge:
    """One entry of an assistant's knowledge: an answer, and the question it answers (a fact
    alone has none)."""

    answer: str
    question: str | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # role "tool": which call this result answers
    # A system message carrying the assistant's knowledge also holds it as entries, for
    # providers that do not read prose (the local router); a remote model gets `content`.
    knowledge: tuple[Knowledge, ...] = ()

    @classmethod
    def system(cls, text: str) -> ChatMessage:
        return cls("system", text)

    @classmethod
    def user(cls, text: str) -> ChatMessage:
        return cls("user", text)

    @classmethod
    def assistant(cls, text: str | None, tool_calls: Sequence[ToolCall] = ()) -> ChatMessage:
        return cls("assistant", text, tuple(tool_calls))

    @classmethod
    def tool(cls, tool_call_id: str, content: str) -> ChatMessage:
        return cls("tool", content, tool_call_id=tool_call_id)

    def to_openai(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call. `choices` (key → description) is for providers that do
    not read JSON Schema, such as the local router; it is not sent to a remote model."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    choices: Mapping[str, str] = field(default_factory=dict)

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": json.loads(json.dumps(self.parameters)),
            },
        }


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextDelta:
    """A piece of the reply to speak; deltas concatenate into the full text."""

    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """A tool call, emitted once its arguments are complete."""

    call: ToolCall


@dataclass(frozen=True)
class Finished:
    """The model is done; `reason` as the server said it ("stop", "tool_calls", "length")."""

    reason: str | None


LlmEvent = TextDelta | ToolCallEvent | Finished


# --- errors ---------------------------------------------------------------------------------


class LlmError(Exception):
    """The model could not answer. `retryable` tells whether trying again may help."""

    retryable = False

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class LlmTimeout(LlmError):
    """No first token, or no end of stream, in time. `phase` says which."""

    retryable = True

    def __init__(self, message: str, *, phase: Literal["first_token", "total"]) -> None:
        super().__init__(message)
        self.phase = phase


class LlmConnectionError(LlmError):
    retryable = True


class LlmAuthError(LlmError):
    """401/403: a wrong or missing key; retrying will not help."""


class LlmBadRequest(LlmError):
    """400/404/422: the server refused the request (unknown model, bad tool schema)."""


class LlmRateLimited(LlmError):
    retryable = True


class LlmServerError(LlmError):
    retryable = True


class LlmProtocolError(LlmError):
    """The server's stream did not follow the protocol."""


class LlmProvider(Protocol):
    name: str

    def stream(
        self, messages: Sequence[ChatMessage], tools: Sequence[FunctionTool] = ()
    ) -> AsyncIterator[LlmEvent]:
        """Generate the assistant's next turn. Stop iterating to abandon it (barge-in)."""
        ...

    async def summarize(self, history: Sequence[ChatMessage]) -> str | None:
        """A one- or two-sentence brief of the conversation for the person taking a warm
        transfer (`bridge.llm.brief`), or None when this provider cannot write one (the
        transfer then briefs from the transcript). The caller bounds the time."""
        ...

    async def aclose(self) -> None: ...


async def collect(events: AsyncIterator[LlmEvent]) -> tuple[str, list[ToolCall], str | None]:
    """Drain a stream into (text, tool calls, finish reason); for tests and simple callers."""
    text: list[str] = []
    calls: list[ToolCall] = []
    reason: str | None = None
    async for event in events:
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, ToolCallEvent):
            calls.append(event.call)
        else:
            reason = event.reason
    return "".join(text), calls, reason
