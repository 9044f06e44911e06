"""Fakes around a `VoiceAgent`: a call session, a scripted LLM and STT, an energy VAD.

The session fake keeps the contract the agent relies on: `say` returns a task that ends when
the audio has played (after `play_s`) or was flushed; `media.flush()` drops interruptible
audio; `command` answers like the real session; `record` keeps the events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from bridge.agent.voice import VoiceAgent
from bridge.calls.model import Call, CallStatus, EndCallCommand, TransferCommand
from bridge.calls.transfer import Transfer, TransferEvent
from bridge.config import AgentSettings
from bridge.directory.models import Assistant
from bridge.llm.base import ChatMessage, Finished, FunctionTool, LlmEvent
from bridge.pbx.ports import DialTarget, LegOutcome
from bridge.speech.stt import Transcript
from bridge.speech.vad import TurnConfig, TurnDetector

DESTINATIONS = [
    {
        "type": "number",
        "number": "+31612345678",
        "description": "Sales team - for pricing and quotes",
        "message": "I'm transferring you to our sales team.",
    },
    {"type": "number", "number": "+31687654321", "description": "Technical support"},
]


def make_assistant(first_message: str | None = "Hello, Acme here.") -> Assistant:
    now = datetime.now(UTC)
    return Assistant.model_validate(
        {
            "id": "a1",
            "name": "Acme",
            "first_message": first_message,
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
        }
    )


@dataclass
class FakePlayout:
    text: str
    interruptible: bool
    done: asyncio.Future[bool]


class FakeMedia:
    def __init__(self) -> None:
        self.playouts: list[FakePlayout] = []
        self.flushes = 0

    @property
    def playing(self) -> bool:
        return any(not p.done.done() for p in self.playouts)

    def flush(self) -> int:
        self.flushes += 1
        dropped = 0
        for p in self.playouts:
            if p.interruptible and not p.done.done():
                p.done.set_result(False)
                dropped += 1
        return dropped


class FakeSession:
    def __init__(self, assistant: Assistant | None = None, play_s: float = 0.05) -> None:
        self.call = Call(
            id="c1",
            pbx="asterisk",
            channel_id="ch1",
            status=CallStatus.ACTIVE,
            started_at=datetime.now(UTC),
        )
        self.assistant = assistant or make_assistant()
        self.media: FakeMedia | None = FakeMedia()
        self.play_s = play_s
        self.said: list[tuple[str, bool]] = []
        self.commands: list[tuple[Any, str, str | None]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.command_error: Exception | None = None

    def say(self, text: str, *, token: str = "", interruptible: bool = True) -> asyncio.Task[None]:
        loop = asyncio.get_running_loop()
        playout = FakePlayout(text, interruptible, loop.create_future())
        self.said.append((text, interruptible))
        assert self.media is not None
        self.media.playouts.append(playout)

        async def play() -> None:
            try:
                await asyncio.wait_for(asyncio.shield(playout.done), self.play_s)
            except TimeoutError:
                playout.done.set_result(True)

        return loop.create_task(play())

    async def command(self, command: Any, *, source: str = "api", label: str | None = None) -> Any:
        await asyncio.sleep(0)
        if self.command_error is not None:
            raise self.command_error
        self.commands.append((command, source, label))
        if isinstance(command, TransferCommand):
            self.call.status = CallStatus.TRANSFERRING
            if command.message:
                self.say(command.message, interruptible=False)
            return {"id": self.call.id, "accepted": "transfer", "transfer_id": "t1"}
        if isinstance(command, EndCallCommand):
            self.call.status = CallStatus.ENDED
            return {"id": self.call.id, "accepted": "end_call"}
        raise AssertionError(command)

    async def record(self, kind: str, **data: Any) -> None:
        self.events.append((kind, data))

    def transcript(self) -> list[tuple[str, str]]:
        return [(d["role"], d["text"]) for k, d in self.events if k == "transcript"]


def failed_transfer(outcome: LegOutcome = LegOutcome.BUSY, sip_code: int = 486) -> Transfer:
    t = Transfer(
        id="t1",
        call_id="c1",
        source="assistant",
        destination="+31612345678",
        target=DialTarget(number="+31612345678"),
        mode="bridge",
        ring_timeout=5,
    )
    t.apply(TransferEvent.MESSAGE_DONE)
    t.settle(TransferEvent.LEG_FAILED, outcome, cause=17, cause_text="User busy", sip_code=sip_code)
    return t


@dataclass
class Step:
    """One scripted LLM reply: events, with `delay` seconds before each; or an error."""

    events: list[LlmEvent] = field(default_factory=list)
    delay: float = 0.0
    error: Exception | None = None


class ScriptedLlm:
    name = "scripted"

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[list[ChatMessage]] = []
        self.tools: list[Sequence[FunctionTool]] = []
        self.abandoned = 0

    async def stream(
        self, messages: Sequence[ChatMessage], tools: Sequence[FunctionTool] = ()
    ) -> AsyncIterator[LlmEvent]:
        self.requests.append(list(messages))
        self.tools.append(tools)
        step = self.steps.pop(0) if self.steps else Step([Finished("stop")])
        finished = False
        try:
            if step.error is not None:
                await asyncio.sleep(step.delay)
                raise step.error
            for event in step.events:
                await asyncio.sleep(step.delay)
                yield event
            finished = True
        finally:
            if not finished:
                self.abandoned += 1

    async def aclose(self) -> None:
        pass


class ScriptedStt:
    name = "scripted"

    def __init__(self, *texts: str | Exception, delay: float = 0.0) -> None:
        self.texts = list(texts)
        self.delay = delay
        self.prompts: list[str | None] = []
        self.lengths: list[int] = []  # bytes of audio per request

    async def transcribe(self, pcm: bytes, sample_rate: int, prompt: str | None = None) -> Any:
        self.prompts.append(prompt)
        self.lengths.append(len(pcm))
        item = self.texts.pop(0) if self.texts else ""
        await asyncio.sleep(self.delay)
        if isinstance(item, Exception):
            raise item
        return Transcript(item, 0.9)


class EnergyVad:
    """Speech = loud 20 ms windows: deterministic turn events for tests."""

    name = "energy"
    sample_rate = 8000
    window_samples = 160

    def is_speech(self, window: bytes) -> float:
        x = np.frombuffer(window, "<i2").astype(np.float64)
        return 1.0 if np.sqrt(np.mean(x * x)) > 1000 else 0.0

    def reset(self) -> None:
        pass


LOUD = (np.sin(np.arange(160) / 2) * 8000).astype("<i2").tobytes()
QUIET = bytes(320)


def make_agent(
    session: FakeSession,
    llm: ScriptedLlm,
    stt: ScriptedStt,
    load_events: Any = None,
    **settings: Any,
) -> VoiceAgent:
    config = TurnConfig(min_speech_ms=60, silence_ms=100, preroll_ms=20, trail_ms=20)
    return VoiceAgent(
        session,
        llm=llm,
        stt=stt,
        detector=TurnDetector(EnergyVad(), config),
        settings=AgentSettings(**settings),
        load_events=load_events,
    )


async def speak(agent: VoiceAgent, ms: int = 200, then_silence_ms: int = 200) -> None:
    """The caller talks for `ms`, then is quiet: frames in real time (20 ms each)."""
    for _ in range(ms // 20):
        agent.on_audio(LOUD)
        await asyncio.sleep(0.002)
    for _ in range(then_silence_ms // 20):
        agent.on_audio(QUIET)
        await asyncio.sleep(0.002)


async def settle(seconds: float = 0.1) -> None:
    await asyncio.sleep(seconds)
