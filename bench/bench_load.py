"""Load through the real PBX: N speaking callers on a lab Asterisk, half transferred by the API.

Everything runs on loopback on this machine: a lab Asterisk (`bridge.lab.AsteriskLab`), the
daemon as `callbridge run` (a separate process, offline defaults: silero, whisper tiny.en,
the local router, flite), SIPp callers with a Python RTP peer each that speaks real flite
speech, and SIPp agents (one per transfer; a share of them busy).

Each caller: dials the DID (arrivals at `--rate` per second), waits for the greeting, asks a
question, and waits for the reply (30 s at most). Every second caller is then transferred by
`POST /calls/{id}/control` to a SIPp agent (`--busy` of them answer 486) and its call is
polled with `GET /calls/{id}` until the transfer settles. Callers hang up after `--hold`
seconds.

Reported per N: greeted, replied within 30 s, transferred (bridged / busy back with the
assistant), lost (never greeted, or dropped) and sent to the fallback (with the daemon's
reasons, e.g. admission control), answer delay, end of speech → first reply audio at the
caller (through Asterisk), control POST p50/p95, GET /calls/{id} p95, the daemon's event-loop
lag (its own monitor), the daemon's CPU and peak RSS, Asterisk's CPU and the machine's CPU.
`--ladder 10,20,30` runs each N on a fresh daemon, stops at the first N that loses a caller,
and reports the largest N with nothing lost.

Bounded: at most 200 callers per run, each run at most `--max-seconds`; all on 127.0.0.1.

    python bench/bench_load.py --calls 5                 # a smoke run (~1 minute)
    python bench/bench_load.py --ladder 10,20,30,40,50,60 --rate 2 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import numpy as np

from bridge.lab.asterisk import AsteriskLab, free_port
from bridge.lab.rtp import RtpPeer
from bridge.lab.sipp import SippCall, SippUas, default_scenario_dir
from bridge.media.g711 import ulaw_decode, ulaw_encode
from tests.support.speech import utterance

MAX_CALLS = 200
DID = "+31201234567"
QUESTION = "Hello, what are your opening hours tomorrow?"
LOUD = 300  # peak level of a 20 ms frame that counts as speech (the line is otherwise quiet)
FRAME = 320  # bytes of 8 kHz 16-bit PCM per 20 ms
REPLY_WITHIN = 30.0


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def loud(payload: bytes) -> bool:
    x = np.abs(np.frombuffer(ulaw_decode(payload), "<i2").astype(np.int32))
    return bool(x.size and x.max() > LOUD)


# --- process and machine CPU ---------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    """utime + stime of `pid` in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _machine() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs."""
    parts = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


class Usage:
    """CPU of the daemon and Asterisk, the daemon's peak RSS, and the machine's CPU."""

    def __init__(self, daemon_pid: int, asterisk_pid: int | None) -> None:
        self.pids = {"daemon": daemon_pid, "asterisk": asterisk_pid}
        self.peak_rss = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = {k: _proc_cpu(p) for k, p in self.pids.items() if p}
        self.machine0 = _machine()
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.peak_rss = max(self.peak_rss, _rss_mb(self.pids["daemon"]))
            await asyncio.sleep(1.0)

    def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
        wall = time.monotonic() - self.t0
        out: dict[str, Any] = {}
        for k, pid in self.pids.items():
            if pid:
                with contextlib.suppress(OSError):
                    out[f"{k}_cpu_pct"] = round(100 * (_proc_cpu(pid) - self.cpu0[k]) / wall)
        busy, total = _machine()
        out["machine_cpu_pct"] = round(
            100
            * (busy - self.machine0[0])
            / max(1, total - self.machine0[1])
            * (os.cpu_count() or 1)
        )
        out["daemon_rss_mb"] = round(self.peak_rss)
        return out


# --- the callers' lines: one 20 ms ticker for every RTP peer -------------------------------


class Line:
    """A caller's phone: sends its queued speech, else silence, every 20 ms (as a phone
    does), and timestamps the loud audio it receives."""

    def __init__(self, peer: RtpPeer) -> None:
        self.peer = peer
        self.pending = bytearray()
        self.last_loud_sent: float | None = None
        self.speaking = asyncio.Event()
        self.speaking.set()

    def say(self, pcm: bytes) -> None:
        self.pending += pcm
        self.speaking.clear()

    def tick(self, now: float) -> None:
        if self.peer.remote is None or self.peer._transport is None:
            return
        if self.pending:
            frame, self.pending[:] = bytes(self.pending[:FRAME]), self.pending[FRAME:]
            frame = frame.ljust(FRAME, b"\x00")
            if np.abs(np.frombuffer(frame, "<i2")).max() > LOUD:
                self.last_loud_sent = now
            if not self.pending:
                self.speaking.set()
        else:
            frame = bytes(FRAME)
        self.peer._transport.sendto(self.peer._packet(ulaw_encode(frame)), self.peer.remote)

    def loud_since(self, since: float) -> float | None:
        """Arrival time of the first loud packet after `since`."""
        for p in self.peer.packets:
            if p.arrival > since and loud(p.payload):
                return p.arrival
        return None

    def quiet_for(self, seconds: float) -> bool:
        now = time.monotonic()
        for p in reversed(self.peer.packets):
            if p.arrival < now - seconds:
                return True
            if loud(p.payload):
                return False
        return True


async def ticker(lines: list[Line], stop: asyncio.Event) -> None:
    start = time.monotonic()
    n = 0
    while not stop.is_set():
        now = time.monotonic()
        for line in lines:
            line.tick(now)
        n += 1
        await asyncio.sleep(max(0.0, start + n * 0.02 - time.monotonic()))


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Caller:
    index: int
    transfer: bool
    busy_agent: bool
    dialled: float = 0.0
    answered: float | None = None
    greeted: float | None = None
    spoke_end: float | None = None
    replied: float | None = None
    call_id: str | None = None
    transfer_post_ms: float | None = None
    transfer_outcome: str | None = None
    transfer_settle_s: float | None = None
    get_ms: list[float] = field(default_factory=list)
    end_reason: str | None = None
    error: str | None = None


class Daemon:
    """`callbridge run` as its own process on the lab."""

    def __init__(
        self,
        lab: AsteriskLab,
        work: Path,
        overrides: dict[str, Any],
        extra: str = "",
        event_loop: str = "uvloop",
        gil_switch_ms: float = 1.0,
    ) -> None:
        self.lab = lab
        self.work = work
        self.port = free_port(socket.SOCK_STREAM)
        self.config = work / "callbridge.toml"
        self.log = work / "daemon.log"
        calls = "\n".join(f"{k} = {json.dumps(v)}" for k, v in overrides.items())
        self.config.write_text(
            f"""database = "{work / "callbridge.sqlite3"}"
