"""A call on loopback without a PBX, for the conversation benchmarks.

`LoopbackCall` is the daemon side: a real `RtpStream` on the shared `MediaClock` and a real
`VoiceAgent`, with a session stand-in that speaks like `CallSession` (TTS one utterance at a
time, then `media.play`) and runs transfer / end-call commands by speaking their message
(no PBX to hand the caller to). The caller side is an `RtpPeer` sending paced µ-law.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.agent.voice import VoiceAgent
from bridge.calls.model import Call, CallStatus, EndCallCommand, TransferCommand
from bridge.config import AgentSettings
from bridge.directory.models import Assistant
from bridge.llm.base import LlmProvider
from bridge.media.rtp import MediaClock, RtpStream
from bridge.speech.stt import SttProvider
from bridge.speech.tts import TtsProvider
from bridge.speech.vad import TurnDetector

SEED_TOOLS = [
    {
        "type": "transfer_call",
        "destinations": [
            {
                "type": "number",
                "number": "+31612345678",
                "description": "Sales team - for pricing and quotes",
                "message": "I'm transferring you to our sales team, one moment please.",
            },
            {
                "type": "number",
                "number": "+31687654321",
                "description": "Technical support - for product issues and troubleshooting",
                "message": "I'm transferring you to technical support.",
            },
            {
                "type": "number",
                "number": "+31698765432",
                "description": "Billing department - for invoice and payment questions",
                "message": "I'm transferring you to the billing department.",
            },
        ],
    },
    {"type": "end_call"},
]
_ids = itertools.count(1)


def seed_assistant(provider: str = "local", first_message: str | None = None) -> Assistant:
    now = datetime.now(UTC)
    return Assistant.model_validate(
        {
            "id": "bench",
            "name": "Bench",
            "first_message": first_message,
            "created_at": now,
            "updated_at": now,
            "llm_config": {
                "provider": provider,
                "messages": [{"role": "system", "content": "You are Acme's support agent."}],
                "tools": SEED_TOOLS,
            },
        }
    )


class LoopbackSession:
    """The parts of `CallSession` the agent uses, over a real RtpStream."""

    def __init__(self, assistant: Assistant, tts: TtsProvider, media: RtpStream) -> None:
        self.call = Call(
            id=f"bench-{next(_ids)}",
            pbx="bench",
            channel_id="bench",
            status=CallStatus.ACTIVE,
            started_at=datetime.now(UTC),
        )
        self.assistant = assistant
        self.media: RtpStream | None = media
        self.tts = tts
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._order = asyncio.Lock()

    def say(self, text: str, *, token: str = "", interruptible: bool = True) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self._speak(text, interruptible))

    async def _speak(self, text: str, interruptible: bool) -> None:
        async with self._order:
            pcm = await self.tts.synthesize(text)
            assert self.media is not None
            playout = self.media.play(pcm, interruptible=interruptible)
        await playout.done

    async def command(self, command: Any, *, source: str = "api", label: str | None = None) -> Any:
        if isinstance(command, TransferCommand | EndCallCommand) and command.message:
            if self.media is not None:
                self.media.flush()
            self.say(command.message, interruptible=False)
        return {"id": self.call.id, "transfer_id": f"t{next(_ids)}"}

    async def record(self, kind: str, **data: Any) -> None:
        self.events.append((kind, data))


class LoopbackCall:
    """Daemon side of one call: RTP stream + agent, opened on 127.0.0.1."""

    def __init__(
        self,
        clock: MediaClock,
        *,
        assistant: Assistant,
        llm: LlmProvider,
        stt: SttProvider,
        tts: TtsProvider,
        detector: TurnDetector,
        settings: AgentSettings | None = None,
    ) -> None:
        self.clock = clock
        self.stream = RtpStream("ulaw", on_audio=self._on_audio)
        self.session = LoopbackSession(assistant, tts, self.stream)
        self.agent = VoiceAgent(
            self.session,
            llm=llm,
            stt=stt,
            detector=detector,
            settings=settings or AgentSettings(),
        )
        self.turn_ends: list[float] = []  # monotonic time of each TurnEnded decision
        original = self.agent._on_turn_ended

        def on_turn_ended(event: Any) -> None:
            import time

            self.turn_ends.append(time.monotonic())
            original(event)

        self.agent._on_turn_ended = on_turn_ended  # type: ignore[method-assign]

    def _on_audio(self, pcm: bytes) -> None:
        self.agent.on_audio(pcm)

    async def open(self, peer_port: int) -> int:
        _, port = await self.stream.open("127.0.0.1", self.clock)
        self.stream.set_remote("127.0.0.1", peer_port)
        await self.agent.start(resumed=False)
        return port

    async def close(self) -> None:
        await self.agent.close()
        self.stream.close()


def summary(values_ms: list[float]) -> str:
    if not values_ms:
        return "n=0"
    ordered = sorted(values_ms)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"n={len(ordered)} median={statistics.median(ordered):.1f} ms "
        f"p95={p95:.1f} ms min={ordered[0]:.1f} max={ordered[-1]:.1f}"
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
