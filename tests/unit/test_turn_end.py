"""End of turn decided by silence AND the transcript (bridge/agent/early.py, TurnDetector):
a complete sentence ends the turn as soon as its early transcript is in; one that stops on
"and"/"um" waits longer than `silence_ms`."""

from __future__ import annotations

import pytest

from bridge.agent.early import EarlyTranscriber, turn_complete
from bridge.llm.base import Finished, TextDelta
from bridge.speech.vad import TurnConfig, TurnDetector, TurnEnded
from tests.support.agent import (
    LOUD,
    QUIET,
    EnergyVad,
    FakeSession,
    ScriptedLlm,
    ScriptedStt,
    Step,
    make_assistant,
)
from tests.support.calls import until

SILENCE_MS = 400
HOLD_MS = 300
PAUSE_MS = 60


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("What are your opening hours?", True),
        ("I want to talk to sales.", True),
        ("Goodbye!", True),
        ("Can you tell me where your office is?", True),
        ("Where are you from?", True),
        ("I think so.", True),
        ("I'd like to talk to sales and", False),
        ("I'd like to talk to sales, um.", False),
        ("Can you put me through to...", False),
        ("I need help with my", False),
        ("Sales,", False),
        ("sales please", None),  # no closing punctuation: no opinion
        ("", None),
        (" ... ", None),
    ],
)
def test_what_a_transcript_says_about_the_end_of_the_turn(text: str, verdict: bool | None) -> None:
    assert turn_complete(text) is verdict


def detector() -> TurnDetector:
    config = TurnConfig(min_speech_ms=60, silence_ms=SILENCE_MS, preroll_ms=20, trail_ms=20)
    return TurnDetector(EnergyVad(), config)


async def pause_after_speech(text: str) -> tuple[TurnDetector, EarlyTranscriber]:
    """The caller speaks 200 ms, then is silent until the early transcription (started at
    the pause) is done; the turn has not ended by silence yet."""
    det = detector()
    early = EarlyTranscriber(
        ScriptedStt(text), None, det, PAUSE_MS, end_on_transcript=True, hold_ms=HOLD_MS
    )
    for frame in [LOUD] * 10 + [QUIET] * (PAUSE_MS // 20):
        early.observe(frame, det.feed(frame))
    task = early._task
    assert task is not None, "early STT starts at the pause"
    await until(task.done, "the early transcript")
    return det, early


async def test_a_complete_sentence_ends_the_turn_before_the_silence_rule() -> None:
    det, early = await pause_after_speech("What are your opening hours?")
    assert early.turn_over()
    ended = det.end_now()
    assert isinstance(ended, TurnEnded) and ended.by_transcript
    assert det.silent_ms == 0 and not det.in_speech
    taken = early.take()
    assert taken is not None and taken.result().text == "What are your opening hours?"


async def silence_until_turn_end(det: TurnDetector, early: EarlyTranscriber) -> int:
    """Feed silence (as the agent does, asking `turn_over` each frame) until the turn ends;
    the silence it took, ms, counted from the end of speech."""
    silent = PAUSE_MS
    while silent < 5000:
        events = det.feed(QUIET)
        early.observe(QUIET, events)
        silent += 20
        if any(isinstance(e, TurnEnded) for e in events):
            assert not any(e.by_transcript for e in events if isinstance(e, TurnEnded))
            return silent
        assert not early.turn_over()
    raise AssertionError("the turn never ended")


async def test_a_trailing_and_waits_longer_than_the_silence_rule() -> None:
    det, early = await pause_after_speech("I'd like to talk to sales and")
    assert not early.turn_over()
    silent = await silence_until_turn_end(det, early)
    assert silent >= SILENCE_MS + HOLD_MS


async def test_no_opinion_keeps_the_silence_rule() -> None:
    det, early = await pause_after_speech("sales please")
    assert not early.turn_over()
    silent = await silence_until_turn_end(det, early)
    assert SILENCE_MS <= silent < SILENCE_MS + HOLD_MS


async def test_turned_off_the_transcript_decides_nothing() -> None:
    det = detector()
    early = EarlyTranscriber(ScriptedStt("Sales, please."), None, det, PAUSE_MS)
    for frame in [LOUD] * 10 + [QUIET] * (PAUSE_MS // 20):
        early.observe(frame, det.feed(frame))
    assert early._task is not None
    await until(early._task.done, "the early transcript")
    assert not early.turn_over()


async def test_the_agent_answers_a_complete_sentence_without_waiting_for_the_silence() -> None:
    """Through VoiceAgent: with a 5 s silence rule, a complete sentence is answered once its
    transcript is in, long before 5 s of silence were fed."""
    from bridge.agent.voice import VoiceAgent
    from bridge.config import AgentSettings

    session = FakeSession(make_assistant(first_message=None))
    llm = ScriptedLlm(Step([TextDelta("We open at nine."), Finished("stop")]))
    config = TurnConfig(min_speech_ms=60, silence_ms=5000, preroll_ms=20, trail_ms=20)
    agent = VoiceAgent(
        session,
        llm=llm,
        stt=ScriptedStt("What are your opening hours?"),
        detector=TurnDetector(EnergyVad(), config),
        settings=AgentSettings(early_stt_ms=PAUSE_MS),
    )
    session.conversation = agent
    await agent.start(resumed=False)
    for _ in range(10):
        agent.on_audio(LOUD)
    fed_ms = 0
    while not llm.requests:
        assert fed_ms < 2000, "the turn waited for the silence rule"
        agent.on_audio(QUIET)
        fed_ms += 20
        await until(agent._inbox.empty, "the agent took the frame")
    await until(lambda: session.said, "the reply")
    assert session.said == [("We open at nine.", True)]
    assert any(
        kind == "transcript" and data.get("turn_end") == "transcript"
        for kind, data in session.events
    )
    await agent.close()