event_loop = "{event_loop}"
gil_switch_interval_ms = {gil_switch_ms}
log_format = "json"
log_level = "info"

[api]
host = "127.0.0.1"
port = {self.port}

[ari]
url = "{lab.ari_url}"
username = "{lab.ari_username}"
password = "{lab.ari_password}"
app = "{lab.app_name}"

[transfer]
allowed_sip_domains = ["127.0.0.1"]

[calls]
{calls}
{extra}
"""
        )
        self.proc: asyncio.subprocess.Process | None = None
        self.base = f"http://127.0.0.1:{self.port}/api/v1"

    def _cli(self) -> list[str]:
        return [sys.executable, "-m", "bridge", "--config", str(self.config)]

    async def start(self) -> str:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
        made = await asyncio.create_subprocess_exec(
            *self._cli(),
            "api-key",
            "create",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await made.communicate()
        key = out.decode().strip().splitlines()[-1].strip()
        with open(self.log, "wb") as log:  # noqa: ASYNC230
            self.proc = await asyncio.create_subprocess_exec(
                *self._cli(), "run", env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        self.http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with self.http.get(f"{self.base}/health") as resp:
                    if resp.status == 200 and (await resp.json()).get("pbx_connected"):
                        return key
            if self.proc.returncode is not None:
                raise RuntimeError(f"daemon exited:\n{self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.2)
        raise RuntimeError("daemon did not connect to ARI within 90 s")

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any, float]:
        t0 = time.monotonic()
        async with self.http.request(method, self.base + path, json=body) as resp:
            data = await resp.json() if resp.content_length != 0 else None
            return resp.status, data, (time.monotonic() - t0) * 1000

    async def stop(self) -> dict[str, Any]:
        """SIGTERM, then the daemon's own event-loop lag figures from its log."""
        await self.http.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        stats: dict[str, Any] = {}
        behind: list[float] = []
        take: list[float] = []
        slow: dict[str, list[float]] = {}
        holds = 0
        commands: list[dict[str, Any]] = []
        for line in self.log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            event = entry.get("event")
            if event == "loop.lag_stats":
                stats.update(entry)
            elif event == "stt.stats":
                stats["stt"] = {k: v for k, v in entry.items() if k not in ("event", "level")}
            elif event == "asterisk.arrival":
                if entry.get("behind_ms") is not None:
                    behind.append(float(entry["behind_ms"]))
                take.append(float(entry.get("take_ms") or 0))
            elif event == "ari.slow_event":
                slow.setdefault(str(entry.get("type")), []).append(float(entry["ms"]))
            elif event == "agent.stt_hold":
                holds += 1
            elif event == "db.stats":
                stats["db"] = {k: v for k, v in entry.items() if k not in ("event", "level")}
            elif event == "call.command_timing":
                commands.append(entry)

        def dist(values: list[float]) -> dict[str, float | None]:
            return {
                "p50": percentile(values, 0.5),
                "p95": percentile(values, 0.95),
                "max": max(values) if values else None,
            }

        # Arrival: how long a caller was in Stasis before the daemon saw its StasisStart
        # (behind other ARI events), and the take's round trip; slow ARI event handlers.
        stats["arrival_behind_ms"] = dist(behind)
        stats["arrival_take_ms"] = dist(take)
        stats["slow_ari_events"] = {k: (len(v), round(max(v))) for k, v in slow.items()}
        stats["stt_holds"] = holds
        # Where the control commands' time went (the daemon's call.command_timing): waiting
        # in the call's queue, handling, and of that the database (wait for its thread, run)
        # and ARI round trips.
        stats["command_ms"] = {
            key: dist([float(c.get(key) or 0) for c in commands])
            for key in (
                "queued_ms",
                "replied_ms",
                "handled_ms",
                "db_wait_ms",
                "db_run_ms",
                "ari_ms",
            )
        }
        return stats


