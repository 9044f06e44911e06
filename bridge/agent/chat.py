"""The text test console: talk to an assistant by text, through the code a call runs.

`ChatConsole.send(assistant_id, message, conversation_id)` runs one caller turn through a
`Dialogue` (bridge/agent/dialogue.py), the same object a `VoiceAgent` uses on a call, with a
host that collects what would be spoken and *reports* transfers and end_call instead of
executing them. Used by `POST /api/v1/assistants/{id}/chat` and `callbridge chat`.

A reported transfer passes the toll-fraud policy first (`TransferPolicy.authorize`, as the
call's session asks it: the conversation's reported transfers are its `transfers_in_call`, the
assistant's first number by id routes a number). A refused one is reported with
`refused: {rule, reason}` and the conversation goes on as a call's does: the model gets the
failed tool result and answers again.

Conversations live in memory: at most `max_conversations` (the least recently used is
dropped), each forgotten after `idle_s` without a message and closed after `max_messages`
caller messages (the whole history goes to the model at every turn: without a bound, one key
could grow a conversation until the daemon that carries the calls runs out of memory). A
conversation keeps the assistant as it was when it started (edit the assistant, then start a
new one).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bridge.agent.dialogue import Dialogue, refused_transfer_result
from bridge.config import AgentSettings
from bridge.directory.models import Assistant
from bridge.errors import BridgeError, Conflict, NotFound
from bridge.llm.base import ChatMessage, LlmProvider, ToolCall
from bridge.llm.tools import TransferIntent
from bridge.log import get_logger

if TYPE_CHECKING:
    from bridge.calls.policy import TransferPolicy
    from bridge.directory.service import DirectoryService

log = get_logger(__name__)

MAX_CONVERSATIONS = 1000
IDLE_S = 30 * 60.0
MAX_MESSAGES = 100  # caller messages per conversation
# Turns that run the model at once; more wait their turn. The console shares the daemon with
# live calls: a burst of test messages (the offline model runs on this machine's CPU, a cloud
# one costs per request) must not take the cores the calls' speech needs.
MAX_CONCURRENT = 2


@dataclass
class ChatTurn:
    """What one message produced: what the caller would hear, and what the assistant did."""

    conversation_id: str
    replies: list[str] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False  # a transfer or end_call ended the (simulated) call
    # The model failed this turn (what was said and done is the configured fallback): a call
    # only logs it, the console shows it, or a test of an unconfigured provider just
    # "transfers" with no hint why.
    llm_error: str | None = None

    def public_dict(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "replies": self.replies,
            "actions": self.actions,
            "ended": self.ended,
            "llm_error": self.llm_error,
        }


@dataclass
class _Conversation:
    id: str
    assistant_id: str
    dialogue: Dialogue
    used_at: float
    owner: str | None = None  # the API key id that started it (None: the CLI)
    ended: bool = False
    messages: int = 0
    transfers: int = 0  # reported (authorised) transfers: the policy's transfers_in_call
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _ChatHost:
    """A `DialogueHost` that writes instead of speaking and reports instead of acting."""

    def __init__(
        self,
        dialogue: Dialogue,
        turn: ChatTurn,
        settings: AgentSettings,
        authorize: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.dialogue = dialogue
        self.turn = turn
        self.settings = settings
        self.authorize = authorize
        self.transcript_log: list[dict[str, Any]] = []
        self.transfers = 0  # reported in this turn

    @property
    def suspended(self) -> bool:
        return self.turn.ended

    def on_token(self) -> None:
        pass

    def say(self, sentence: str) -> None:
        if not self.turn.ended:
            self.turn.replies.append(sentence)

    async def transcript(self, role: str, text: str, **data: Any) -> None:
        self.transcript_log.append({"role": role, "text": text, **data})

    def spawn(self, coro: Awaitable[Any]) -> None:
        # Nothing here waits on I/O: run it now (a coroutine never awaited warns).
        step = coro.__await__()
        try:
            while True:
                next(step)
        except StopIteration:
            pass

    def waiting(self) -> set[str]:
        return set()

    async def transfer(self, intent: TransferIntent, call: ToolCall | None) -> bool:
        dest = intent.destination
        action: dict[str, Any] = {
            "type": "transfer",
            "destination": dest.target,
            "description": dest.description,
            "message": intent.preface,
        }
        if self.authorize is not None:
            try:  # the toll-fraud policy, as the call's session asks it before dialling
                await self.authorize(dest.target)
            except BridgeError as exc:
                # As on a call (VoiceAgent._transfer): nothing is said (the session speaks
                # the preface only for an accepted transfer), the model gets the same failed
                # tool result and is asked again; a fallback transfer (no tool call) is not.
                action["refused"] = {"rule": exc.details.get("rule"), "reason": exc.message}
                self.turn.actions.append(action)
                if call is None:
                    return False
                self.dialogue.tool_result(self, call, refused_transfer_result(exc))
                return True
        if intent.preface:
            self.say(intent.preface)
        self.turn.actions.append(action)
        self.transfers += 1
        if call is not None:
            result = {"transferred": True, "outcome": "not_executed", "cause": "test console"}
            self.dialogue.tool_result(self, call, result)
        self.turn.ended = True
        return False

    async def end_call(self, call: ToolCall, *, spoke: bool) -> None:
        self.dialogue.tool_result(self, call, {"ended": True})
        if not spoke:
            self.say(self.settings.goodbye_message)
        self.turn.actions.append({"type": "end_call"})
        self.turn.ended = True

    async def llm_failed(self, exc: BaseException) -> None:
        """As on a call: the apology, then the configured fallback (reported)."""
        log.warning("chat.llm_failed", error=str(exc), error_type=type(exc).__name__)
        self.turn.llm_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        apology = self.settings.llm_failure_message
        first = self.dialogue.destinations[0] if self.dialogue.destinations else None
        if self.settings.on_llm_failure == "transfer_first" and first is not None:
            preface = f"{apology} {first.message or 'Let me put you through to a colleague.'}"
            self.dialogue.history.append(ChatMessage.assistant(preface))
            await self.transfer(TransferIntent(first.key, first, preface), None)
            if self.turn.ended:
                return
            # The transfer was refused: just apologise (as VoiceAgent._llm_failed does).
        self.say(apology)
        self.dialogue.history.append(ChatMessage.assistant(apology))


class ChatConsole:
    """Text conversations with assistants, held in memory."""

    def __init__(
        self,
        get_assistant: Callable[[str], Awaitable[Assistant]],
        llm_for: Callable[[str, str | None], LlmProvider],
        settings: AgentSettings,
        *,
        max_conversations: int = MAX_CONVERSATIONS,
        idle_s: float = IDLE_S,
        max_messages: int = MAX_MESSAGES,
        max_concurrent: int = MAX_CONCURRENT,
        clock: Callable[[], float] = time.monotonic,
        policy: TransferPolicy | None = None,
        number_of: Callable[[str], Awaitable[str | None]] | None = None,
    ) -> None:
        self._get_assistant = get_assistant
        # The toll-fraud policy a call's transfer passes (None: every transfer is reported as
        # made); `number_of(assistant_id)` names the number whose transfer trunk routes it.
        self.policy = policy
        self._number_of = number_of
        self._llm_for = llm_for
        self.settings = settings
        self.max_conversations = max_conversations
        self.idle_s = idle_s
        self.max_messages = max_messages
        self._running = asyncio.Semaphore(max_concurrent)
        self._clock = clock
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._conversations)

    async def send(
        self,
        assistant_id: str,
        message: str,
        conversation_id: str | None = None,
        *,
        owner: str | None = None,
    ) -> ChatTurn:
        """One caller message. Without `conversation_id` a new conversation starts and its
        replies begin with the assistant's `first_message`, as a call would. A conversation
        belongs to the `owner` (API key id) that started it: to any other it is not found."""
        self._expire()
        if conversation_id is None:
            conv, turn = await self._start(assistant_id, owner)
        else:
            conv = self._find(assistant_id, conversation_id, owner)
            turn = ChatTurn(conv.id)
        async with conv.lock:
            if conv.ended:
                raise Conflict(
                    "this conversation has ended (transfer or end_call): start a new one",
                    field="conversation_id",
                )
            if conv.messages >= self.max_messages:
                raise Conflict(
                    f"this conversation reached {self.max_messages} messages: start a new one",
                    field="conversation_id",
                )
            conv.messages += 1
            conv.used_at = self._clock()
            dialogue = conv.dialogue
            dialogue.history.append(ChatMessage.user(message))
            host = _ChatHost(dialogue, turn, self.settings, self._authorizer(conv))
            async with self._running:
                await dialogue.reply(host)
            conv.transfers += host.transfers
            conv.ended = turn.ended
            conv.used_at = self._clock()
        log.info(
            "chat.turn",
            assistant_id=assistant_id,
            conversation_id=conv.id,
            actions=json.dumps(turn.actions),
        )
        return turn

    async def _start(self, assistant_id: str, owner: str | None) -> tuple[_Conversation, ChatTurn]:
        assistant = await self._get_assistant(assistant_id)
        config = assistant.llm_config
        llm = self._llm_for(config.provider, config.model)
        dialogue = Dialogue(assistant, llm, max_tool_rounds=self.settings.max_tool_rounds)
        conv = _Conversation(
            f"conv_{secrets.token_hex(8)}", assistant_id, dialogue, self._clock(), owner
        )
        turn = ChatTurn(conv.id)
        if assistant.first_message:
            turn.replies.append(assistant.first_message)
            dialogue.history.append(ChatMessage.assistant(assistant.first_message))
        while len(self._conversations) >= self.max_conversations:
            self._conversations.popitem(last=False)  # the least recently used
        self._conversations[conv.id] = conv
        return conv, turn

    def _authorizer(self, conv: _Conversation) -> Callable[[str], Awaitable[None]] | None:
        policy = self.policy
        if policy is None:
            return None

        async def authorize(destination: str) -> None:
            number_id = await self._number_of(conv.assistant_id) if self._number_of else None
            await policy.authorize(
                destination,
                number_id=number_id,
                assistant=conv.dialogue.assistant,
                source="chat",  # in the policy's refusal log: a console test, not a call
                transfers_in_call=conv.transfers,
            )

        return authorize

    def _find(self, assistant_id: str, conversation_id: str, owner: str | None) -> _Conversation:
        conv = self._conversations.get(conversation_id)
        # Another key's conversation answers as an unknown one (404): a key cannot read or
        # continue, nor learn of, a conversation it did not start.
        if conv is None or conv.assistant_id != assistant_id or conv.owner != owner:
            raise NotFound(
                f"no conversation {conversation_id!r} with this assistant (unknown, or"
                f" forgotten after {round(self.idle_s)} s idle): omit conversation_id to start"
                " one",
                field="conversation_id",
            )
        self._conversations.move_to_end(conversation_id)
        return conv

    def _expire(self) -> None:
        cutoff = self._clock() - self.idle_s
        while self._conversations:
            oldest = next(iter(self._conversations.values()))
            if oldest.used_at > cutoff:
                break
            self._conversations.popitem(last=False)


def first_number_of(directory: DirectoryService) -> Callable[[str], Awaitable[str | None]]:
    """`number_of` for a console: an assistant's first number by id (its transfer trunk
    routes a number the console's transfer names, as it would on a call to that number)."""

    async def number_of(assistant_id: str) -> str | None:
        numbers = sorted(await directory.list_numbers(), key=lambda n: n.id)
        return next((n.id for n in numbers if n.assistant_id == assistant_id), None)

    return number_of
