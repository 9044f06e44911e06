"""Turn latency: end of the caller's speech → first RTP packet of the reply. Not a test.

Loopback, no PBX: a Python RTP peer speaks flite sentences (µ-law, paced in real time) to a
real `RtpStream` + `VoiceAgent` (bench/harness.py) and timestamps the packets coming back.

  (a) zero-latency fakes for STT, LLM and TTS, real silero VAD: the daemon's own overhead,
      measured from the turn-end decision to the first reply packet (target p95 <= 20 ms);
  (b) the offline defaults (silero, whisper tiny.en int8, the local router, flite): end of
      speech → first reply packet (target p50 <= 800 ms), with early STT (default) and
      without it.

Run: python bench/bench_turn.py [--rounds N] [--only a|b] [--silence-ms MS]
(results: docs/BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import LoopbackCall, percentile, seed_assistant, summary

from bridge.config import AgentSettings
from bridge.lab.rtp import RtpPeer, tone_pcm
from bridge.llm.base import ChatMessage, Finished, FunctionTool, LlmEvent, TextDelta
from bridge.llm.local import LocalRouter
from bridge.media.rtp import MediaClock
from bridge.speech.stt import Transcript
from bridge.speech.tts import FliteTts
from bridge.speech.vad import SileroVad, TurnConfig, TurnDetector
from bridge.speech.whisper import WhisperStt
from tests.support.speech import silence, utterance

PHRASES = [
    "I'd like to talk to someone in sales about pricing.",
    "I would like to talk to billing about my invoice please.",
    "Can you put me through to technical support, my router is broken.",
    "I want a quote for your new products.",
    "Let me speak to a human.",
    "Hmm, hello?",
]


class InstantStt:
    name = "instant"

    async def transcribe(self, pcm: bytes, sample_rate: int, prompt: str | None = None) -> Any:
        return Transcript("sales please", 1.0)


class InstantLlm:
    name = "instant"

    async def stream(
        self, messages: Sequence[ChatMessage], tools: Sequence[FunctionTool] = ()
    ) -> AsyncIterator[LlmEvent]:
        yield TextDelta("Sure.")
        yield Finished("stop")

    async def aclose(self) -> None:
        pass


class InstantTts:
    name = "instant"
    sample_rate = 8000
    _pcm = tone_pcm(440, 0.3)

    async def synthesize(self, text: str) -> bytes:
        return self._pcm


def speech_end(pcm: bytes, threshold: int = 300) -> float:
    """Seconds from the start of `pcm` to its last loud 10 ms (the end of speech)."""
    import numpy as np

    x = np.abs(np.frombuffer(pcm, "<i2").astype(np.int32))
    frames = x[: len(x) // 80 * 80].reshape(-1, 80).max(axis=1)
    loud = np.nonzero(frames > threshold)[0]
    return (int(loud[-1]) + 1) * 80 / 8000 if len(loud) else 0.0


async def wait_quiet(peer: RtpPeer, quiet: float = 0.4, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if peer.went_quiet(quiet):
            return
        await asyncio.sleep(0.05)


async def run_turns(
    call_kwargs: dict[str, Any], phrases: list[str], rounds: int, tail_ms: int
) -> tuple[list[float], list[float]]:
    """Returns (end of speech → first reply packet, turn-end decision → first packet), ms."""
    clock = MediaClock()
    async with RtpPeer() as peer:
        call = LoopbackCall(clock, **call_kwargs)
        port = await call.open(peer.port)
        peer.set_remote("127.0.0.1", port)
        from_speech: list[float] = []
        from_decision: list[float] = []
        for text in phrases * rounds:
            pcm = utterance(text)
            end = speech_end(pcm)
            peer.clear()
            turns_before = len(call.turn_ends)
            start = time.monotonic()
            await peer.send_pcm(pcm + silence(tail_ms))
            await wait_quiet(peer)
            # The first loud packet: silence frames flow between replies.
            first = peer.loud_since(start + end)
            if first is None or len(call.turn_ends) == turns_before:
                print(f"  no reply for {text!r}")
                continue
            from_speech.append((first - (start + end)) * 1000)
            from_decision.append((first - call.turn_ends[turns_before]) * 1000)
        await call.close()
    await clock.close()
    return from_speech, from_decision


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["a", "b"])
    parser.add_argument("--silence-ms", type=int, default=500)
    args = parser.parse_args()
    cores = os.cpu_count()
    print(f"machine: {platform.machine()}, {cores} cores, Python {platform.python_version()}")

    if args.only in (None, "a"):
        speech, decision = await run_turns(
            {
                "assistant": seed_assistant("openai"),
                "llm": InstantLlm(),
                "stt": InstantStt(),
                "tts": InstantTts(),
                "detector": TurnDetector(SileroVad(8000), TurnConfig()),
            },
            ["Sales please."],
            args.rounds * 10,
            tail_ms=900,
        )
        print("(a) zero-latency providers, silero VAD, silence_ms=500")
        print(f"    turn-end decision → first reply packet: {summary(decision)}")
        print(f"    end of speech → first reply packet:     {summary(speech)}")
        print(f"    overhead p95 {percentile(decision, 0.95):.1f} ms vs target 20 ms")

    if args.only in (None, "b"):
        stt = WhisperStt()
        await stt.warm_up()
        router = LocalRouter()
        await router.warm_up()
        silence_ms = args.silence_ms
        for early_ms in (200, 0):
            speech, decision = await run_turns(
                {
                    "assistant": seed_assistant("local"),
                    "llm": router,
                    "stt": stt,
                    "tts": FliteTts(),
                    "detector": TurnDetector(SileroVad(8000), TurnConfig(silence_ms=silence_ms)),
                    "settings": AgentSettings(early_stt_ms=early_ms),
                },
                PHRASES,
                args.rounds,
                tail_ms=silence_ms + 600,
            )
            print(
                "(b) offline defaults (silero, whisper tiny.en int8, local, flite), "
                f"silence_ms={silence_ms}, early_stt_ms={early_ms}"
            )
            print(f"    end of speech → first reply packet:     {summary(speech)}")
            print(f"    turn-end decision → first reply packet: {summary(decision)}")
            p50 = statistics.median(speech)
            print(f"    p50 {p50:.0f} ms vs target 800 ms (ratio {p50 / 800:.2f})")


if __name__ == "__main__":
    asyncio.run(main())
