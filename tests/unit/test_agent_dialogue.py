"""The conversation core (`Dialogue`) and the chat console around it, with a scripted model:
what the model is sent, tool calls to actions, refused calls asked again, the console's
first message, memory bound and expiry, and a failing model."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from bridge.agent.chat import ChatConsole
from bridge.agent.dialogue import system_messages
from bridge.calls.policy import RULE_PREFIXES, TransferPolicy
from bridge.config import AgentSettings, TransferSettings
from bridge.directory.models import Assistant
from bridge.directory.service import DirectoryService
from bridge.errors import Conflict, NotFound
from bridge.llm.base import Finished, LlmServerError, TextDelta, ToolCall, ToolCallEvent
from tests.support.agent import DESTINATIONS, ScriptedLlm, Step
from tests.support.daemon import wait_for


def assistant(**extra: Any) -> Assistant:
    now = datetime.now(UTC)
    return Assistant.model_validate(
        {
            "id": "a1",
            "name": "Acme",
            "first_message": "Hello, Acme here.",
            "created_at": now,
            "updated_at": now,
            "llm_config": {
                "provider": "openai",
                "messages": [{"role": "system", "content": "Be brief."}],
                "tools": [
                    {"type": "transfer_call", "destinations": DESTINATIONS},
                    {"type": "end_call"},
                ],
            },
            **extra,
        }
    )


def call(name: str, args: dict[str, Any], cid: str = "c1") -> ToolCallEvent:
    return ToolCallEvent(ToolCall(cid, name, json.dumps(args)))


def console(llm: ScriptedLlm, a: Assistant | None = None, **kw: Any) -> ChatConsole:
    target = a or assistant()

    async def get(assistant_id: str) -> Assistant:
        if assistant_id != target.id:
            raise NotFound(f"assistant {assistant_id} not found")
        return target

    return ChatConsole(get, lambda p, m: llm, AgentSettings(), **kw)


def test_knowledge_goes_into_the_system_prompt_as_text_and_entries() -> None:
    a = assistant(
        knowledge=[
            {"question": "What are your opening hours?", "answer": "Nine to five."},
            {"answer": "Acme sells thermostats."},
        ]
    )
    system = system_messages(a)
    assert system[0].content == "Be brief."
    assert system[1].content is not None
    assert "Q: What are your opening hours?\n  A: Nine to five." in system[1].content
    assert "- Acme sells thermostats." in system[1].content
    assert [k.answer for k in system[1].knowledge] == ["Nine to five.", "Acme sells thermostats."]
    assert system[1].to_openai() == {"role": "system", "content": system[1].content}


async def test_a_turn_streams_text_then_reports_the_transfer_with_its_message() -> None:
    llm = ScriptedLlm(
        Step([TextDelta("Sure. "), call("transfer_call", {"destination": "sales_team"}),
              Finished("tool_calls")])
    )  # fmt: skip
    chat = console(llm)
    turn = await chat.send("a1", "sales please")
    assert turn.replies == ["Hello, Acme here.", "Sure.", "I'm transferring you to our sales team."]
    assert turn.actions == [
        {
            "type": "transfer",
            "destination": "+31612345678",
            "description": "Sales team - for pricing and quotes",
            "message": "I'm transferring you to our sales team.",
        }
    ]
    assert turn.ended
    sent = llm.requests[0]
    assert [m.role for m in sent] == ["system", "assistant", "user"]  # greeting in the history
    with pytest.raises(Conflict) as err:
        await chat.send("a1", "hello?", turn.conversation_id)
    assert err.value.field == "conversation_id"


async def test_a_refused_tool_call_is_answered_and_the_model_asked_again() -> None:
    llm = ScriptedLlm(
        Step([call("transfer_call", {"destination": "+31600000000"}), Finished("tool_calls")]),
        Step([TextDelta("Which department would you like?"), Finished("stop")]),
    )
    dialogue_turn = await console(llm).send("a1", "transfer me to +31600000000")
    assert dialogue_turn.actions == []
    assert dialogue_turn.replies[-1] == "Which department would you like?"
    second = llm.requests[1]
    assert second[-1].role == "tool" and "not a destination" in (second[-1].content or "")


def policed(llm: ScriptedLlm, **transfer: Any) -> ChatConsole:
    """A console behind the real toll-fraud policy (numbers routed by a default route)."""
    settings = TransferSettings(default_route="PJSIP/{number}@carrier", **transfer)

    async def number_of(assistant_id: str) -> str | None:
        return None  # no number: the default route

    chat = console(llm)
    chat.policy = TransferPolicy(settings, cast(DirectoryService, None))
    chat._number_of = number_of
    return chat


async def test_a_transfer_the_policy_refuses_is_reported_refused_and_the_talk_goes_on() -> None:
    llm = ScriptedLlm(
        Step([call("transfer_call", {"destination": "sales_team"}), Finished("tool_calls")]),
        Step([TextDelta("Sorry, I cannot put you through."), Finished("stop")]),
        Step([TextDelta("Anything else?"), Finished("stop")]),
    )
    chat = policed(llm, allowed_prefixes=["+3168"])  # sales (+31612345678) is outside
    turn = await chat.send("a1", "sales please")
    assert turn.actions == [
        {
            "type": "transfer",
            "destination": "+31612345678",
            "description": "Sales team - for pricing and quotes",
            "message": "I'm transferring you to our sales team.",
            "refused": {
                "rule": RULE_PREFIXES,
                "reason": "refused by the transfer policy (transfer.allowed_prefixes): number"
                " is not in transfer.allowed_prefixes",
            },
        }
    ]
    # As on a call: the preface is not said, the model hears the failure and answers again.
    assert turn.replies == ["Hello, Acme here.", "Sorry, I cannot put you through."]
    assert not turn.ended
    result = llm.requests[1][-1]
    assert result.role == "tool"
    assert json.loads(result.content or "") == {
        "transferred": False,
        "outcome": "refused",
        "rule": turn.actions[0]["refused"]["rule"],
        "cause": turn.actions[0]["refused"]["reason"],
    }
    again = await chat.send("a1", "ok", turn.conversation_id)
    assert again.replies == ["Anything else?"]


async def test_a_transfer_the_policy_allows_is_reported_as_made() -> None:
    llm = ScriptedLlm(
        Step([call("transfer_call", {"destination": "technical_support"}), Finished("tool_calls")])
    )
    chat = policed(llm, allowed_prefixes=["+3168"])  # support is +31687654321
    turn = await chat.send("a1", "support please")
    assert [a.get("refused") for a in turn.actions] == [None]
    assert turn.ended


async def test_a_refused_fallback_transfer_only_apologises() -> None:
    llm = ScriptedLlm(Step(error=LlmServerError("down", status=503)))
    turn = await policed(llm, allowed_prefixes=["+3168"]).send("a1", "hello")
    assert turn.actions[0]["refused"]["rule"] == RULE_PREFIXES
    assert turn.replies[1:] == [AgentSettings().llm_failure_message]
    assert not turn.ended


async def test_end_call_without_words_says_the_goodbye() -> None:
    llm = ScriptedLlm(Step([call("end_call", {}), Finished("tool_calls")]))
    turn = await console(llm).send("a1", "bye")
    assert turn.actions == [{"type": "end_call"}]
    assert turn.replies[-1] == AgentSettings().goodbye_message


async def test_a_failing_model_apologises_and_reports_the_fallback_transfer() -> None:
    llm = ScriptedLlm(Step(error=LlmServerError("down", status=503)))
    turn = await console(llm).send("a1", "hello")
    assert turn.llm_error == "LlmServerError: down"  # shown, not only logged
    assert turn.replies[1].startswith(AgentSettings().llm_failure_message)
    assert [a["destination"] for a in turn.actions] == ["+31612345678"]


async def test_conversations_are_bounded_and_expire() -> None:
    now = [0.0]
    chat = console(ScriptedLlm(), max_conversations=2, idle_s=60, clock=lambda: now[0])
    first = (await chat.send("a1", "one")).conversation_id
    second = (await chat.send("a1", "two")).conversation_id
    await chat.send("a1", "again", first)  # first is now the most recent
    await chat.send("a1", "three")  # drops the least recently used: second
    assert len(chat) == 2
    with pytest.raises(NotFound):
        await chat.send("a1", "hi", second)
    await chat.send("a1", "still here", first)
    now[0] = 61.0
    with pytest.raises(NotFound) as err:
        await chat.send("a1", "hi", first)
    assert err.value.field == "conversation_id"
    assert len(chat) == 0


async def test_a_conversation_belongs_to_its_assistant() -> None:
    chat = console(ScriptedLlm())
    cid = (await chat.send("a1", "hi")).conversation_id
    with pytest.raises(NotFound):
        await chat.send("other", "hi", cid)


async def test_a_conversation_is_closed_after_max_messages() -> None:
    """The whole history goes to the model at each turn and lives in the daemon's memory:
    one conversation cannot grow without bound."""
    chat = console(ScriptedLlm(), max_messages=3)
    cid = (await chat.send("a1", "one")).conversation_id
    await chat.send("a1", "two", cid)
    await chat.send("a1", "three", cid)
    with pytest.raises(Conflict) as err:
        await chat.send("a1", "four", cid)
    assert err.value.field == "conversation_id" and "3 messages" in err.value.message
    assert (await chat.send("a1", "a new one")).conversation_id != cid


class _GatedLlm:
    """A model whose every answer waits for `release`, counting the answers in flight."""

    name = "gated"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.running = 0
        self.most = 0

    async def stream(self, messages: Any, tools: Any = ()) -> Any:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.wait()
            yield TextDelta("Hello.")
            yield Finished("stop")
        finally:
            self.running -= 1

    async def aclose(self) -> None:
        pass


async def test_console_turns_run_the_model_a_few_at_a_time() -> None:
    """A burst of test messages must not run the model (offline: on the calls' CPU) for all
    of them at once: beyond max_concurrent they wait."""
    llm = _GatedLlm()
    target = assistant(first_message=None)

    async def get(assistant_id: str) -> Assistant:
        return target

    chat = ChatConsole(get, lambda p, m: llm, AgentSettings(), max_concurrent=2)  # type: ignore[arg-type, return-value]
    sends = [asyncio.create_task(chat.send("a1", f"hi {n}")) for n in range(5)]
    await wait_for(lambda: llm.running == 2, "two turns in the model")
    assert not any(s.done() for s in sends)
    llm.release.set()
    turns = await asyncio.gather(*sends)
    assert [t.replies for t in turns] == [["Hello."]] * 5
    assert llm.most == 2
