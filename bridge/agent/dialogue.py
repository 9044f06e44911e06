"""`Dialogue`: the text part of a conversation, shared by a call and the chat console.

It holds what the model sees (the system prompt built from the assistant, its knowledge, the
history), asks the model for a reply (streamed), turns the model's tool calls into intents
and gives every call its tool result. What a reply *does* is the host's business: a
`VoiceAgent` speaks sentences and sends transfer / end-call commands through the call's
session; the chat console (`bridge/agent/chat.py`) collects the sentences and reports the
actions without executing them. Both run this same code, so what the console shows is what a
caller would get, minus the audio.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from bridge.agent.sentences import SentenceSplitter
from bridge.llm.base import ChatMessage, Knowledge, LlmProvider, TextDelta, ToolCall, ToolCallEvent
from bridge.llm.tools import Destination, EndCallIntent, ToolError, Toolset, TransferIntent

if TYPE_CHECKING:
    from bridge.directory.models import Assistant

DEFAULT_PROMPT = "You are a friendly phone assistant. Answer in one or two short spoken sentences."


class DialogueHost(Protocol):
    """What a `Dialogue` needs from whoever carries the conversation (a call, the console)."""

    @property
    def suspended(self) -> bool:
        """The caller is no longer talking to the assistant (a transfer took them)."""
        ...

    def on_token(self) -> None:
        """The model produced its first text or tool call of this round (for latencies)."""

    def say(self, sentence: str) -> None:
        """One complete sentence of the reply, as soon as the model has written it."""

    async def transcript(self, role: str, text: str, **data: Any) -> None:
        """Record a step (caller, assistant, tool_call, tool_result)."""

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run `coro` in the background (recording that must not delay the turn)."""

    def waiting(self) -> set[str]:
        """Tool call ids whose result comes later (a transfer under way)."""
        ...

    async def transfer(self, intent: TransferIntent, call: ToolCall | None) -> bool:
        """Carry out (or report) a transfer; True if the model must be asked again."""
        ...

    async def end_call(self, call: ToolCall, *, spoke: bool) -> None:
        """Carry out (or report) the end of the call."""

    async def llm_failed(self, exc: BaseException) -> None:
        """The model could not answer: never silence (apologise, fall back)."""


def refused_transfer_result(exc: BaseException) -> dict[str, Any]:
    """The tool result of a transfer that was not started: `refused` with the policy's rule
    when the toll-fraud policy said no (the model may offer another destination), else
    `failed` (the call's state, an invalid command)."""
    details = getattr(exc, "details", None) or {}
    if details.get("rule"):
        return {
            "transferred": False,
            "outcome": "refused",
            "rule": details["rule"],
            "cause": str(exc),
        }
    return {"transferred": False, "outcome": "failed", "cause": str(exc)}


def knowledge_of(assistant: Assistant | None) -> tuple[Knowledge, ...]:
    if assistant is None:
        return ()
    return tuple(Knowledge(k.answer, k.question) for k in assistant.knowledge)


def knowledge_prompt(knowledge: Sequence[Knowledge]) -> str:
    """The knowledge list as text for a language model's system prompt."""
    lines = ["Answer the caller from these facts when they apply (do not transfer for them):"]
    for item in knowledge:
        if item.question:
            lines.append(f"- Q: {item.question}\n  A: {item.answer}")
        else:
            lines.append(f"- {item.answer}")
    return "\n".join(lines)


def system_messages(assistant: Assistant | None) -> list[ChatMessage]:
    """The assistant's configured messages (else a default prompt), then its knowledge as one
    more system message: text for a model, and the structured list for the local router."""
    config = assistant.llm_config if assistant is not None else None
    messages = [ChatMessage(m.role, m.content) for m in (config.messages if config else [])]
    messages = messages or [ChatMessage.system(DEFAULT_PROMPT)]
    knowledge = knowledge_of(assistant)
    if knowledge:
        messages.append(ChatMessage("system", knowledge_prompt(knowledge), knowledge=knowledge))
    return messages


