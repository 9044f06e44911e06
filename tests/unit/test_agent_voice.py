"""VoiceAgent with fakes: turns, sentence streaming, tools, barge-in, failures."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bridge.calls.model import CallEvent, CallStatus, EndCallCommand, TransferCommand, utcnow
from bridge.calls.store import StoreChange
from bridge.llm.base import Finished, LlmServerError, LlmTimeout, TextDelta, ToolCall, ToolCallEvent
from bridge.ops.metrics import Metrics
from bridge.pbx.ports import LegFailed
from bridge.speech.stt import SttError
from tests.support.agent import (
    FakeSession,
    ScriptedLlm,
    ScriptedStt,
    Step,
    TextTts,
    make_agent,
    make_assistant,
    speak,
)
from tests.support.calls import until


def tool(name: str, args: dict[str, str], call_id: str = "call_1") -> ToolCallEvent:
    return ToolCallEvent(ToolCall(call_id, name, json.dumps(args)))


def text(*pieces: str) -> list[TextDelta]:
    return [TextDelta(p) for p in pieces]


async def test_greets_with_first_message_and_not_when_resumed() -> None:
    session = FakeSession()
    agent = make_agent(session, ScriptedLlm(), ScriptedStt())
    await agent.start(resumed=False)
    assert session.said == [("Hello, Acme here.", True)]
    assert session.transcript() == [("assistant", "Hello, Acme here.")]
    await agent.close()

    resumed = FakeSession()
    agent = make_agent(resumed, ScriptedLlm(), ScriptedStt())
    await agent.start(resumed=True)
    assert resumed.said == []
    await agent.close()


async def test_turn_streams_sentences_before_the_reply_is_complete() -> None:
    session = FakeSession(make_assistant(first_message=None))
    llm = ScriptedLlm(
        Step([*text("We open at nine. ", "We close ", "at five."), Finished("stop")], delay=0.05)
    )
    stt = ScriptedStt("when are you open")
    agent = make_agent(session, llm, stt)
    await agent.start(resumed=False)
    await speak(agent)
    # The first sentence is said while the rest still streams (0.05 s between deltas; the
    # poll's 2 ms timer is due before the next delta's, even after a stalled loop).
    await until(lambda: session.said, "the first sentence")
    assert session.said == [("We open at nine.", True)]
    assert llm.abandoned == 0
    await until(lambda: len(session.said) == 2, "the second sentence")
    assert [s for s, _ in session.said] == ["We open at nine.", "We close at five."]
    request = llm.requests[0]
    assert [m.role for m in request] == ["system", "user"]
    assert request[0].content == "Be brief." and request[1].content == "when are you open"
    enum = llm.tools[0][0].parameters["properties"]["destination"]["enum"]
    assert enum == ["sales_team", "technical_support"]
    assert stt.prompts[0] == "Sales team, Technical support."
    assert session.transcript() == [
        ("caller", "when are you open"),
        ("assistant", "We open at nine. We close at five."),
    ]
    latency = next(d for k, d in session.events if d.get("role") == "assistant")["latency_ms"]
    # The first sentence's audio went out while the model still wrote the second.
    assert set(latency) == {"stt", "llm", "say", "audio"}
    await agent.close()


async def test_turn_latency_runs_to_the_first_reply_audio_not_to_the_text() -> None:
    """callbridge_turn_latency_seconds is end of speech -> first reply audio to the caller:
    a reply written but still in synthesis has not been heard, and is not counted yet."""
    session = FakeSession(make_assistant(first_message=None))
    gate = asyncio.Event()

    class HeldTts(TextTts):
        async def synthesize(self, text: str) -> bytes:
            await gate.wait()
            return text.encode()

    session.service.tts = HeldTts()
    metrics = Metrics("asterisk")
    recorded = 0

    def feed() -> None:  # what the CallStore subscriber would get, in order
        nonlocal recorded
        for kind, data in session.events[recorded:]:
            metrics.on_change(StoreChange("c1", events=(CallEvent(kind, utcnow(), data),)))
        recorded = len(session.events)

    llm = ScriptedLlm(Step([*text("We open at nine. ", "We close at five."), Finished("stop")]))
    agent = make_agent(session, llm, ScriptedStt("when are you open"))
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: ("assistant", "We open at nine. We close at five.") in session.transcript())
    said = next(d for k, d in session.events if d.get("role") == "assistant")["latency_ms"]
    assert set(said) == {"stt", "llm", "say"}  # the text is written; nothing has played
    feed()
    turn = "callbridge_turn_latency_seconds_count"
    assert metric(metrics, turn) == 0
    gate.set()
    await until(lambda: [k for k, _ in session.events].count("assistant.said") == 2)
    firsts = [d for k, d in session.events if k == "assistant.first_audio"]
    assert len(firsts) == 1  # once per turn, for its first sentence
    assert firsts[0]["turn_ms"] == firsts[0]["latency_ms"]["audio"] >= said["say"]
    feed()
    assert metric(metrics, turn) == 1
    assert metric(metrics, "callbridge_turn_latency_seconds_sum") == firsts[0]["turn_ms"] / 1000
    assert metric(metrics, "callbridge_tts_seconds_count") == 2  # the others stay
    assert metric(metrics, "callbridge_llm_seconds_count") == 1
    await agent.close()


def metric(m: Metrics, name: str) -> float:
    text = m.exposition().decode()
    values = [
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name
    ]
    assert len(values) == 1, name
    return values[0]


async def test_transfer_call_runs_the_session_command_and_gets_the_typed_result() -> None:
    session = FakeSession(make_assistant(first_message=None))
    llm = ScriptedLlm(
        Step([tool("transfer_call", {"destination": "sales_team"}), Finished("tool_calls")]),
        Step([*text("Sales is busy. Can I help instead?"), Finished("stop")]),
    )
    agent = make_agent(session, llm, ScriptedStt("sales please", "okay"))
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: session.commands, "the transfer command")
    command, source, label = session.commands[0]
    assert isinstance(command, TransferCommand)
    assert command.destination == "+31612345678"
    assert command.message == "I'm transferring you to our sales team."
    assert (source, label) == ("assistant", "Sales team - for pricing and quotes")
    # The transfer fails (busy): the real session puts the caller back with the assistant
    # and hands it the typed result.
    await until(lambda: bool(session.pbx.verbs("originate")), "the leg is placed")
    assert session.leg is not None
    session.post(LegFailed(session.leg, 17, "User busy", 486))
    busy = session.service.settings.transfer.busy_message
    await until(lambda: (busy, True) in session.said, "the caller is back with the assistant")
    assert session.call.status is CallStatus.ACTIVE
    await speak(agent)
    await until(lambda: len(llm.requests) == 2, "the second request to the model")
    second = llm.requests[1]
    assert [m.role for m in second] == ["system", "user", "assistant", "tool", "user"]
    assert second[2].tool_calls[0].id == "call_1" and second[3].tool_call_id == "call_1"
    result = json.loads(second[3].content or "")
    assert result == {
        "transferred": False,
        "outcome": "busy",
        "sip_code": 486,
        "cause": "User busy",
    }
    roles = [r for r, _ in session.transcript()]
    assert roles == ["caller", "tool_call", "tool_result", "caller", "assistant"]
    await agent.close()


async def test_refused_tool_call_goes_back_to_the_model() -> None:
    session = FakeSession(make_assistant(first_message=None))
    llm = ScriptedLlm(
        Step([tool("transfer_call", {"destination": "+31900123456"}), Finished("tool_calls")]),
        Step([tool("transfer_call", {"destination": "technical_support"}, "call_2")]),
    )
    agent = make_agent(session, llm, ScriptedStt("support"))
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: session.commands, "the transfer to the listed destination")
    assert "is not a destination" in (llm.requests[1][-1].content or "")
    assert session.commands[0][0].destination == "+31687654321"
    await agent.close()


async def test_barge_in_flushes_and_cancels_the_reply() -> None:
    session = FakeSession(make_assistant(first_message=None), play_s=5)
    llm = ScriptedLlm(
        Step([*text("One. ", "Two. ", "Three. ", "Four. "), Finished("stop")], delay=0.1)
    )
    agent = make_agent(session, llm, ScriptedStt("tell me everything", "stop"))
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: session.said and session.media and session.media.playing, "playing")
    assert session.media is not None
    await speak(agent, ms=100, then_silence_ms=0)  # the caller talks over the assistant
    await until(lambda: session.media is not None and session.media.flushes, "the flush")
    assert session.media.flushes == 1 and not session.media.playing
    assert llm.abandoned == 1  # the in-flight LLM stream was dropped
    barge = [d for k, d in session.events if k == "agent.barge_in"]
    assert len(barge) == 1 and barge[0]["dropped"] >= 1 and barge[0]["thinking"] is True
    assert [r for r, _ in session.transcript()][-1] == "assistant"  # what was heard, kept
    await agent.close()


async def test_barge_in_does_not_cancel_a_decided_transfer() -> None:
    session = FakeSession(make_assistant(first_message=None), play_s=0.3)
    llm = ScriptedLlm(
        Step(
            [
                *text("Sure, one moment. "),
                tool("transfer_call", {"destination": "sales_team"}),
                Finished("tool_calls"),
            ]
        )
    )
    agent = make_agent(session, llm, ScriptedStt("sales"))
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: session.media is not None and session.media.playing, "the preface")
    assert session.media is not None
    await speak(agent, ms=100, then_silence_ms=0)  # caller talks during the preface
    await until(lambda: len(session.said) == 2 and session.commands, "the transfer announced")
    assert session.media.flushes == 0
    assert [type(c) for c, _, _ in session.commands] == [TransferCommand]
    assert [s for s, _ in session.said] == [
        "Sure, one moment.",
        "I'm transferring you to our sales team.",
    ]
    await agent.close()


async def test_llm_failure_apologises_and_transfers_to_the_first_destination() -> None:
    session = FakeSession(make_assistant(first_message=None))
    llm = ScriptedLlm(Step(error=LlmTimeout("slow", phase="first_token")))
    agent = make_agent(session, llm, ScriptedStt("hello"))
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: session.commands, "the fallback transfer")
    command, source, _ = session.commands[0]
    assert command.destination == "+31612345678" and source == "assistant"
    assert command.message.startswith("Sorry, I'm having trouble right now.")
    assert any(k == "agent.llm_failed" for k, _ in session.events)
    await agent.close()


async def test_llm_failure_apologises_only_when_configured() -> None:
    session = FakeSession(make_assistant(first_message=None))
    llm = ScriptedLlm(Step(error=LlmServerError("boom", status=502)))
    agent = make_agent(session, llm, ScriptedStt("hello"), on_llm_failure="apologize")
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: session.said, "the apology")
    assert session.commands == []
    assert session.said == [("Sorry, I'm having trouble right now.", True)]
    await agent.close()


async def test_stt_failure_asks_again_and_empty_transcripts_are_ignored() -> None:
    session = FakeSession(make_assistant(first_message=None))
    llm = ScriptedLlm()
    stt = ScriptedStt(SttError("down"), "  ")
    agent = make_agent(session, llm, stt)
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: session.said, "the request to say it again")
    assert session.said == [("Sorry, I didn't catch that. Could you say it again?", True)]
    await speak(agent)
    await until(
        lambda: len(stt.prompts) == 2 and agent._turn is not None and agent._turn.done(),
        "the second turn to be transcribed and handled",
    )
    assert llm.requests == []  # noise: no turn
    await agent.close()


async def test_end_call_lets_the_goodbye_play_then_hangs_up() -> None:
    session = FakeSession(make_assistant(first_message=None), play_s=0.1)
    llm = ScriptedLlm(
        Step([*text("Goodbye!"), tool("end_call", {}), Finished("tool_calls")]),
    )
    agent = make_agent(session, llm, ScriptedStt("bye"))
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: session.media is not None and session.media.playing, "the goodbye")
    assert session.commands == []  # still saying goodbye
    await until(lambda: session.commands, "the hang-up once the goodbye played")
    command = session.commands[0][0]
    assert isinstance(command, EndCallCommand) and command.message is None
    await agent.close()


async def test_end_call_without_words_uses_the_configured_goodbye() -> None:
    session = FakeSession(make_assistant(first_message=None))
    llm = ScriptedLlm(Step([tool("end_call", {"reason": "done"}), Finished("tool_calls")]))
    agent = make_agent(session, llm, ScriptedStt("that's all"))
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: session.commands, "the end_call command")
    assert session.commands[0][0].message == "Goodbye."
    await agent.close()


async def test_silent_peer_still_ends_the_turn() -> None:
    """A peer that stops sending packets (DTX) instead of sending silence."""
    session = FakeSession(make_assistant(first_message=None))
    llm = ScriptedLlm(Step([*text("Yes?"), Finished("stop")]))
    agent = make_agent(session, llm, ScriptedStt("hello"))
    await agent.start(resumed=False)
    await speak(agent, then_silence_ms=0)
    await until(lambda: session.said, "the reply once the packets stop")
    assert session.said == [("Yes?", True)]
    await agent.close()


async def test_early_stt_at_a_pause_is_used_when_the_turn_ends() -> None:
    session = FakeSession(make_assistant(first_message=None))
    llm = ScriptedLlm(Step([*text("Yes?"), Finished("stop")]))
    stt = ScriptedStt("early words")
    agent = make_agent(session, llm, stt, early_stt_ms=40)
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: llm.requests, "the request to the model")
    assert len(stt.prompts) == 1  # one decode, started at the pause, used at the turn end
    assert llm.requests[0][-1].content == "early words"
    await agent.close()


async def test_early_stt_is_discarded_when_the_caller_goes_on() -> None:
    session = FakeSession(make_assistant(first_message=None))
    llm = ScriptedLlm(Step([*text("Yes?"), Finished("stop")]))
    stt = ScriptedStt("half a sentence", "the whole sentence")
    agent = make_agent(session, llm, stt, early_stt_ms=40)
    await agent.start(resumed=False)
    await speak(agent, ms=200, then_silence_ms=60)  # a pause shorter than the turn's end
    await speak(agent, ms=200, then_silence_ms=200)
    await until(lambda: llm.requests, "the request to the model")
    assert len(stt.prompts) == 2  # at the first pause (thrown away), at the second (used)
    assert [m.content for m in llm.requests[0] if m.role == "user"] == ["the whole sentence"]
    await agent.close()


async def test_words_of_a_turn_cut_off_while_transcribing_are_kept() -> None:
    """The caller pauses longer than silence_ms mid-sentence, then goes on while STT runs:
    the first part's audio is prepended to the next turn instead of being lost."""
    session = FakeSession(make_assistant(first_message=None))
    llm = ScriptedLlm(Step([*text("Right."), Finished("stop")]))
    stt = ScriptedStt("first half", "first half and the rest", delay=0.3)
    agent = make_agent(session, llm, stt)
    await agent.start(resumed=False)
    await speak(agent, ms=200, then_silence_ms=140)  # turn ends, STT starts
    await speak(agent, ms=200, then_silence_ms=200)  # barge-in while thinking
    await until(lambda: session.said, "the reply to the whole turn")
    assert len(stt.lengths) == 2 and stt.lengths[1] > stt.lengths[0] * 1.5
    assert [m.content for m in llm.requests[0] if m.role == "user"] == ["first half and the rest"]
    assert len(llm.requests) == 1
    await agent.close()