async def provision(daemon: Daemon) -> None:
    assistant = {
        "name": "Acme",
        "first_message": "Thank you for calling Acme. How can I help you today?",
        "llm_config": {
            "provider": "local",
            "messages": [{"role": "system", "content": "You are Acme's receptionist."}],
            "tools": [
                {
                    "type": "transfer_call",
                    "destinations": [
                        {
                            "type": "number",
                            "number": "+31612345678",
                            "description": "Sales team - for pricing and quotes",
                        },
                        {
                            "type": "number",
                            "number": "+31687654321",
                            "description": "Technical support - for product issues",
                        },
                    ],
                },
                {"type": "end_call"},
            ],
        },
    }
    status, made, _ = await daemon.request("POST", "/assistants", assistant)
    assert status == 201, made
    status, number, _ = await daemon.request(
        "POST", "/numbers", {"number": DID, "assistant_id": made["id"]}
    )
    assert status == 201, number


def _load_scenario(work: Path) -> Path:
    """The lab UAC with a display name per caller, so each call is found by `caller_name`."""
    text = (default_scenario_dir() / "uac_call.xml").read_text()
    text = text.replace("From: <sip:[from_user]", 'From: "[caller_name]" <sip:[from_user]')
    path = work / "uac_load.xml"
    path.write_text(text)
    return path


async def poll(check: Any, deadline: float, every: float) -> Any:
    """`check()` until it gives something truthy or `deadline` (monotonic) passes."""
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(every)


