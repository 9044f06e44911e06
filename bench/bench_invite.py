"""Transfer decided → INVITE on the wire, through the real lab Asterisk. Not a test.

One run, one Asterisk, one trunk, one SIP peer; three ways to send the same INVITE, sampled
in turn so that they share the machine's conditions:

  (limit)     Asterisk's own originate: `POST /ari/channels?endpoint=PJSIP/<n>@<trunk>` →
              INVITE. What no ARI application can beat.
  (api)       callbridge's control API: `POST /calls/{id}/control {"type": "transfer"}` (no
              message) → INVITE.
  (assistant) the assistant's tool decision → INVITE: a caller (SIPp + an RTP peer) speaks,
              the model (the fake OpenAI server, answering with a `transfer_call` to a
              destination with no message) decides, and the decision is stamped when the
              assistant's command reaches the call (`CallSession.command`, source
              "assistant", after any preface it spoke; there is none here).

The INVITE is timestamped by the SIP peer: a separate process (not the daemon's event loop,
not its GIL) reading a UDP socket, `time.monotonic()` at receipt (CLOCK_MONOTONIC: the same
clock as the daemon's process). It answers 486 at once, so each transfer fails back to the
assistant and the next sample starts from an active call.

Run (as root, for the lab's chroot): python bench/bench_invite.py [--samples N] [--spoken N]
Published figures: under the exclusive CPU lock on an idle machine (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp

from bridge import eventloop
from bridge.calls.model import TransferCommand
from bridge.calls.service import CallService
from bridge.calls.session import CallSession
from bridge.calls.transferring import TransferRun
from bridge.lab.asterisk import AsteriskLab
from bridge.lab.harness import Api, start_daemon, wait_for
from bridge.lab.rtp import RtpPeer
from bridge.lab.sipp import SippCall
from bridge.pbx.asterisk.adapter import AsteriskAdapter
from bridge.pbx.asterisk.dialing import dial_string
from bridge.pbx.ports import DialTarget
from tests.support.fake_openai import FakeOpenAI, FakeToolCall, Reply
from tests.support.speech import silence, utterance

DID = "+31201234567"
SUPPORT = "+31687654321"  # no message: the transfer goes out at once
SPOKEN = "Please put me through to technical support."


# --- the SIP peer (its own process) --------------------------------------------------------


def _response(request: str, code: int, reason: str) -> bytes:
    head, _, _ = request.partition("\r\n\r\n")
    lines = head.split("\r\n")
    keep: list[str] = []
    for line in lines[1:]:
        name = line.split(":", 1)[0].strip().lower()
        if name in ("via", "v", "from", "f", "call-id", "i", "cseq"):
            keep.append(line)
        elif name in ("to", "t"):
            keep.append(line if ";tag=" in line else f"{line};tag=bench{os.getpid()}")
    return (
        "\r\n".join([f"SIP/2.0 {code} {reason}", *keep, "Content-Length: 0"]) + "\r\n\r\n"
    ).encode()


def sip_peer(ready: Any, invites: Any) -> None:
    """INVITE → (monotonic time, request URI) on `invites`, answered 486; BYE/CANCEL/OPTIONS
    → 200; ACK ignored."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    ready.put(sock.getsockname()[1])
    while True:
        data, addr = sock.recvfrom(65535)
        at = time.monotonic()
        text = data.decode("utf-8", "replace")
        first = text.split("\r\n", 1)[0]
        method = first.split(" ", 1)[0]
        if method == "INVITE":
            invites.put((at, first.split(" ")[1]))
            sock.sendto(_response(text, 486, "Busy Here"), addr)
        elif method in ("BYE", "CANCEL", "OPTIONS"):
            sock.sendto(_response(text, 200, "OK"), addr)


# --- the run --------------------------------------------------------------------------------


def stats(name: str, values: list[float], limit: float | None) -> dict[str, Any]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    p50 = statistics.median(ordered)
    row = {"name": name, "n": len(ordered), "p50": p50, "p99": p99, "max": ordered[-1]}
    row["ratio"] = p50 / limit if limit else 1.0
    return row


async def next_invite(invites: Any, timeout: float = 10.0) -> tuple[float, str]:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: invites.get(timeout=timeout))


# Where a control POST's time goes before the INVITE: the first time each stage is reached
# after the POST is sent (stage -> monotonic time), reset per sample.
STAGES = ("service", "session", "authorised", "originate")
stamps: dict[str, float] = {}


def _stamp_at(cls: Any, name: str, stage: str, when: Any = None) -> None:
    real = getattr(cls, name)

    async def stamped(self: Any, *args: Any, **kwargs: Any) -> Any:
        if stage not in stamps and (when is None or when(*args)):
            stamps[stage] = time.monotonic()
        return await real(self, *args, **kwargs)

    setattr(cls, name, stamped)


