"""Fakes around a `VoiceAgent`: a call session, a scripted LLM and STT, an energy VAD.

`FakeSession` is the real `CallSession` (commands, transfers and their results take the real
path) on a fake PBX and fake media: `say` returns a task that ends when the audio has played
(after `play_s`) or was flushed; `media.flush()` drops interruptible audio; `record` keeps
the events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from bridge.agent.voice import VoiceAgent
from bridge.calls.model import Call, CallEvent, CallStatus
from bridge.calls.service import CallService
from bridge.calls.session import CallSession
from bridge.calls.transfer import Transfer, TransferEvent
from bridge.config import AgentSettings, Settings
from bridge.directory.models import Assistant
from bridge.llm.base import ChatMessage, Finished, FunctionTool, LlmEvent
from bridge.pbx.ports import DialTarget, LegOutcome, PbxEvent
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
    queued: bool = True  # still in the media queue (a cancelled waiter does not unqueue it)
    claimed: bool = False  # the session's speech task queued its audio


class FakeMedia:
    """Stands in for the call's `RtpStream`: a playout "plays" for `play_s` unless flushed.
    The fake TTS below synthesises text as its UTF-8 bytes, so each playout knows its text."""

    def __init__(self, play_s: float) -> None:
        self.play_s = play_s
        self.playouts: list[FakePlayout] = []
        self.flushes = 0  # flushes that cut audio (a flush with nothing queued cuts nothing)
        self.closed = False

    def reserve(self, text: str, interruptible: bool) -> FakePlayout:
        """`say` was called: the playout exists from now on (as the old fake had it), and
        plays once the session's speech task queues its audio."""
        loop = asyncio.get_running_loop()
        playout = FakePlayout(text, interruptible, loop.create_future())
        self.playouts.append(playout)
        return playout

    def play(
        self,
        pcm: bytes,
        *,
        interruptible: bool = True,
        on_start: Callable[[], None] | None = None,
    ) -> FakePlayout:
        text = pcm.decode()
        playout = next(
            (p for p in self.playouts if not p.claimed and p.text == text), None
        ) or self.reserve(text, interruptible)
        playout.claimed = True
        if playout.queued:
            if on_start is not None:  # its first frame "goes out" now (RtpStream: next tick)
                on_start()
            asyncio.get_running_loop().call_later(self.play_s, _finish, playout, True)
        return playout

    @property
    def playing(self) -> bool:
        return any(p.queued for p in self.playouts)

    def flush(self) -> int:
        dropped = 0
        for p in self.playouts:
            if p.interruptible and p.queued:
                _finish(p, False)
                dropped += 1
        self.flushes += dropped > 0
        return dropped

    def close(self) -> None:
        self.closed = True
        for p in self.playouts:
            _finish(p, False)


def _finish(playout: FakePlayout, played: bool) -> None:
    playout.queued = False
    if not playout.done.done():
        playout.done.set_result(played)


class TextTts:
    name = "text"
    sample_rate = 8000

    async def synthesize(self, text: str) -> bytes:
        return text.encode()


class MemoryStore:
    """The writes a session makes, kept in memory (the session tests use real SQLite)."""

    def __init__(self) -> None:
        self.calls: dict[str, Call] = {}
        self.transfers_by_id: dict[str, Transfer] = {}
        self.events_by_call: dict[str, list[CallEvent]] = {}

    async def save(self, call: Call) -> None:
        self.calls[call.id] = call

    async def save_transfer(self, transfer: Transfer) -> None:
        self.transfers_by_id[transfer.id] = transfer

    async def add_event(self, call_id: str, event: CallEvent) -> None:
        self.events_by_call.setdefault(call_id, []).append(event)

    async def save_state(
        self,
        call: Call | None = None,
        transfer: Transfer | None = None,
        events: list[CallEvent] | None = None,
        *,
        call_id: str | None = None,
    ) -> None:
        if call is not None:
            await self.save(call)
        if transfer is not None:
            await self.save_transfer(transfer)
        owner = call.id if call is not None else call_id
        for event in events or ():
            assert owner is not None
            await self.add_event(owner, event)

    async def transfers(self, call_id: str) -> list[Transfer]:
        return [t for t in self.transfers_by_id.values() if t.call_id == call_id]