class Dialogue:
    """History, model and tools of one conversation."""

    def __init__(
        self, assistant: Assistant | None, llm: LlmProvider, *, max_tool_rounds: int = 3
    ) -> None:
        config = assistant.llm_config if assistant is not None else None
        self.assistant = assistant
        self.llm = llm
        self.max_tool_rounds = max_tool_rounds
        self.toolset = Toolset.from_assistant_tools(config.tools if config else [])
        self.system = system_messages(assistant)
        self.history: list[ChatMessage] = []

    @property
    def destinations(self) -> list[Destination]:
        return list(self.toolset.destinations.values())

    @property
    def first_message(self) -> str | None:
        return self.assistant.first_message if self.assistant is not None else None

    async def reply(self, host: DialogueHost) -> None:
        """The assistant's answer to the history as it is (the caller's words last): text to
        `host.say`, tool calls to the host's actions, every call answered in the history."""
        for _ in range(self.max_tool_rounds):
            if host.suspended:
                return  # a transfer took the caller meanwhile
            spoken: list[str] = []
            try:
                text, calls = await self._generate(host, spoken)
            except asyncio.CancelledError:
                if spoken:  # barge-in: the model should know what the caller heard of it
                    said = " ".join(spoken)
                    self.history.append(ChatMessage.assistant(said))
                    host.spawn(host.transcript("assistant", said, interrupted=True))
                raise
            except Exception as exc:  # LlmError subclasses, and anything a provider leaks
                await host.llm_failed(exc)
                return
            self.history.append(ChatMessage.assistant(text or None, calls))
            if text:
                await host.transcript("assistant", text)
            if not calls:
                return
            if not await self._run_tools(host, calls, spoke=bool(text)):
                return
        await host.llm_failed(RuntimeError("too many invalid tool calls in one turn"))

    async def _generate(self, host: DialogueHost, spoken: list[str]) -> tuple[str, list[ToolCall]]:
        splitter = SentenceSplitter()
        parts: list[str] = []
        calls: list[ToolCall] = []
        async for event in self.llm.stream(self.system + self.history, self.toolset.specs):
            if isinstance(event, TextDelta):
                host.on_token()
                parts.append(event.text)
                for sentence in splitter.push(event.text):
                    spoken.append(sentence)
                    host.say(sentence)
            elif isinstance(event, ToolCallEvent):
                host.on_token()
                calls.append(event.call)
        for sentence in splitter.flush():
            spoken.append(sentence)
            host.say(sentence)
        return "".join(parts).strip(), calls

    async def _run_tools(
        self, host: DialogueHost, calls: Sequence[ToolCall], *, spoke: bool
    ) -> bool:
        """Run the model's calls; True if the model must be asked again (a refused call).

        Whatever fails or cancels the turn here, every call gets a tool message: a history
        with an unanswered tool call is refused by OpenAI-compatible servers (400) for the
        rest of the conversation."""
        try:
            return await self._run_tool_calls(host, calls, spoke=spoke)
        finally:
            self._answer_unanswered(host, calls)

    def _answer_unanswered(self, host: DialogueHost, calls: Sequence[ToolCall]) -> None:
        answered = {m.tool_call_id for m in self.history if m.role == "tool"}
        waiting = host.waiting()  # a transfer's result comes later
        for call in calls:
            if call.id not in answered and call.id not in waiting:
                self.tool_result(host, call, {"error": "not run: the turn was interrupted"})

    async def _run_tool_calls(
        self, host: DialogueHost, calls: Sequence[ToolCall], *, spoke: bool
    ) -> bool:
        again = False
        for i, call in enumerate(calls):
            await host.transcript("tool_call", call.arguments, tool=call.name, call_id=call.id)
            try:
                intent = self.toolset.parse(call)
            except ToolError as err:
                self.tool_result(host, call, {"error": str(err)})
                again = True
                continue
            for skipped in calls[i + 1 :]:  # one action per turn; answer every call id
                self.tool_result(host, skipped, {"error": "not run: another action was taken"})
            if isinstance(intent, TransferIntent):
                return await host.transfer(intent, call)
            if isinstance(intent, EndCallIntent):
                await host.end_call(call, spoke=spoke)
            return False
        return again

    def tool_result(self, host: DialogueHost, call: ToolCall, result: dict[str, Any]) -> None:
        content = json.dumps(result)
        self.history.append(ChatMessage.tool(call.id, content))
        host.spawn(host.transcript("tool_result", content, tool=call.name, call_id=call.id))
