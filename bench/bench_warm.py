"""Warm transfer: the agent's accept (DTMF 1) → the caller hears the agent, through the real
lab Asterisk. Not a test.

Each sample is one call: a SIPp caller (with a Python RTP peer) is greeted, transferred warm
(`require_accept`, a one-word brief) through the number's trunk to a SIPp UAS whose media is a
second RTP peer, the agent. Once the brief has played (`awaiting_accept`) the agent talks
continuously (a 1000 Hz tone, as a phone sends RTP) and presses 1 (RFC 4733: 160 ms of key,
then the end packets; Asterisk reports the key at its end). Stamped with `time.monotonic()`
in this process: the key's first packet sent (`RtpPeer.dtmf_started`), its end packets sent,
and the arrival at the caller of the first 20 ms packet that is mostly 1000 Hz (the agent).

Run (as root, for the lab's chroot): python bench/bench_warm.py [--samples N]
Published figures: under the exclusive CPU lock on an idle machine (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bridge.lab.asterisk import AsteriskLab, free_port
from bridge.lab.harness import Api, start_daemon, wait_for
from bridge.lab.rtp import RtpPeer, band_share, rms
from bridge.media.g711 import alaw_decode, ulaw_decode
from tests.support.flows import (
    LabCall,
    heard_speech,
    setup_directory,
    transfer_in_state,
    transfer_warm,
)

AGENT_HZ = 1000.0


def first_agent_packet(peer: RtpPeer, since: float) -> float | None:
    """Arrival of the first packet after `since` that is the agent's tone."""
    for p in peer.packets:
        if p.arrival < since or p.payload_type not in (0, 8):
            continue
        pcm = (ulaw_decode if p.payload_type == 0 else alaw_decode)(p.payload)
        if rms(pcm) > 300 and band_share(pcm, (AGENT_HZ,), width=60) > 0.6:
            return p.arrival
    return None


async def talk(agent: RtpPeer) -> None:
    """The agent's phone sends audio all along, 100 ms at a time, so that its key (which
    waits for the peer's send lock) goes out between two of them, as a phone's would."""
    while True:
        await agent.send_tone(AGENT_HZ, 0.1)


async def sample(lab: AsteriskLab, api: Api, uas_port: int) -> tuple[float, float]:
    async with LabCall(lab, api, local_port=uas_port) as lab_call:
        call = await lab_call.dial(hold_ms=60000)
        await heard_speech(lab_call.caller_rtp, since=0)
        await transfer_warm(api, call["id"], brief="Test.")
        await transfer_in_state(api, call["id"], "awaiting_accept")
        agent = lab_call.dest_rtp
        talking = asyncio.create_task(talk(agent))
        try:
            await asyncio.sleep(0.2)  # a steady stream before the key, as a phone
            await agent.send_dtmf("1")
            ended = time.monotonic()
            assert agent.dtmf_started is not None
            pressed = agent.dtmf_started
            heard = await wait_for(
                lambda: first_agent_packet(lab_call.caller_rtp, pressed), "the agent", 10, 0.005
            )
        finally:
            talking.cancel()
        await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
        await transfer_in_state(api, call["id"], "bridged")
        return (heard - pressed) * 1000, (heard - ended) * 1000


async def run(args: argparse.Namespace) -> dict[str, list[float]]:
    lab = AsteriskLab().start()
    tmp = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    try:
        policy = {"allowed_prefixes": ["+31"], "allowed_sip_domains": ["127.0.0.1"]}
        daemon, api = await start_daemon(lab, tmp, transfer=policy, log_level="warning")
        try:
            uas_port = free_port()

            class _Trunk:
                local_port = uas_port

            await setup_directory(api, _Trunk(), auth=False)  # type: ignore[arg-type]
            press, end = [], []
            for i in range(args.samples + args.warmup):
                from_press, from_end = await sample(lab, api, uas_port)
                if i >= args.warmup:
                    press.append(from_press)
                    end.append(from_end)
                    print(f"sample {i - args.warmup + 1}: {from_press:.1f} ms / {from_end:.1f} ms")
        finally:
            await api.close()
            await daemon.stop()
    finally:
        lab.stop()
    load = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, load {load[0]:.2f} {load[1]:.2f} (at the end)"
    )
    print("| from | n | min | p50 | max |")
    print("|---|---|---|---|---|")
    for name, values in (("the key's first packet", press), ("the key's end", end)):
        print(
            f"| {name} → the caller hears the agent | {len(values)} | {min(values):.0f} ms | "
            f"{statistics.median(values):.0f} ms | {max(values):.0f} ms |"
        )
    return {"press": press, "end": end}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="write every sample (ms) to this file")
    args = parser.parse_args()
    samples = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(samples))


if __name__ == "__main__":
    main()