class FakeSession(CallSession):
    """The REAL call session (its command, transfer and end semantics) on a fake PBX that
    records verbs, an in-memory store and fake media; it keeps what the agent tests look
    at: `said`, `commands`, `events`, `transcript()`, and `command_error` to refuse."""

    def __init__(self, assistant: Assistant | None = None, play_s: float = 0.05) -> None:
        from tests.support.calls import FakeDirectory, FakePbx

        self.pbx = FakePbx()
        service = CallService(
            settings=Settings(),
            pbx=self.pbx,
            pbx_name="asterisk",
            store=MemoryStore(),  # type: ignore[arg-type]
            directory=FakeDirectory(),
            tts=TextTts(),
        )
        service.settings.transfer.default_route = "PJSIP/{number}@carrier"
        call = Call(
            id="c1",
            pbx="asterisk",
            channel_id="ch1",
            status=CallStatus.ACTIVE,
            started_at=datetime.now(UTC),
            number_id="n1",
        )
        super().__init__(service, call, assistant or make_assistant())
        self._fake_media = FakeMedia(play_s)
        self.media = self._fake_media  # type: ignore[assignment]
        self.commands: list[tuple[Any, str, str | None]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.command_error: Exception | None = None
        service._by_id[call.id] = self
        service._by_channel[call.channel_id] = self
        self.start(PbxEvent(""))  # the call's task runs; this first item does nothing

    def _new_transfer_id(self) -> str:
        """Transfers are numbered t1, t2, ... (as `failed_transfer()` builds them)."""
        self._transfer_seq = getattr(self, "_transfer_seq", 0) + 1
        return f"t{self._transfer_seq}"

    def say(
        self,
        text: str,
        *,
        token: str = "",
        interruptible: bool = True,
        on_start: Callable[[], None] | None = None,
    ) -> asyncio.Task[None]:
        self._fake_media.reserve(text, interruptible)
        return super().say(text, token=token, interruptible=interruptible, on_start=on_start)

    @property
    def said(self) -> list[tuple[str, bool]]:
        """What was queued for the caller, in order: (text, interruptible)."""
        return [(p.text, p.interruptible) for p in self._fake_media.playouts]

    async def command(
        self, command: Any, *, source: str = "api", label: str | None = None
    ) -> dict[str, Any]:
        if self.command_error is not None:
            raise self.command_error
        self.commands.append((command, source, label))
        return await super().command(command, source=source, label=label)

    async def record(self, kind: str, **data: Any) -> None:
        self.events.append((kind, data))
        await super().record(kind, **data)

    def transcript(self) -> list[tuple[str, str]]:
        return [(d["role"], d["text"]) for k, d in self.events if k == "transcript"]

    @property
    def leg(self) -> str | None:
        """The outbound leg of the current transfer, once placed."""
        return self.transfer.leg_id if self.transfer is not None else None


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
    agent = VoiceAgent(
        session,
        llm=llm,
        stt=stt,
        detector=TurnDetector(EnergyVad(), config),
        settings=AgentSettings(**settings),
        load_events=load_events,
    )
    session.conversation = agent  # the session tells it transfer results, as in a call
    return agent


async def speak(agent: VoiceAgent, ms: int = 200, then_silence_ms: int = 200) -> None:
    """The caller talks for `ms`, then is quiet: frames in real time (20 ms each)."""
    for _ in range(ms // 20):
        agent.on_audio(LOUD)
        await asyncio.sleep(0.002)
    for _ in range(then_silence_ms // 20):
        agent.on_audio(QUIET)
        await asyncio.sleep(0.002)