def instrument() -> None:
    """Stamps: the API handler reached the call service (HTTP, key, validation done); the
    call's task took the command; the policy authorised it (the run begins); the ARI
    originate request is sent."""
    _stamp_at(CallService, "control", "service")
    _stamp_at(CallSession, "_on_command", "session")
    _stamp_at(TransferRun, "begin", "authorised")
    _stamp_at(AsteriskAdapter, "_call", "originate", lambda method, path, *_: path == "/channels")


async def run(args: argparse.Namespace, port: int, invites: Any) -> None:
    decided: list[float] = []
    real_command = CallSession.command
    instrument()

    async def stamped(self: CallSession, command: Any, **kwargs: Any) -> dict[str, Any]:
        if kwargs.get("source") == "assistant" and isinstance(command, TransferCommand):
            decided.append(time.monotonic())
        return await real_command(self, command, **kwargs)

    CallSession.command = stamped  # type: ignore[method-assign]
    lab = AsteriskLab().start()
    tmp = Path(tempfile.mkdtemp(prefix="bench-invite-"))
    try:
        async with FakeOpenAI(api_key="bench") as llm:
            llm.default_reply = Reply(text="Alright.")
            daemon, api = await start_daemon(
                lab,
                tmp,
                llm={"base_url": llm.base_url, "api_key": "bench"},
                transfer={"max_per_call": 100},
                log_level="warning",
            )
            try:
                await measure(args, lab, api, port, invites, llm, decided)
            finally:
                await api.close()
                await daemon.stop()
    finally:
        CallSession.command = real_command  # type: ignore[method-assign]
        lab.stop()


async def provision(api: Api, port: int) -> str:
    assistant = await api.ok(
        "POST",
        "/assistants",
        {
            "name": "Bench",
            "first_message": "Hello.",
            "llm_config": {
                "provider": "openai",
                "model": "bench",
                "messages": [{"role": "system", "content": "Transfer when asked."}],
                "tools": [
                    {
                        "type": "transfer_call",
                        "destinations": [
                            {
                                "type": "number",
                                "number": SUPPORT,
                                "description": "Technical support",
                            }
                        ],
                    }
                ],
            },
        },
    )
    number = await api.ok("POST", "/numbers", {"number": DID, "assistant_id": assistant["id"]})
    trunk = await api.ok(
        "POST", "/sip-trunks", {"name": "bench", "host": "127.0.0.1", "port": port}
    )
    await api.ok("PATCH", f"/numbers/{number['id']}", {"transfer_trunk_id": trunk["id"]})
    return str(trunk["id"])


async def active_again(api: Api, call_id: str, lab: AsteriskLab) -> None:
    """The transfer failed back: the call is active and its ringback stopped (the session
    has finished with the failure; a command sent earlier would queue behind it)."""
    last: dict[str, Any] = {}

    async def check() -> bool:
        data = await api.ok("GET", f"/calls/{call_id}")
        last.update(data["transfers"][-1] if data["transfers"] else {})
        return data["status"] == "active" and last.get("state") in (None, "failed")

    await wait_for(check, "the call active again", timeout=15, every=0.02)
    if last.get("id"):
        playback = f"/playbacks/cbring-{last['id']}"
        await wait_for(lambda: lab.ari("GET", playback)[0] == 404, "ringback stopped", 15, 0.02)