async def find_call(daemon: Daemon, name: str, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, data, _ = await daemon.request("GET", "/calls?limit=500")
        if status == 200:
            for call in data["data"]:
                if call.get("caller_name") == name:
                    return call
        await asyncio.sleep(0.5)
    return None


async def run_caller(
    c: Caller,
    lab: AsteriskLab,
    daemon: Daemon,
    scenario: Path,
    lines: list[Line],
    question: bytes,
    hold_s: float,
    sink_port: int,
    uas: list[SippUas],
) -> None:
    peer = await RtpPeer().start()
    line = Line(peer)
    lines.append(line)
    name = f"load-{c.index}"
    sipp = SippCall.to_lab(
        lab,
        DID,
        rtp_port=peer.port,
        hold_ms=int(hold_s * 1000),
        scenario=scenario,
        keys={"caller_name": name},
        max_seconds=hold_s + 60,
    )
    c.dialled = time.monotonic()
    await sipp.start()
    try:
        if not await peer.wait_for_packet(timeout=20):
            c.error = f"never answered (no RTP within 20 s; SIP: {sip_story(sipp)})"
            return
        c.answered = peer.packets[0].arrival
        answered = c.answered
        greeted = await poll(lambda: line.loud_since(answered), answered + 20, 0.1)
        if greeted is None:
            c.error = "no greeting within 20 s"
            return
        c.greeted = greeted
        await poll(lambda: line.quiet_for(0.6), greeted + 30, 0.1)
        line.say(question)
        await line.speaking.wait()
        c.spoke_end = line.last_loud_sent
        assert c.spoke_end is not None
        spoke = c.spoke_end
        c.replied = await poll(lambda: line.loud_since(spoke), spoke + REPLY_WITHIN, 0.05)
        call = await find_call(daemon, name, 10)
        if call is None:
            c.error = "no call record"
            return
        c.call_id = call["id"]
        if c.transfer:
            await transfer(c, daemon, sink_port, uas)
        remaining = c.dialled + hold_s - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)
    finally:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sipp.wait(), 20)
        await sipp.terminate()
        sipp.cleanup()
        peer.close()
        lines.remove(line)


def sip_story(sipp: SippCall) -> str:
    """What the caller's SIPp sent and received, in order (a lost caller's evidence: did the
    INVITE leave, what did Asterisk answer), with SIPp's own errors if it failed."""
    story = " ".join(
        ("→" if m.direction == "sent" else "←") + (m.method or str(m.status_code))
        for m in sipp.messages()
    )
    if sipp.proc is not None and sipp.proc.returncode not in (None, 0):
        story += f"; sipp exited {sipp.proc.returncode}: {sipp.output()[-300:]!r}"
    return story or "nothing sent"


async def transfer(c: Caller, daemon: Daemon, sink_port: int, uas: list[SippUas]) -> None:
    scenario = "uas_busy.xml" if c.busy_agent else "uas_answer.xml"
    agent = SippUas(scenario, rtp_port=sink_port, ring_ms=500, max_seconds=300)
    await agent.start()
    uas.append(agent)
    body = {"type": "transfer", "destination": f"sip:agent{c.index}@127.0.0.1:{agent.local_port}"}
    status, data, ms = await daemon.request("POST", f"/calls/{c.call_id}/control", body)
    c.transfer_post_ms = ms
    if status != 202:
        c.transfer_outcome = f"refused {status}: {data}"
        return
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        status, call, ms = await daemon.request("GET", f"/calls/{c.call_id}")
        c.get_ms.append(ms)
        transfers = (call or {}).get("transfers") or []
        if transfers and transfers[-1]["state"] in ("bridged", "failed", "cancelled"):
            t = transfers[-1]
            c.transfer_outcome = t.get("outcome") or t["state"]
            c.transfer_settle_s = time.monotonic() - t0
            return
        await asyncio.sleep(0.5)
    c.transfer_outcome = "not settled in 60 s"


