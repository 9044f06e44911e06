"""STT throughput: N callers speaking at once into the daemon's STT queue. Not a test.

The daemon's own STT stack, built from the settings as `callbridge run` builds it
(`AgentProviders`: `QueuedStt` in front of whisper tiny.en int8, workers / threads / nice /
short window / time budget from `[stt]`), in this process. N simulated callers each say one of
the phrases (flite, through G.711 µ-law, as the turn detector would cut it), wait for their
transcript, listen to a reply for `--listen` seconds, and speak again, for `--seconds`.
The audio does not go through a PBX: STT never touches it (the PBX's CPU is what
`bench_load.py` adds). Reported per N: utterances/s served, each turn's wait for a worker
and its whole STT time (queued → transcript) p50/p95/max, turns over the holding-phrase
delay (`agent.stt_hold_ms`) and over the queue's budget (`stt.max_wait_s`, dropped).

    python bench/bench_stt.py                       # N = 10, 20, 50; ~2 minutes
    python bench/bench_stt.py --callers 20 --stt 'workers = 1'
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bridge.agent.providers import AgentProviders
from bridge.config import Settings
from bridge.speech.stt import QueuedStt, SttTimeout
from tests.support.speech import through_ulaw, utterance

PHRASES = [
    "Hello, what are your opening hours tomorrow?",
    "I would like to talk to billing about my invoice please.",
    "Can you put me through to technical support, my router is broken.",
    "Let me speak to a human.",
    "Do you have a warranty on your products?",
    "Yes.",
]


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))])


async def caller(
    stt: QueuedStt, audio: list[bytes], stop: float, listen: float, out: dict[str, list[float]]
) -> None:
    rng = random.Random()
    await asyncio.sleep(rng.uniform(0, listen))  # callers do not all start at once
    while time.monotonic() < stop:
        pcm = rng.choice(audio)
        await asyncio.sleep(len(pcm) / 16000)  # the caller speaking (the turn is cut after)
        queued = time.monotonic()
        try:
            await stt.transcribe(pcm, 8000)
            out["turn"].append((time.monotonic() - queued) * 1000)
        except SttTimeout:
            out["dropped"].append((time.monotonic() - queued) * 1000)
        await asyncio.sleep(listen)  # listening to the reply


async def one(n: int, args: argparse.Namespace, audio: list[bytes]) -> None:
    settings = Settings.model_validate({"stt": tomllib.loads(args.stt)})
    stt = AgentProviders(settings).stt
    assert isinstance(stt, QueuedStt)
    await stt.warm_up()
    fresh = QueuedStt(stt.inner, stt.workers, max_wait_s=stt.max_wait_s)  # stats of this run
    out: dict[str, list[float]] = {"turn": [], "dropped": []}
    cpu0, t0 = time.process_time(), time.monotonic()
    stop = t0 + args.seconds
    await asyncio.gather(*(caller(fresh, audio, stop, args.listen, out) for _ in range(n)))
    spent = time.monotonic() - t0
    cpu = (time.process_time() - cpu0) / spent * 100
    st = fresh.stats()
    hold = settings.agent.stt_hold_ms
    over_hold = sum(t > hold for t in out["turn"])
    print(
        f"| {n} | {len(out['turn']) / spent:.2f} | {st['wait_p50_ms']} / {st['wait_p95_ms']} / "
        f"{st['wait_max_ms']} | {pct(out['turn'], 0.5)} / {pct(out['turn'], 0.95)} / "
        f"{round(max(out['turn'])) if out['turn'] else None} | {st['decode_p50_ms']} / "
        f"{st['decode_p95_ms']} | {over_hold} of {len(out['turn'])} | {len(out['dropped'])} | "
        f"{cpu:.0f} % |",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", default="10,20,50", help="comma-separated N")
    parser.add_argument("--seconds", type=float, default=30.0, help="per N")
    parser.add_argument("--listen", type=float, default=2.0, help="reply heard between turns")
    parser.add_argument("--stt", default="", help="[stt] settings as TOML, e.g. 'workers = 1'")
    args = parser.parse_args()
    load = os.getloadavg()
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load before {load[0]:.2f}; [stt] {args.stt or '(defaults)'}"
    )
    audio = [through_ulaw(utterance(p)) for p in PHRASES]
    print(
        "| callers | utterances/s | wait for a worker p50/p95/max ms | STT turn (queued → "
        "text) p50/p95/max ms | decode p50/p95 ms | turns over the holding delay | dropped "
        "(over budget) | process CPU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.callers.split(",")):
        await one(n, args, audio)
    load = os.getloadavg()
    print(f"# load after {load[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