async def measure(
    args: argparse.Namespace,
    lab: AsteriskLab,
    api: Api,
    port: int,
    invites: Any,
    llm: FakeOpenAI,
    decided: list[float],
) -> None:
    trunk_id = await provision(api, port)
    endpoint = dial_string(DialTarget(number=SUPPORT, trunk_id=trunk_id))
    stages: dict[str, list[float]] = {}
    async with RtpPeer() as caller_rtp:
        caller = SippCall.to_lab(lab, DID, rtp_port=caller_rtp.port, hold_ms=600000)
        await caller.start()
        try:
            call = await wait_for(
                lambda: _first_active(api), "an active call", timeout=20, every=0.05
            )
            call_id = call["id"]
            await wait_for(lambda: caller_rtp.loud_since(0) is not None, "the greeting", 15)
            auth = aiohttp.BasicAuth(lab.ari_username, lab.ari_password)
            limit: list[float] = []
            via_api: list[float] = []
            async with aiohttp.ClientSession(auth=auth) as ari:
                for i in range(args.warmup + args.samples):
                    # (limit) Asterisk's own originate
                    t0 = time.monotonic()
                    async with ari.post(
                        f"{lab.ari_url}/ari/channels",
                        params={
                            "endpoint": endpoint,
                            "app": lab.app_name,
                            "channelId": f"benchlimit-{i}",
                        },
                    ) as resp:
                        assert resp.status == 200, await resp.text()
                    at, _ = await next_invite(invites)
                    if i >= args.warmup:
                        limit.append((at - t0) * 1000)
                    # (api) the control POST, no message
                    stamps.clear()
                    t0 = time.monotonic()
                    await api.ok(
                        "POST",
                        f"/calls/{call_id}/control",
                        {"type": "transfer", "destination": SUPPORT},
                    )
                    at, _ = await next_invite(invites)
                    if i >= args.warmup:
                        via_api.append((at - t0) * 1000)
                        before = t0
                        for stage in (*STAGES, "invite"):
                            reached = at if stage == "invite" else stamps.get(stage)
                            if reached is None:
                                break
                            stages.setdefault(stage, []).append((reached - before) * 1000)
                            before = reached
                    await active_again(api, call_id, lab)
            # (assistant) spoken request → model's tool call → INVITE
            spoken: list[float] = []
            pcm = utterance(SPOKEN) + silence(900)
            for i in range(args.spoken):
                llm.script(
                    Reply(
                        tool_calls=[
                            FakeToolCall(
                                "transfer_call", {"destination": "technical_support"}, f"c{i}"
                            )
                        ]
                    )
                )
                before = len(decided)
                await caller_rtp.send_pcm(pcm)
                at, _ = await next_invite(invites, timeout=30)
                assert len(decided) == before + 1, "no assistant decision stamped"
                spoken.append((at - decided[-1]) * 1000)
                await active_again(api, call_id, lab)
        finally:
            await api.request("POST", f"/calls/{call_id}/control", {"type": "end_call"})
            await caller.terminate()
    report(limit, via_api, spoken)
    print("control POST → INVITE by stage (p50 / p95 ms, each from the stage before):")
    names = {
        "service": "POST sent → call service (HTTP client+server, key, validation)",
        "session": "→ the call's task takes the command (queue hop)",
        "authorised": "→ transfer authorised (policy)",
        "originate": "→ ARI originate request sent (run bookkeeping)",
        "invite": "→ INVITE at the peer (ARI request + Asterisk)",
    }
    for stage, values in stages.items():
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        print(f"  {names[stage]}: {statistics.median(values):.2f} / {p95:.2f}")
    if args.json:
        with open(args.json, "w") as out:  # noqa: ASYNC230 (once, at the end)
            json.dump(
                {"limit": limit, "api": via_api, "assistant": spoken, "api_stages": stages},
                out,
                indent=1,
            )


async def _first_active(api: Api) -> dict[str, Any] | None:
    calls = (await api.ok("GET", "/calls?status=active"))["data"]
    return calls[0] if calls else None


def report(limit: list[float], via_api: list[float], spoken: list[float]) -> None:
    base = statistics.median(limit)
    rows = [
        stats("Asterisk ARI originate → INVITE (the limit)", limit, None),
        stats("control POST (no message) → INVITE", via_api, base),
    ]
    if spoken:
        rows.append(stats("assistant tool decision → INVITE", spoken, base))
    load = os.getloadavg()
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(
        f"machine: {machine}, Python {platform.python_version()}, load {load[0]:.2f} {load[1]:.2f},"
        f" event loop {eventloop.running_loop_name()}"
    )
    print("| path | n | p50 | p99 | max | p50 / limit |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['n']} | {r['p50']:.2f} ms | {r['p99']:.2f} ms | "
            f"{r['max']:.2f} ms | {r['ratio']:.2f}× |"
        )
    api_row = rows[1]
    print(
        f"targets: p50 ≤ 1.5× the limit: {api_row['ratio']:.2f}×; "
        f"p99 ≤ 10 ms: {api_row['p99']:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=60, help="limit and API samples each")
    parser.add_argument("--spoken", type=int, default=15, help="assistant samples (spoken)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write every sample (ms) to this file")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the event loop of this process (daemon and the limit's ARI client): the"
        " daemon's `event_loop` setting, uvloop by default",
    )
    args = parser.parse_args()
    assert args.samples + args.warmup + args.spoken <= 100, "transfer.max_per_call is 100"
    ctx = mp.get_context("spawn")
    ready, invites = ctx.Queue(), ctx.Queue()
    peer = ctx.Process(target=sip_peer, args=(ready, invites), daemon=True)
    peer.start()
    try:
        port = ready.get(timeout=10)
        eventloop.run(run(args, port, invites), args.loop)
    finally:
        peer.terminate()


if __name__ == "__main__":
    main()