async def one_run(
    lab: AsteriskLab, n: int, args: argparse.Namespace, question: bytes
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"bench-load-{n}-"))
    overrides = {"max_active": args.max_active} if args.max_active else {}
    if args.no_admission:
        overrides.update(max_loop_lag_ms=None, max_stt_backlog_per_worker=None)
    daemon = Daemon(lab, work, overrides, event_loop=args.loop, gil_switch_ms=args.gil_switch_ms)
    await daemon.start()
    await provision(daemon)
    scenario = _load_scenario(work)
    sink = await RtpPeer().start()  # the agents' media goes here (discarded)
    sink.packets = _Discard()  # type: ignore[assignment]
    lines: list[Line] = []
    stop = asyncio.Event()
    tick = asyncio.get_running_loop().create_task(ticker(lines, stop))
    usage = Usage(daemon.proc.pid if daemon.proc else 0, lab.pid)
    usage.start()
    callers = [
        Caller(i, transfer=i % 2 == 1, busy_agent=i % 2 == 1 and (i // 2) % args.busy_every == 0)
        for i in range(n)
    ]
    uas: list[SippUas] = []
    tasks = []
    for c in callers:
        tasks.append(
            asyncio.ensure_future(
                run_caller(c, lab, daemon, scenario, lines, question, args.hold, sink.port, uas)
            )
        )
        await asyncio.sleep(1 / args.rate)
    try:
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), args.max_seconds)
    except TimeoutError:
        pass
    resources = usage.stop()
    stop.set()
    await tick
    # What the daemon recorded (the reasons of fallbacks and drops).
    _, listed, _ = await daemon.request("GET", "/calls?limit=500")
    by_name = {c.get("caller_name"): c for c in (listed or {}).get("data", [])}
    for c in callers:
        record = by_name.get(f"load-{c.index}")
        c.end_reason = record.get("end_reason") if record else None
    lag = await daemon.stop()
    for agent in uas:
        await agent.terminate()
        agent.cleanup()
    sink.close()
    return summarise(n, args, callers, resources, lag)


class _Discard(list):  # type: ignore[type-arg]
    def append(self, item: Any) -> None:
        pass


