"""The PBXs the behaviour suite runs against, behind one small interface.

- `asterisk`: the real lab Asterisk, SIPp callers and UASes, RtpPeer audio.
- `freeswitch`: in CI the protocol-faithful fake event socket (tests/support/esl_server.py,
  built from captures of a real FreeSWITCH 1.10.12); against a real FreeSWITCH when
  `CALLBRIDGE_TEST_FREESWITCH=host:port:password` is set (then SIPp and RtpPeer as for
  Asterisk; `CALLBRIDGE_TEST_FREESWITCH_SIP=host:port` is its SIP address, default
  host:15060; its dialplan must hand the test DID to callbridge, as freeswitch_conf/ does).

Every backend puts a cuttable TCP proxy between the daemon and the PBX's control connection,
so "the connection dropped" is the same act on all of them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bridge.api.keys import create_api_key
from bridge.app import Daemon
from bridge.config import Settings
from bridge.lab.asterisk import LAB_MOH_HZ, free_port
from bridge.lab.rtp import RtpPeer, band_share, dominant_frequency, rms
from bridge.lab.sipp import SippCall, SippUas
from bridge.log import configure_logging
from bridge.pbx.freeswitch.esl_client import EslClient
from tests.support.daemon import Api, start_daemon, wait_for
from tests.support.esl_server import FakeChannel, FakeEslServer
from tests.support.flows import DESTINATION
from tests.support.ports import unicast_ports
from tests.support.tcp_proxy import TcpProxy

HERE = Path(__file__).resolve().parent
# Destination behaviours: the SIPp UAS scenario (real PBXs), the fake's originate outcome.
SCENARIOS = {
    "answer": "uas_answer.xml",
    "busy": "uas_busy.xml",  # 486 at once
    "declined": "uas_decline.xml",  # 603 at once
    "unreachable": str(HERE / "sipp" / "uas_unreachable.xml"),  # 404 at once
    "early_media": str(HERE / "sipp" / "uas_early_media.xml"),  # 183 + SDP, never 180
    "no_answer": "uas_noanswer.xml",  # 180, rings until CANCEL
    "answer_then_bye": "uas_answer_then_bye.xml",  # hand back: answers, hangs up 5 s later
}
FAKE_OUTCOMES = {
    "answer": "answer",
    "busy": "busy",
    "declined": "decline",
    "unreachable": "unreachable",
    "early_media": "early_media",  # originate succeeds on 183; our ring timeout ends it
    "no_answer": "ring",  # rings until originate_timeout (as FreeSWITCH) or uuid_kill
    "answer_then_bye": "answer",  # hand back: the test hangs the leg up (`hang_up`)
}
CHUNK = 800  # 100 ms of 8 kHz samples
RINGBACK_HZ = (440, 480)  # the ringback both PBXs play (2 s on, 4 s off)


def _loud(pcm: bytes) -> bool:
    """At least 0.5 s of clearly non-silent 8 kHz audio."""
    return len(pcm) >= 8000 and rms(pcm) > 300


def _chunks(pcm: bytes) -> list[np.ndarray]:
    x = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float64)
    return [x[i : i + CHUNK] for i in range(0, len(x) - CHUNK + 1, CHUNK)]


def is_ringback(chunk: np.ndarray) -> bool:
    """A loud 100 ms chunk whose energy is almost all at 440/480 Hz: ringback, not speech."""
    if float(np.sqrt(np.mean(chunk * chunk))) < 300:
        return False
    spectrum = np.abs(np.fft.rfft((chunk - chunk.mean()) * np.hanning(len(chunk)))) ** 2
    hz = np.fft.rfftfreq(len(chunk), 1 / 8000)
    band = sum(spectrum[(hz > f - 25) & (hz < f + 25)].sum() for f in RINGBACK_HZ)
    return bool(band > 0.8 * spectrum.sum())


def ringback_heard(pcm: bytes, min_run: int = 5) -> bool:
    """Half a second of steady 440+480 Hz (ringback sounds 2 s at a time); a single
    tone-like 100 ms chunk inside speech (a vowel's harmonic) is not ringback."""
    run = 0
    for chunk in _chunks(pcm):
        run = run + 1 if is_ringback(chunk) else 0
        if run >= min_run:
            return True
    return False


def spoken_chunks(pcm: bytes) -> int:
    """Loud 100 ms chunks that are not ringback (an assistant speaking)."""
    return sum(float(np.sqrt(np.mean(c * c))) > 300 and not is_ringback(c) for c in _chunks(pcm))


def steady_run(times: list[float], frames: int, max_gap: float = 0.06) -> bool:
    """`frames` consecutive packets with no gap over `max_gap` (20 ms pacing, some jitter)."""
    run = 1
    for a, b in itertools.pairwise(times):
        run = run + 1 if b - a <= max_gap else 1
        if run >= frames:
            return True
    return False


# --- SIP callers and destinations (real PBXs) ------------------------------------------------


class SipCaller:
    """A SIPp call with an RtpPeer for its audio."""

    def __init__(self, sip: tuple[str, int], number: str, hold_ms: int) -> None:
        self.rtp = RtpPeer()
        self._sip = sip
        self._number = number
        self._hold_ms = hold_ms
        self.sipp: SippCall | None = None

    async def start(self) -> SipCaller:
        await self.rtp.start()
        self.sipp = SippCall(self._sip, self._number, rtp_port=self.rtp.port, hold_ms=self._hold_ms)
        await self.sipp.start()
        return self

    def mark(self) -> float:
        return asyncio.get_running_loop().time()

    async def heard_speech(self, since: float, seconds: float = 10) -> None:
        await wait_for(
            lambda: _loud(self.rtp.received_pcm(since=since)),
            "non-silent audio at the caller",
            timeout=seconds,
        )

    async def speak(self, pcm: bytes) -> None:
        """The caller talks: 8 kHz PCM as paced µ-law RTP."""
        await self.rtp.send_pcm(pcm)

    async def heard_words(self, since: float, seconds: float = 15) -> None:
        """The assistant spoke (0.5 s of loud audio that is not ringback) since `since`."""
        await wait_for(
            lambda: spoken_chunks(self.rtp.received_pcm(since=since)) >= 5,
            "the assistant's words (not ringback) at the caller",
            timeout=seconds,
        )

    async def no_ringback_after(self, since: float) -> None:
        """From 0.3 s after `since`, for a whole ringback cadence (6 s), no ringback chunk."""
        start = since + 0.3
        await wait_for(
            lambda: len(self.rtp.received_pcm(since=start)) >= 6 * 16000,
            "6 s of audio at the caller",
            timeout=20,
        )
        heard = self.rtp.received_pcm(since=start)[: 6 * 16000]
        assert not ringback_heard(heard), "the caller still hears ringback"

    async def quiet(self, since: float) -> None:
        """The assistant spoke since `since` and has finished: the last 0.6 s are silent."""

        def done() -> bool:
            pcm = self.rtp.received_pcm(since=since)
            return _loud(pcm) and len(pcm) > 9600 and rms(pcm[-9600:]) < 100

        await wait_for(done, "the assistant to finish speaking", timeout=20)

    def packet_times(self, since: float) -> list[float]:
        return [p.arrival for p in self.rtp.packets if p.arrival >= since]

    # --- warm transfer (issue 9 §2) ---
    def on_hold(self) -> bool:
        """The last second heard is the test PBX's music on hold (a LAB_MOH_HZ tone: the
        lab's musiconhold.conf, freeswitch_conf's local_stream)."""
        last = self.rtp.received_pcm()[-16000:]
        return len(last) == 16000 and rms(last) > 300 and band_share(last, (LAB_MOH_HZ,)) > 0.8

    async def hang_up(self) -> None:
        """Only the scenario's hold time hangs up with a BYE: wait for it."""
        assert self.sipp is not None
        await asyncio.wait_for(self.sipp.wait(), self._hold_ms / 1000 + 15)

    def connected(self) -> bool:
        return (
            self.sipp is not None
            and self.sipp.proc is not None
            and (self.sipp.proc.returncode is None)
        )

    async def wait_bye(self, seconds: float = 15) -> bool:
        assert self.sipp is not None
        await asyncio.wait_for(self.sipp.wait(), seconds)
        return self.sipp.got_bye()

    async def close(self) -> None:
        if self.sipp is not None:
            await self.sipp.terminate()
        self.rtp.close()


class SipDestination:
    """A SIPp UAS behind the trunk, with an RtpPeer for its audio."""

    def __init__(self, outcome: str, local_port: int | None) -> None:
        self.rtp = RtpPeer()
        self.outcome = outcome
        self._port = local_port
        self.uas: SippUas | None = None

    async def start(self) -> SipDestination:
        await self.rtp.start()
        self.uas = SippUas(SCENARIOS[self.outcome], rtp_port=self.rtp.port, local_port=self._port)
        await self.uas.start()
        return self

    @property
    def port(self) -> int:
        assert self.uas is not None
        return self.uas.local_port

    def invited(self) -> bool:
        assert self.uas is not None
        invite = self.uas.invite
        return invite is not None and DESTINATION in (invite.request_uri or "")

    def cancelled(self) -> bool:
        """The PBX cancelled the ringing INVITE (the leg was hung up before an answer)."""
        assert self.uas is not None
        return bool(self.uas.received_requests("CANCEL"))

    async def assert_bridged(self, caller: Any) -> None:
        """Audio both ways through the PBX: 440 Hz from the caller, 1000 Hz back."""
        assert isinstance(caller, SipCaller) and caller.sipp is not None
        # FreeSWITCH sends nothing into a bridge before someone speaks (Asterisk does): take
        # the PBX's media addresses from the SDP when no packet has latched them yet.
        await self.rtp.wait_for_packet(timeout=1)
        if self.rtp.remote is None:
            invite = self.uas.invite if self.uas else None
            found = re.search(r"^m=audio (\d+)", invite.body if invite else "", re.MULTILINE)
            assert found, "no SDP offer from the PBX in the INVITE"
            self.rtp.set_remote("127.0.0.1", int(found.group(1)))
        if caller.rtp.remote is None:
            caller.rtp.set_remote("127.0.0.1", caller.sipp.sdp_port() or 0)
        t0 = asyncio.get_running_loop().time()
        await asyncio.gather(caller.rtp.send_tone(440, 1.5), self.rtp.send_tone(1000, 1.5))
        assert abs(dominant_frequency(self.rtp.received_pcm(since=t0)) - 440) < 20
        assert abs(dominant_frequency(caller.rtp.received_pcm(since=t0)) - 1000) < 20

    # --- warm transfer (issue 9 §2) ---
    def heard_brief(self) -> bool:
        """Half a second of speech (the brief) reached the destination, no hold music."""
        pcm = self.rtp.received_pcm()
        return spoken_chunks(pcm) >= 5 and band_share(pcm, (LAB_MOH_HZ,)) < 0.2

    async def press(self, digits: str) -> None:
        """The agent presses keys (RFC 4733, as the UAS's SDP offers)."""
        await self.rtp.send_dtmf(digits)

    def hung_up(self) -> bool:
        """The PBX hung the answered leg up (a BYE at the UAS)."""
        return self.uas is not None and bool(self.uas.received_requests("BYE"))

    # --- hand back (issue 9 §5) ---
    async def hang_up(self) -> None:
        """The destination hangs up first: the answer_then_bye scenario's own BYE."""
        assert self.uas is not None
        await self.uas.wait(timeout=20)
        assert self.uas.received_responses("BYE"), "the destination did not hang up"

    async def close(self) -> None:
        if self.uas is not None:
            await self.uas.stop()
        self.rtp.close()


# --- fake FreeSWITCH callers and destinations ------------------------------------------------


class FakeCaller:
    """A caller the fake FreeSWITCH parks; its 'ear' is the fake's unicast socket."""

    def __init__(self, server: FakeEslServer, number: str, hold_ms: int) -> None:
        self.server = server
        self.number = number
        self.hold_ms = hold_ms
        self.chan: FakeChannel | None = None

    async def start(self) -> FakeCaller:
        uuid = await self.server.hook_call(self.number, "sipp-caller")  # freeswitch_conf's hook
        self.chan = self.server.channels[uuid]
        return self

    def mark(self) -> float:
        return float(len(self.chan.media_in)) if self.chan else 0.0

    def _pcm(self, since: float) -> bytes:
        assert self.chan is not None
        return b"".join(self.chan.media_in[int(since) :])

    async def heard_speech(self, since: float, seconds: float = 10) -> None:
        await wait_for(lambda: _loud(self._pcm(since)), "non-silent audio at the caller", seconds)

    async def heard_words(self, since: float, seconds: float = 15) -> None:
        """The daemon's unicast frames carry speech (ringback never goes through unicast:
        FreeSWITCH plays it on the channel, which the fake models as `hearing_tone`)."""
        await wait_for(
            lambda: spoken_chunks(self._pcm(since)) >= 5,
            "the assistant's words at the caller",
            timeout=seconds,
        )

    async def no_ringback_after(self, since: float) -> None:
        """No tone plays or waits in the channel's queue: none can start any more (the fake
        starts tones only from that queue)."""
        assert self.chan is not None
        assert not self.chan.hearing_tone, "the caller still hears (or will hear) ringback"
        assert not self.chan.queued

    async def quiet(self, since: float) -> None:
        def done() -> bool:
            pcm = self._pcm(since)
            return _loud(pcm) and len(pcm) > 9600 and rms(pcm[-9600:]) < 100

        await wait_for(done, "the assistant to finish speaking", timeout=20)

    def packet_times(self, since: float) -> list[float]:
        assert self.chan is not None
        return self.chan.media_at[int(since) :]

    async def speak(self, pcm: bytes) -> None:
        """The caller talks: raw L16 frames, 20 ms apart, as FreeSWITCH's unicast sends them."""
        assert self.chan is not None
        for i in range(0, len(pcm), 320):
            self.server.send_media(self.chan.uuid, pcm[i : i + 320].ljust(320, b"\0"))
            await asyncio.sleep(0.02)

    async def hang_up(self) -> None:
        """The caller hangs up now (SIPp's hold time is the real callers' clock)."""
        assert self.chan is not None
        await self.server.hangup(self.chan.uuid)

    def connected(self) -> bool:
        return self.chan is not None and self.chan.up

    async def wait_bye(self, seconds: float = 15) -> bool:
        await wait_for(lambda: not self.connected(), "the caller to be hung up", seconds)
        return True

    # --- warm transfer (issue 9 §2) ---
    def on_hold(self) -> bool:
        """FreeSWITCH plays the `[transfer] moh_class` local_stream to the caller."""
        return self.chan is not None and self.chan.hearing_moh == "default"

    async def close(self) -> None:
        if self.chan is not None and self.chan.up:
            await self.server.hangup(self.chan.uuid)


@dataclass
class FakeDestination:
    server: FakeEslServer
    outcome: str
    port: int = 5090

    async def start(self) -> FakeDestination:
        self.server.set_originate_outcome(DESTINATION, FAKE_OUTCOMES[self.outcome])
        return self

    def invited(self) -> bool:
        return bool(self._legs())

    def _legs(self) -> list[str]:
        return [
            m.group(1)
            for c in self.server.commands
            if c.startswith("bgapi originate") and "sofia/gateway/cb-trunk-" in c
            and DESTINATION in c and (m := re.search(r"origination_uuid=([^,}]+)", c))
        ]  # fmt: skip

    def cancelled(self) -> bool:
        """The daemon hung the ringing leg up (uuid_kill) and FreeSWITCH ended it."""
        legs = self._legs()
        return bool(legs) and all(
            f"api uuid_kill {leg}" in self.server.commands and leg in self.server.hangups
            for leg in legs
        )

    async def assert_bridged(self, caller: Any) -> None:
        assert isinstance(caller, FakeCaller) and caller.chan is not None
        leg = self.server.channels.get(caller.chan.bridged_with or "")
        assert leg is not None and leg.direction == "outbound" and leg.answered
        assert leg.bridged_with == caller.chan.uuid
        assert caller.chan.media is None, "unicast must stop once the caller is bridged"

    # --- warm transfer (issue 9 §2) ---
    def _leg(self) -> FakeChannel | None:
        """The last leg placed, up or hung up."""
        legs = self._legs()
        if not legs:
            return None
        return self.server.channels.get(legs[-1]) or self.server.ended.get(legs[-1])

    def heard_brief(self) -> bool:
        """The daemon's unicast frames to the answered leg carry speech (the brief)."""
        leg = self._leg()
        return leg is not None and spoken_chunks(b"".join(leg.media_in)) >= 5

    async def press(self, digits: str) -> None:
        """The agent presses keys: DTMF events on the last leg."""
        leg = self._leg()
        assert leg is not None
        for digit in digits:
            self.server.press_dtmf(leg.uuid, digit)

    def hung_up(self) -> bool:
        legs = self._legs()
        return bool(legs) and legs[-1] not in self.server.channels

    # --- hand back (issue 9 §5) ---
    async def hang_up(self) -> None:
        """The destination hangs up first (its BYE: the leg's hangup events)."""
        await self.server.hangup(self._legs()[-1])

    async def close(self) -> None:
        return None


# --- backends --------------------------------------------------------------------------------


class Backend:
    """Start a daemon on this PBX, place calls, provide destinations, cut the connection."""

    name = ""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.proxy: TcpProxy | None = None
        self._closers: list[Any] = []

    async def start_daemon(self) -> tuple[Daemon, Api]:
        raise NotImplementedError

    async def caller(self, number: str, hold_ms: int = 60000) -> Any:
        raise NotImplementedError

    async def destination(self, outcome: str) -> Any:
        raise NotImplementedError

    def cut(self) -> None:
        assert self.proxy is not None
        self.proxy.cut()

    def restore(self) -> None:
        assert self.proxy is not None
        self.proxy.restore()

    def track(self, thing: Any) -> Any:
        self._closers.append(thing)
        return thing

    async def drop_caller(self, channel_id: str) -> None:
        """The caller's channel ends now, in the PBX (what a caller's BYE does), whatever the
        caller's own hold time: the daemon sees the same hangup."""
        raise NotImplementedError

    async def legs_left(self) -> list[str]:
        """Our transfer legs (and, on Asterisk, their media channels and bridges) still in
        the PBX."""
        raise NotImplementedError

    async def ring_out(self, leg: str) -> None:
        """The destination's ring time runs out in the PBX: it ends the ringing leg with
        NO_ANSWER (Q.850 19), as its own ring timeout does, at a moment the test chooses."""
        raise NotImplementedError

    def lose_leg_reports(self, daemon: Daemon) -> None:
        """From now on, everything the adapter reports about transfer legs (ringing, answer,
        failure, hangup) is lost before the call service sees it: the ring guard's case. The
        same cut on every PBX (the adapter's event sink), so no PBX-side poll of the leg's
        state slips through on one and not on another."""
        assert daemon.calls is not None
        adapter = daemon.calls.pbx
        deliver = adapter._sink

        async def lossy(event: Any) -> None:
            if not str(getattr(event, "channel_id", "")).startswith("cbleg-"):
                await deliver(event)

        adapter._sink = lossy

    async def _proxy_to(self, host: str, port: int) -> TcpProxy:
        """A fresh cuttable proxy to the PBX (a restarted daemon's; the old one is closed)."""
        if self.proxy is not None:
            await self.proxy.close()
        self.proxy = await TcpProxy(host, port).start()
        return self.proxy

    async def close(self) -> None:
        for thing in reversed(self._closers):
            await thing.close()
        if self.proxy is not None:
            await self.proxy.close()


class AsteriskBackend(Backend):
    name = "asterisk"

    def __init__(self, tmp: Path, lab: Any) -> None:
        super().__init__(tmp)
        self.lab = lab

    async def start_daemon(self) -> tuple[Daemon, Api]:
        proxy = await self._proxy_to("127.0.0.1", self.lab.http_port)
        return await start_daemon(self.lab, self.tmp, ari_url=proxy.url)

    async def caller(self, number: str, hold_ms: int = 60000) -> SipCaller:
        sip = (self.lab.host, self.lab.sip_port)
        return self.track(await SipCaller(sip, number, hold_ms).start())

    async def destination(self, outcome: str) -> SipDestination:
        return self.track(await SipDestination(outcome, None).start())

    async def drop_caller(self, channel_id: str) -> None:
        status, _ = await asyncio.to_thread(self.lab.ari, "DELETE", f"/channels/{channel_id}")
        assert status == 204, status

    async def legs_left(self) -> list[str]:
        _, channels = await asyncio.to_thread(self.lab.ari, "GET", "/channels")
        _, bridges = await asyncio.to_thread(self.lab.ari, "GET", "/bridges")
        return [c["id"] for c in channels if "cbleg-" in c["id"]] + [
            b["id"] for b in bridges if "cbleg-" in b["id"]
        ]

    async def ring_out(self, leg: str) -> None:
        params = {"reason": "no_answer"}
        status, _ = await asyncio.to_thread(self.lab.ari, "DELETE", f"/channels/{leg}", params)
        assert status == 204, status

    async def close(self) -> None:
        await super().close()
        # Backstop: a channel left in the lab would be adopted by the next test's daemon.
        status, channels = self.lab.ari("GET", "/channels")
        for channel in channels if status == 200 and isinstance(channels, list) else []:
            self.lab.ari("DELETE", f"/channels/{channel['id']}")


class FreeswitchBackend(Backend):
    name = "freeswitch"

    def __init__(self, tmp: Path, real: str | None) -> None:
        super().__init__(tmp)
        self.real = real
        self.server: FakeEslServer | None = None
        self.sip: tuple[str, int] = ("127.0.0.1", 15060)
        self._found: tuple[str, int, str, Path] | None = None

    async def _target(self) -> tuple[str, int, str, Path]:
        """ESL host, port, password and the gateway directory the sofia profile includes;
        the same PBX (the same fake) for a daemon restarted within the test."""
        if self._found is None:
            self._found = await self._find_target()
        return self._found

    async def _find_target(self) -> tuple[str, int, str, Path]:
        if self.real is None:
            self.server = FakeEslServer("callbridge-test")
            await self.server.start()
            self.server.gateway_dir = self.tmp / "gateways"
            self.server.noanswer_seconds = None  # ring until originate_timeout, as FreeSWITCH
            self.server.heartbeat_max = 3.0  # freeswitch_conf's cb_heartbeat_max
            self._closers.append(_Stopper(self.server))
            return "127.0.0.1", self.server.port, "callbridge-test", self.tmp / "gateways"
        host, port, password = self.real.split(":", 2)
        self._closers.append(_GatewayCleanup(host, int(port), password))
        sip = os.environ.get("CALLBRIDGE_TEST_FREESWITCH_SIP") or f"{host}:15060"
        sip_host, sip_port = sip.rsplit(":", 1)
        self.sip = (sip_host, int(sip_port))
        probe = EslClient(host, int(port), password, reconnect=False)
        await probe.connect()
        try:
            conf_dir = (await probe.api("global_getvar conf_dir")).strip()
        finally:
            await probe.close()
        gateways = Path(conf_dir) / "callbridge-gateways"
        self._closers[-1].start(gateways)
        return host, int(port), password, gateways

    async def start_daemon(self) -> tuple[Daemon, Api]:
        host, port, password, gateways = await self._target()
        await self._proxy_to(host, port)
        configure_logging("console", "debug")
        fs = {
            "host": "127.0.0.1",
            "port": self.proxy.port,
            "password": password,
            "media_host": host if self.real else "127.0.0.1",
            "gateway_dir": gateways,
            "reconnect_initial_delay": 0.2,
            "reconnect_max_delay": 1.0,
            "unicast_port_min": unicast_ports(24000)[0],
            "unicast_port_max": unicast_ports(24000)[1],
        }
        settings = Settings(
            database=self.tmp / "callbridge.sqlite3",
            api={"host": "127.0.0.1", "port": 0},
            pbx="freeswitch",
            freeswitch=fs,
        )
        daemon = Daemon(settings)
        await daemon.start()
        assert daemon.db is not None
        key = await create_api_key(daemon.db, "tests")
        api = Api(f"http://127.0.0.1:{daemon.api_port}", key)
        await wait_for(lambda: bool(daemon.calls and daemon.calls.connected), "ESL connected", 10)
        return daemon, api

    async def caller(self, number: str, hold_ms: int = 60000) -> Any:
        if self.server is not None:
            return self.track(await FakeCaller(self.server, number, hold_ms).start())
        return self.track(await SipCaller(self.sip, number, hold_ms).start())

    async def destination(self, outcome: str) -> Any:
        if self.server is not None:
            return self.track(await FakeDestination(self.server, outcome).start())
        return self.track(await SipDestination(outcome, free_port()).start())

    async def _real_api(self, command: str) -> str:
        """One API command to the real FreeSWITCH, on a connection of its own."""
        assert self.real is not None
        host, port, password = self.real.split(":", 2)
        esl = EslClient(host, int(port), password, reconnect=False)
        await esl.connect()
        try:
            return await esl.api(command)
        finally:
            await esl.close()

    async def drop_caller(self, channel_id: str) -> None:
        if self.server is not None:
            await self.server.hangup(channel_id)
            return
        assert (await self._real_api(f"uuid_kill {channel_id}")).startswith("+OK")

    async def ring_out(self, leg: str) -> None:
        if self.server is not None:
            await self.server.hangup(leg, "NO_ANSWER")
            return
        assert (await self._real_api(f"uuid_kill {leg} NO_ANSWER")).startswith("+OK")

    async def legs_left(self) -> list[str]:
        if self.server is not None:
            return [u for u in self.server.channels if u.startswith("cbleg-")]
        listed = await self._real_api("show channels as json")
        return re.findall(r'"uuid":"(cbleg-[^"]+)"', listed)


@dataclass
class _Stopper:
    server: FakeEslServer

    async def close(self) -> None:
        await self.server.stop()


class _GatewayCleanup:
    """Remove the sofia gateways a test's trunks left on the real FreeSWITCH."""

    def __init__(self, host: str, port: int, password: str) -> None:
        self.esl = (host, port, password)
        self.directory: Path | None = None
        self.before: set[Path] = set()

    def start(self, directory: Path) -> None:
        self.directory = directory
        self.before = set(directory.glob("cb-trunk-*.xml"))

    async def close(self) -> None:
        if self.directory is None:
            return
        left = set(self.directory.glob("cb-trunk-*.xml")) - self.before
        if not left:
            return
        probe = EslClient(*self.esl, reconnect=False)
        await probe.connect()
        try:
            for path in left:
                path.unlink(missing_ok=True)
                await probe.api(f"sofia profile callbridge killgw {path.stem}")
            await probe.api("reloadxml")
        finally:
            await probe.close()