class GateStt:
    """A transcription that is not in until the test says so (a long STT queue)."""

    name = "gate"

    def __init__(self, text: str) -> None:
        self.text = text
        self.gate = asyncio.Event()

    async def transcribe(self, pcm: bytes, sample_rate: int, prompt: str | None = None) -> Any:
        from bridge.speech.stt import Transcript

        await self.gate.wait()
        return Transcript(self.text, 0.9)


async def test_a_turn_waiting_for_stt_hears_a_holding_phrase_then_the_reply() -> None:
    session = FakeSession(make_assistant(first_message=None))
    llm = ScriptedLlm(Step([*text("We open at nine."), Finished("stop")]))
    stt = GateStt("When do you open?")
    agent = make_agent(session, llm, stt, stt_hold_ms=50, early_stt_ms=0)  # type: ignore[arg-type]
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: session.said, "the holding phrase")
    assert session.said == [("One moment, please.", True)] and not llm.requests
    await until(
        lambda: any(kind == "agent.stt_hold" for kind, _ in session.events), "the hold recorded"
    )
    stt.gate.set()
    await until(lambda: len(session.said) == 2, "the reply")
    assert session.said[1] == ("We open at nine.", True)
    assert [m.content for m in llm.requests[0] if m.role == "user"] == ["When do you open?"]
    await agent.close()


async def test_a_turn_over_the_stt_budget_is_asked_again_not_left_in_silence() -> None:
    from bridge.speech.stt import SttTimeout

    session = FakeSession(make_assistant(first_message=None))
    llm = ScriptedLlm()
    stt = ScriptedStt(SttTimeout("no STT worker free within 8 s"))
    agent = make_agent(session, llm, stt, early_stt_ms=0)
    await agent.start(resumed=False)
    await speak(agent)
    await until(lambda: session.said, "an answer")
    assert session.said == [("Sorry, I didn't catch that. Could you say it again?", True)]
    assert not llm.requests
    await agent.close()
