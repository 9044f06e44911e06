"""Turn latency: end of the caller's speech → first RTP packet of the reply. Not a test.

`--pbx` (the figure that counts): through the real lab Asterisk. The daemon runs as
`callbridge run` (its own process); one SIPp caller whose Python RTP peer speaks flite
sentences (µ-law, a frame every 20 ms, silence in between as a phone sends) asks question
after question; end of speech = the last loud 20 ms frame the caller sent, reply = the first
loud packet the caller receives. Two daemons, one after the other on the same Asterisk:

  (pbx-fake) zero-latency providers: STT, LLM and TTS on a fake OpenAI-protocol server on
      loopback that answers at once (the transcript is always a complete sentence, so the
      same turn rules apply: early STT at the pause ends the turn): the turn detector's wait
      + the daemon + Asterisk, without the providers' time;
  (pbx-offline) the offline defaults (silero, whisper tiny.en, the local router, flite).

The assistant has no transfer destinations (the caller must stay with it for every turn):
the local router then answers without its similarity step (~23 ms, bench_speech.py).

Without `--pbx`, loopback without a PBX: a Python RTP peer speaks to a real `RtpStream` +
`VoiceAgent` (bench/harness.py) and timestamps the packets coming back.

  (a) zero-latency fakes for STT, LLM and TTS, real silero VAD: the daemon's own overhead,
      measured from the turn-end decision to the first reply packet (target p95 <= 20 ms);
  (b) the offline defaults (silero, whisper tiny.en int8, the local router, flite): end of
      speech → first reply packet (target p50 <= 800 ms), with early STT (default) and
      without it.

Run: python bench/bench_turn.py --pbx [--rounds N] [--only fake|offline]   (root: lab Asterisk)
     python bench/bench_turn.py [--rounds N] [--only a|b] [--silence-ms MS]
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

import tempfile
from pathlib import Path

from bench_load import DID, Daemon, Line, _Discard, poll, ticker
from harness import LoopbackCall, percentile, seed_assistant, summary

from bridge.config import AgentSettings
from bridge.lab.asterisk import AsteriskLab
from bridge.lab.rtp import RtpPeer, tone_pcm
from bridge.lab.sipp import SippCall
from bridge.llm.base import ChatMessage, Finished, FunctionTool, LlmEvent, TextDelta
from bridge.llm.local import LocalRouter
from bridge.media.rtp import MediaClock
from bridge.speech.stt import Transcript, pcm_to_wav
from bridge.speech.tts import FliteTts
from bridge.speech.vad import SileroVad, TurnConfig, TurnDetector
from bridge.speech.whisper import WhisperStt
from tests.support.fake_openai import FakeOpenAI, Reply
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


# --- through the real lab Asterisk -----------------------------------------------------------

PBX_PHRASES = [
    "Hello, what are your opening hours tomorrow?",
    "Can you tell me where your office is?",
    "I have a question about my order.",
    "Hmm, hello?",
    "Do you have a warranty on your products?",
    "Is anybody there?",
]
VERBOSE = False
GREETING = "Thank you for calling Acme. How can I help you today?"


class FakeSpeechServer(FakeOpenAI):
    """The fake OpenAI server plus `/audio/speech` (a 0.5 s tone as a WAV), all at once."""

    def add_routes(self, app: Any) -> None:
        super().add_routes(app)
        app.router.add_post("/v1/audio/speech", self._speech)

    async def __aenter__(self) -> FakeSpeechServer:
        await super().__aenter__()
        self.default_reply = Reply(text="Sure.", text_pieces=1)
        self.api_key = None
        self.transcriptions = _Discard()
        self.requests = _Discard()
        self.headers = _Discard()
        return self

    async def _transcribe(self, request: Any) -> Any:
        from aiohttp import web

        await request.read()
        return web.json_response({"text": "What are your opening hours?"})

    async def _speech(self, request: Any) -> Any:
        from aiohttp import web

        await request.read()
        return web.Response(body=pcm_to_wav(tone_pcm(440, 0.5), 8000), content_type="audio/wav")


async def pbx_turns(lab: Any, extra: str, provider: str, phrases: list[str]) -> list[float]:
    """One caller through the lab Asterisk asks `phrases` in turn; end of speech → first
    loud reply packet at the caller, ms, for each."""
    work = Path(tempfile.mkdtemp(prefix="bench-turn-"))
    daemon = Daemon(lab, work, {}, extra)
    await daemon.start()
    assistant = {
        "name": "Bench",
        "first_message": GREETING,
        "llm_config": {
            "provider": provider,
            "messages": [{"role": "system", "content": "You are Acme's receptionist."}],
            "tools": [{"type": "end_call"}],
        },
    }
    status, made, _ = await daemon.request("POST", "/assistants", assistant)
    assert status == 201, made
    status, number, _ = await daemon.request(
        "POST", "/numbers", {"number": DID, "assistant_id": made["id"]}
    )
    assert status == 201, number
    peer = await RtpPeer().start()
    line = Line(peer)
    stop = asyncio.Event()
    tick = asyncio.get_running_loop().create_task(ticker([line], stop))
    hold_s = 40 + 12 * len(phrases)
    sipp = SippCall.to_lab(
        lab, DID, rtp_port=peer.port, hold_ms=int(hold_s * 1000), max_seconds=hold_s + 30
    )
    await sipp.start()
    turns: list[float] = []
    try:
        if not await peer.wait_for_packet(timeout=20):
            raise RuntimeError("never answered")
        answered = peer.packets[0].arrival
        greeted = await poll(lambda: line.loud_since(answered), answered + 20, 0.05)
        if greeted is None:
            raise RuntimeError("no greeting")
        await poll(lambda: line.quiet_for(0.8), greeted + 30, 0.05)
        for text in phrases:
            line.say(utterance(text))
            await line.speaking.wait()
            spoke = line.last_loud_sent
            assert spoke is not None
            replied = await poll(lambda s=spoke: line.loud_since(s), spoke + 20, 0.02)
            if replied is None:
                print(f"  no reply for {text!r}")
                continue
            turns.append((replied - spoke) * 1000)
            if VERBOSE:
                print(f"  {turns[-1]:6.0f} ms  {text}")
            # Let the reply play out (no barge-in), and keep the packet list short.
            await poll(lambda: line.quiet_for(0.8), replied + 20, 0.05)
            peer.packets.clear()
    finally:
        stop.set()
        await tick
        await sipp.terminate()
        sipp.cleanup()
        peer.close()
        await daemon.stop()
    return turns


async def pbx_main(args: argparse.Namespace) -> None:
    phrases = PBX_PHRASES * args.rounds
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with AsteriskLab() as lab:
        if args.only in (None, "fake"):
            async with FakeSpeechServer() as fake:
                extra = (
                    f'[stt]\nengine = "openai"\nbase_url = "{fake.base_url}"\n'
                    f'[tts]\nengine = "openai"\nbase_url = "{fake.base_url}"\n'
                    f'[llm]\nbase_url = "{fake.base_url}"\n'
                    f"[vad]\nsilence_ms = {args.silence_ms}\n"
                )
                turns = await pbx_turns(lab, extra, "openai", phrases)
            print(
                f"(pbx-fake) zero-latency STT/LLM/TTS, real Asterisk, silence_ms={args.silence_ms}"
            )
            print(f"    end of speech → first reply audio at the caller: {summary(turns)}")
        if args.only in (None, "offline"):
            extra = f"[vad]\nsilence_ms = {args.silence_ms}\n{args.extra}"
            turns = await pbx_turns(lab, extra, "local", phrases)
            print(
                "(pbx-offline) offline defaults (silero, whisper tiny.en int8, local, flite), "
                f"real Asterisk, silence_ms={args.silence_ms} {args.extra!r}"
            )
            print(f"    end of speech → first reply audio at the caller: {summary(turns)}")
            if turns:
                p50 = statistics.median(turns)
                print(f"    p50 {p50:.0f} ms vs target 700 ms (ratio {p50 / 700:.2f})")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pbx", action="store_true", help="through the real lab Asterisk")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["a", "b", "fake", "offline"])
    parser.add_argument("--silence-ms", type=int, default=500)
    parser.add_argument("--extra", default="", help="more daemon TOML (pbx-offline), e.g. [stt]")
    parser.add_argument("--verbose", action="store_true", help="print every turn")
    args = parser.parse_args()
    global VERBOSE
    VERBOSE = args.verbose
    cores = os.cpu_count()
    print(f"machine: {platform.machine()}, {cores} cores, Python {platform.python_version()}")
    if args.pbx:
        await pbx_main(args)
        return

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