def summarise(
    n: int,
    args: argparse.Namespace,
    callers: list[Caller],
    resources: dict[str, Any],
    lag: dict[str, Any],
) -> dict[str, Any]:
    # Sent to the fallback: by admission control at arrival, or later (media, errors). Lost:
    # a caller the daemon never served (no greeting) and did not hand to the fallback, or one
    # whose turn broke (no record, a failed step).
    fallback = [c for c in callers if c.end_reason and "fallback" in c.end_reason]
    lost = [c for c in callers if c not in fallback and (c.greeted is None or c.error)]
    dropped: list[Caller] = []
    ends: dict[str, int] = {}
    for c in callers:
        key = re.sub(r"\d+", "N", c.end_reason or "(still up)")
        ends[key] = ends.get(key, 0) + 1
    turn = [(c.replied - c.spoke_end) * 1000 for c in callers if c.replied and c.spoke_end]
    answer = [(c.answered - c.dialled) * 1000 for c in callers if c.answered]
    posts = [c.transfer_post_ms for c in callers if c.transfer_post_ms is not None]
    gets = [ms for c in callers for ms in c.get_ms]
    settle = [c.transfer_settle_s for c in callers if c.transfer_settle_s is not None]
    outcomes: dict[str, int] = {}
    for c in callers:
        if c.transfer_outcome:
            outcomes[c.transfer_outcome] = outcomes.get(c.transfer_outcome, 0) + 1

    def ms(v: float | None) -> int | None:
        return None if v is None else round(v)

    return {
        "calls": n,
        "rate_per_s": args.rate,
        "greeted": sum(c.greeted is not None and c not in fallback for c in callers),
        "replied_within_30s": len(turn),
        "transfers": outcomes,
        "sent_to_fallback": len(fallback),
        "fallback_reasons": sorted({c.end_reason for c in fallback if c.end_reason}),
        "lost": len(lost) + len(dropped),
        "lost_detail": [f"load-{c.index}: {c.error or c.end_reason}" for c in lost + dropped][:10],
        "answer_ms_p50": ms(percentile(answer, 0.5)),
        "answer_ms_p95": ms(percentile(answer, 0.95)),
        "turn_ms_p50": ms(percentile(turn, 0.5)),
        "turn_ms_p95": ms(percentile(turn, 0.95)),
        "turn_ms_min": ms(min(turn) if turn else None),
        "turn_ms_max": ms(max(turn) if turn else None),
        "control_post_ms_p50": ms(percentile(posts, 0.5)),
        "control_post_ms_p95": ms(percentile(posts, 0.95)),
        "control_post_ms": [round(p, 1) for p in posts],  # each POST, to pool runs
        "get_call_ms_p95": ms(percentile(gets, 0.95)),
        "transfer_settle_s_p50": (round(statistics.median(settle), 1) if settle else None),
        "loop_lag_ms": {k: lag.get(k) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")},
        "admission_refused": lag.get("refused"),
        "arrival_behind_ms": lag.get("arrival_behind_ms"),
        "arrival_take_ms": lag.get("arrival_take_ms"),
        "slow_ari_events": lag.get("slow_ari_events"),
        "stt": lag.get("stt"),
        "stt_holding_phrases": lag.get("stt_holds"),
        "control_command_ms": lag.get("command_ms"),
        "db": lag.get("db"),
        "end_reasons": ends,
        **resources,
    }


def print_row(r: dict[str, Any]) -> None:
    lag = r["loop_lag_ms"]
    print(
        f"| {r['calls']} ({r['rate_per_s']}/s) | {r['greeted']} | {r['replied_within_30s']} | "
        f"{r['transfers']} | {r['lost']} | {r['sent_to_fallback']} | "
        f"{r['answer_ms_p95']} | {r['turn_ms_p50']} / {r['turn_ms_p95']} | "
        f"{r['control_post_ms_p50']} / {r['control_post_ms_p95']} | {r['get_call_ms_p95']} | "
        f"{lag['p95_ms']} / {lag['max_ms']} | {r.get('daemon_cpu_pct')} % | "
        f"{r.get('daemon_rss_mb')} MB | {r.get('asterisk_cpu_pct')} % | "
        f"{r.get('machine_cpu_pct')} % |",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5, help="callers in one run")
    parser.add_argument("--ladder", help="comma-separated N to try in order, e.g. 10,20,30")
    parser.add_argument("--rate", type=float, default=2.0, help="arrivals per second")
    parser.add_argument("--hold", type=float, default=60.0, help="seconds each caller stays")
    parser.add_argument(
        "--busy-every",
        type=int,
        default=3,
        help="one transferred caller in this many gets a busy agent",
    )
    parser.add_argument("--max-active", type=int, default=None, help="calls.max_active")
    parser.add_argument(
        "--no-admission",
        action="store_true",
        help="turn off the lag and STT-backlog checks (to see what they save)",
    )
    parser.add_argument("--max-seconds", type=float, default=300.0, help="bound per run")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the daemon's `event_loop` (its default: uvloop)",
    )
    parser.add_argument(
        "--gil-switch-ms",
        type=float,
        default=1.0,
        help="the daemon's `gil_switch_interval_ms` (its default: 1; Python's own: 5)",
    )
    args = parser.parse_args()
    sizes = [int(x) for x in args.ladder.split(",")] if args.ladder else [args.calls]
    if any(n < 1 or n > MAX_CALLS for n in sizes):
        raise SystemExit(f"1..{MAX_CALLS} calls per run")
    args.hold = max(args.hold, 40.0)
    question = utterance(QUESTION)
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" the daemon's event loop: {args.loop}, GIL switch interval {args.gil_switch_ms} ms"
    )
    print(
        "| calls (rate) | greeted | replied ≤30 s | transfers | lost | to fallback | "
        "answer p95 ms | turn p50/p95 ms | control POST p50/p95 ms | GET call p95 ms | "
        "loop lag p95/max ms | daemon CPU | daemon RSS | Asterisk CPU | machine CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    best: int | None = None
    with AsteriskLab() as lab:
        for n in sizes:
            result = await one_run(lab, n, args, question)
            results.append(result)
            print_row(result)
            print(
                f"#   arrival (ms): behind {result['arrival_behind_ms']}, take "
                f"{result['arrival_take_ms']}; slow ARI events (count, max ms): "
                f"{result['slow_ari_events']}; STT: {result['stt']}; holding phrases: "
                f"{result['stt_holding_phrases']}",
                flush=True,
            )
            print(
                f"#   control commands in the daemon (ms): {result['control_command_ms']}; "
                f"database thread: {result['db']}",
                flush=True,
            )
            if result["lost"] or result["sent_to_fallback"]:
                for line in result["lost_detail"] + result["fallback_reasons"]:
                    print(f"#   {line}")
            if result["lost"]:
                break
            if not result["sent_to_fallback"]:
                best = n
    print(f"# largest N with nothing lost and nobody sent to the fallback: {best}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))  # noqa: ASYNC240


if __name__ == "__main__":
    asyncio.run(main())
