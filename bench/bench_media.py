"""CPU and memory per concurrent media call. Not a test.

No PBX: N calls on loopback, each a real `RtpStream` (µ-law, the shared 20 ms `MediaClock`)
feeding a real `VoiceAgent` (silero VAD + turn detector on every frame, per-call state),
while the assistant talks all the time (RTP out at 50 packets/s) and the caller sends line
hiss (RTP in at 50 packets/s; quiet enough that no turn starts, so STT/LLM stay idle). The
callers run in a separate process, so the CPU measured (getrusage of this process) is the
daemon side only. Target: 100 concurrent media calls under one core.

Run: python bench/bench_media.py [--calls 25 50 100] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import LoopbackCall, seed_assistant

from bridge.llm.base import ChatMessage, Finished, FunctionTool, LlmEvent
from bridge.media.g711 import ulaw_encode
from bridge.media.rtp import MediaClock
from bridge.speech.stt import Transcript
from bridge.speech.vad import SileroVad, TurnConfig, TurnDetector
from tests.support.speech import noise


class IdleStt:
    name = "idle"

    async def transcribe(self, pcm: bytes, sample_rate: int, prompt: str | None = None) -> Any:
        return Transcript("")


class IdleLlm:
    name = "idle"

    async def stream(
        self, messages: Sequence[ChatMessage], tools: Sequence[FunctionTool] = ()
    ) -> AsyncIterator[LlmEvent]:
        yield Finished("stop")

    async def aclose(self) -> None:
        pass


class SilentTts:
    name = "silent"
    sample_rate = 8000

    async def synthesize(self, text: str) -> bytes:
        return b""


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- the callers' process -------------------------------------------------------------------


def run_peers(ports: list[int], seconds: float, listen_port: int) -> None:
    """Send 20 ms µ-law hiss to every port, paced; count what comes back."""
    hiss = ulaw_encode(noise(20, level=0.003))
    inp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inp.bind(("127.0.0.1", listen_port))
    inp.setblocking(False)
    out = inp  # symmetric RTP: the daemon accepts RTP only from where it sends (contract 5)
    received = 0
    seq, ts = 0, 0
    start = time.monotonic()
    tick = 0
    while time.monotonic() - start < seconds:
        header = struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, ts & 0xFFFFFFFF, 1234)
        packet = header + hiss
        for port in ports:
            out.sendto(packet, ("127.0.0.1", port))
        seq, ts, tick = seq + 1, ts + 160, tick + 1
        while True:
            try:
                inp.recv(2048)
                received += 1
            except BlockingIOError:
                break
        delay = start + tick * 0.02 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(json.dumps({"sent": tick * len(ports), "received": received}), flush=True)


# --- the daemon side ------------------------------------------------------------------------


async def measure(n: int, seconds: float) -> dict[str, float]:
    clock = MediaClock()
    peer_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer_sock.bind(("127.0.0.1", 0))
    peer_port = peer_sock.getsockname()[1]
    peer_sock.close()  # the peer process binds it
    rss_before = rss_mb()
    calls: list[LoopbackCall] = []
    ports: list[int] = []
    talk = bytes(16000 * 120)  # 2 minutes of audio to send (silence: content costs nothing)
    for _ in range(n):
        call = LoopbackCall(
            clock,
            assistant=seed_assistant("local"),
            llm=IdleLlm(),
            stt=IdleStt(),
            tts=SilentTts(),
            detector=TurnDetector(SileroVad(8000), TurnConfig()),
        )
        ports.append(await call.open(peer_port))
        call.stream.play(talk)
        calls.append(call)
    rss_after = rss_mb()
    peer = await asyncio.create_subprocess_exec(
        *[sys.executable, __file__, "--peer", json.dumps(ports), str(seconds + 3), str(peer_port)],
        stdout=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(2.0)  # warm up: queues, caches, the clock's schedule
    in0 = sum(c.stream.packets_in for c in calls)
    out0 = sum(c.stream.packets_out for c in calls)
    cpu0, wall0 = cpu_seconds(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu = cpu_seconds() - cpu0
    wall = time.monotonic() - wall0
    packets_in = sum(c.stream.packets_in for c in calls) - in0
    packets_out = sum(c.stream.packets_out for c in calls) - out0
    raw, _ = await peer.communicate()
    stdout = raw.decode()
    for call in calls:
        await call.close()
    await clock.close()
    peer_report = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
    return {
        "calls": n,
        "cpu_core_pct": 100 * cpu / wall,
        "rss_mb": rss_after,
        "rss_per_call_mb": (rss_after - rss_before) / n if n else 0.0,
        "in_pps": packets_in / wall,
        "out_pps": packets_out / wall,
        "peer_received": peer_report.get("received", 0),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    cores = os.cpu_count()
    print(f"machine: {platform.machine()}, {cores} cores, Python {platform.python_version()}")
    SileroVad(8000)  # load the model before measuring memory per call
    idle = await measure(0, 3.0)
    print(f"idle daemon side: {idle['cpu_core_pct']:.1f} % of a core, RSS {idle['rss_mb']:.0f} MB")
    for n in args.calls:
        r = await measure(n, args.seconds)
        per_call = (r["cpu_core_pct"] - idle["cpu_core_pct"]) / n
        print(
            f"{n:4d} calls: {r['cpu_core_pct']:5.1f} % of one core "
            f"({per_call:.2f} % per call), RTP in {r['in_pps']:.0f}/s out {r['out_pps']:.0f}/s, "
            f"RSS {r['rss_mb']:.0f} MB (+{r['rss_per_call_mb'] * 1024:.0f} kB per call)"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        run_peers(json.loads(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
    else:
        asyncio.run(main())
