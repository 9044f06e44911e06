"""Per-call costs of the offline speech parts, on this machine. Not a test.

Run: python bench/bench_speech.py   (numbers go to docs/speech-notes.md by hand)
"""

from __future__ import annotations

import asyncio
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bridge.llm.local import LocalRouter
from bridge.llm.minilm import shared_embedder
from bridge.media.resample import StreamResampler
from bridge.speech.tts import make_tts
from bridge.speech.vad import SileroVad, TurnDetector, WebRtcVad
from bridge.speech.whisper import WhisperStt
from tests.support.speech import frames, through_ulaw, utterance

PHRASES = [
    "I would like to talk to billing about my invoice please.",
    "Can you put me through to technical support, my router is broken.",
    "I want a quote for your new products.",
    "Let me speak to a human.",
    "How much does the premium plan cost per month?",
]
SENTENCES = [
    "I'm transferring you to our sales team, one moment please.",
    "I can connect you with sales, technical support or billing. Which would you like?",
    "Thank you for calling. Goodbye.",
]
DESTINATIONS = {
    "sales_team": "Sales team - for pricing and quotes",
    "technical_support": "Technical support - for product issues and troubleshooting",
    "billing_department": "Billing department - for invoice and payment questions",
}


def per_call(fn: Callable[[], object], n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


async def main() -> None:
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    audio = [through_ulaw(utterance(p)) for p in PHRASES]
    call_audio = b"".join(audio)
    call_frames = frames(call_audio)

    for name, make in [("silero", SileroVad), ("webrtc", WebRtcVad)]:
        detector = TurnDetector(make())
        start = time.perf_counter()
        for _ in range(3):
            for frame in call_frames:
                detector.feed(frame)
        per = (time.perf_counter() - start) / (3 * len(call_frames))
        print(f"VAD {name}: {per * 1e6:.1f} µs per 20 ms frame (turn detector included)")

    for a, b in [(8000, 16000), (22050, 8000), (16000, 8000)]:
        resampler = StreamResampler(a, b)
        frame = b"\x01\x00" * (a // 50)
        cost = per_call(lambda r=resampler, f=frame: r.process(f), 2000)  # type: ignore[misc]
        print(
            f"stream resample {a}->{b}: {cost * 1e6:.1f} µs per 20 ms frame, "
            f"delay {resampler.delay_ms:.1f} ms"
        )

    for compute in ("int8", "float32"):
        stt = WhisperStt(compute_type=compute)
        start = time.perf_counter()
        await stt.warm_up()
        load = time.perf_counter() - start
        times = []
        for pcm in audio:
            start = time.perf_counter()
            text = (
                await stt.transcribe(pcm, 8000, prompt="sales, technical support, billing")
            ).text
            times.append(time.perf_counter() - start)
        durations = [len(p) / 16000 for p in audio]
        print(
            f"STT whisper tiny.en {compute}: load+warm-up {load:.2f} s; per utterance "
            f"median {ms(statistics.median(times))}, max {ms(max(times))} "
            f"(utterances {min(durations):.1f}-{max(durations):.1f} s); last: {text!r}"
        )

    for engine in ("flite", "espeak-ng", "piper"):
        try:
            tts = make_tts(engine)
            start = time.perf_counter()
            await tts.synthesize("Hello.")
            first = time.perf_counter() - start
        except Exception as exc:  # a bench reports and goes on
            print(f"TTS {engine}: unavailable ({exc})")
            continue
        times = []
        for sentence in SENTENCES * 3:
            start = time.perf_counter()
            await tts.synthesize(sentence)
            times.append(time.perf_counter() - start)
        print(
            f"TTS {engine}: first call {ms(first)}; per sentence median "
            f"{ms(statistics.median(times))}, max {ms(max(times))}"
        )

    start = time.perf_counter()
    embedder = shared_embedder()
    print(
        f"MiniLM load {ms(time.perf_counter() - start)}; per utterance "
        f"{ms(per_call(lambda: embedder.embed([PHRASES[0]]), 50))}"
    )
    router = LocalRouter(embedder=embedder)
    router.route(PHRASES[1], DESTINATIONS, True)  # embeds the descriptions once
    times = []
    for phrase in PHRASES * 10:
        start = time.perf_counter()
        router.route(phrase, DESTINATIONS, True)
        times.append(time.perf_counter() - start)
    print(
        f"local router: per utterance median {ms(statistics.median(times))}, max {ms(max(times))}"
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS with every model loaded: {rss:.0f} MB")


if __name__ == "__main__":
    asyncio.run(main())
