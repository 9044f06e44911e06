"""A Python RTP endpoint for lab calls: SIPp does the signalling, this carries the media.

Sends G.711 in real-time 20 ms packets (Asterisk's jitter handling and bridges behave as with
a phone) and records what arrives, so tests can check who hears what (tone frequency, speech
energy). Test tooling: simple, not production media code.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bridge.media.g711 import alaw_decode, ulaw_decode, ulaw_encode

RATE = 8000
FRAME_SAMPLES = 160  # 20 ms at 8 kHz
PT_PCMU = 0
PT_PCMA = 8
PT_EVENT = 101  # RFC 4733 telephone-event, as the lab's SIPp scenarios offer it
DTMF_EVENTS = "0123456789*#ABCD"  # event codes 0-15


@dataclass(frozen=True, slots=True)
class RtpPacket:
    """One received packet: when, from where, and its RTP fields."""

    arrival: float  # time.monotonic()
    source: tuple[str, int]
    payload_type: int
    seq: int
    timestamp: int
    ssrc: int
    marker: bool
    payload: bytes


def parse_rtp(data: bytes) -> tuple[int, int, int, int, bool, bytes] | None:
    """(pt, seq, ts, ssrc, marker, payload) of an RTP packet, or None if it is not RTP v2."""
    if len(data) < 12 or data[0] >> 6 != 2:
        return None
    b0, b1, seq, ts, ssrc = struct.unpack("!BBHII", data[:12])
    offset = 12 + 4 * (b0 & 0x0F)
    if b0 & 0x10:  # header extension
        if len(data) < offset + 4:
            return None
        ext_words = struct.unpack("!H", data[offset + 2 : offset + 4])[0]
        offset += 4 + 4 * ext_words
    end = len(data)
    if b0 & 0x20 and end > offset:  # padding
        end -= data[-1]
    return b1 & 0x7F, seq, ts, ssrc, bool(b1 & 0x80), data[offset:end]


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, peer: RtpPeer) -> None:
        self.peer = peer

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.peer._on_datagram(data, addr)


class RtpPeer:
    """UDP RTP endpoint on 127.0.0.1 (free port unless given) sending PCMU (PT 0).

    The remote address is set with `set_remote()` or latched from the first packet received.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, payload_type: int = PT_PCMU):
        self.host = host
        self.port = port
        self.payload_type = payload_type
        self.remote: tuple[str, int] | None = None
        self.packets: list[RtpPacket] = []
        self.sent_packets = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._seq = random.randrange(0, 0x10000)
        self._ts = random.randrange(0, 0x100000000)
        self.ssrc = random.randrange(1, 0x100000000)
        self._marker = True
        self._send_lock = asyncio.Lock()
        self._got_packet = asyncio.Event()
        self.dtmf_started: float | None = None  # when the last key's first packet went

    async def start(self) -> RtpPeer:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self.host, self.port)
        )
        self._transport = transport
        self.port = int(transport.get_extra_info("sockname")[1])
        return self

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> RtpPeer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ receive
    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        parsed = parse_rtp(data)
        if parsed is None:
            return
        pt, seq, ts, ssrc, marker, payload = parsed
        if self.remote is None:
            self.remote = (addr[0], addr[1])
        self.packets.append(RtpPacket(time.monotonic(), addr, pt, seq, ts, ssrc, marker, payload))
        self._got_packet.set()

    def set_remote(self, host: str, port: int) -> None:
        self.remote = (host, port)

    async def wait_for_packet(self, timeout: float = 5.0) -> bool:
        """True once any RTP arrived (and so the remote address is latched)."""
        try:
            await asyncio.wait_for(self._got_packet.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def clear(self) -> None:
        """Forget what was received so far (to analyse only what comes next)."""
        self.packets.clear()

    def received_pcm(self, since: float | None = None) -> bytes:
        """16-bit LE PCM at 8 kHz of the received G.711 packets (others, e.g. DTMF, skipped)."""
        out: list[bytes] = []
        for p in self.packets:
            if since is not None and p.arrival < since:
                continue
            if p.payload_type == PT_PCMU:
                out.append(ulaw_decode(p.payload))
            elif p.payload_type == PT_PCMA:
                out.append(alaw_decode(p.payload))
        return b"".join(out)

    # Callbridge keeps RTP flowing with silence frames while the assistant says nothing, so
    # speech and its end are told by level, packet by packet, never by a pause in packets.

    def _loud(self, p: RtpPacket, level: float) -> bool:
        if p.payload_type == PT_PCMU:
            return rms(ulaw_decode(p.payload)) >= level
        if p.payload_type == PT_PCMA:
            return rms(alaw_decode(p.payload)) >= level
        return False

    def loud_since(self, since: float, level: float = 300.0) -> float | None:
        """Arrival time of the first loud packet after `since` (speech, not silence)."""
        return next(
            (p.arrival for p in self.packets if p.arrival > since and self._loud(p, level)), None
        )

    def went_quiet(self, gap: float, level: float = 100.0) -> bool:
        """True once the peer has heard speech and nothing loud for the last `gap` seconds."""
        for p in reversed(self.packets):
            if self._loud(p, level):
                return time.monotonic() - p.arrival >= gap
        return False

    def silence_began(self, after: float, gap: float, level: float = 100.0) -> float | None:
        """Arrival time of the first packet after `after` that starts `gap` seconds of silent
        audio (the assistant stopped talking), or None if there is no such run yet."""
        start: float | None = None
        for p in self.packets:
            if p.arrival < after or p.payload_type not in (PT_PCMU, PT_PCMA):
                continue
            if self._loud(p, level):
                start = None
            elif start is None:
                start = p.arrival
            elif p.arrival - start >= gap:
                return start
        return None

    # ------------------------------------------------------------------ send
    def _packet(self, payload: bytes) -> bytes:
        b1 = (0x80 if self._marker else 0) | self.payload_type
        self._marker = False
        header = struct.pack("!BBHII", 0x80, b1, self._seq, self._ts, self.ssrc)
        self._seq = (self._seq + 1) & 0xFFFF
        self._ts = (self._ts + len(payload)) & 0xFFFFFFFF
        return header + payload

    async def send_pcm(self, pcm: bytes) -> None:
        """Send 8 kHz 16-bit LE mono PCM as 20 ms packets, paced in real time."""
        if self._transport is None:
            raise RuntimeError("RtpPeer not started")
        if self.remote is None:
            raise RuntimeError("RtpPeer has no remote address (set_remote or receive first)")
        if self.payload_type != PT_PCMU:
            raise ValueError("only PCMU sending is implemented")
        frame_bytes = FRAME_SAMPLES * 2
        if len(pcm) % frame_bytes:
            pcm += b"\x00" * (frame_bytes - len(pcm) % frame_bytes)
        async with self._send_lock:
            start = time.monotonic()
            for i in range(0, len(pcm), frame_bytes):
                payload = ulaw_encode(pcm[i : i + frame_bytes])
                self._transport.sendto(self._packet(payload), self.remote)
                self.sent_packets += 1
                delay = start + (i // frame_bytes + 1) * 0.02 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)

    async def send_dtmf(self, digits: str, duration_ms: int = 160, gap_ms: int = 100) -> None:
        """Press `digits` as a phone does (warm accept, hand back): `gap_ms` of silence
        between keys; `dtmf_started` is when the first key's first packet went."""
        for n, digit in enumerate(digits):
            if n:
                await self.send_silence(gap_ms / 1000)
            await self._send_key(digit, duration_ms, first=n == 0)

    async def _send_key(self, digit: str, duration_ms: int, *, first: bool) -> None:
        """One RFC 4733 (2833) telephone-event, as a phone sends a key: payload type
        PT_EVENT (the lab UAS's SDP offers 101), one packet every 20 ms with the growing
        duration, all with the event's timestamp (marker on the first), then the end packet
        three times. Paced in real time, sharing this stream's sequence and SSRC."""
        if self._transport is None or self.remote is None:
            raise RuntimeError("RtpPeer not started or without a remote address")
        event = DTMF_EVENTS.index(digit)
        async with self._send_lock:
            if first:
                self.dtmf_started = time.monotonic()  # the key's first packet goes now
            timestamp = self._ts
            steps = max(1, duration_ms // 20)
            packets = [(n * FRAME_SAMPLES, False) for n in range(1, steps + 1)]
            packets += [(steps * FRAME_SAMPLES, True)] * 3
            for i, (duration, end) in enumerate(packets):
                b1 = (0x80 if i == 0 else 0) | PT_EVENT
                header = struct.pack("!BBHII", 0x80, b1, self._seq, timestamp, self.ssrc)
                self._seq = (self._seq + 1) & 0xFFFF
                payload = struct.pack("!BBH", event, (0x80 if end else 0) | 10, duration)
                self._transport.sendto(header + payload, self.remote)
                self.sent_packets += 1
                if i < steps:
                    await asyncio.sleep(0.02)
            self._ts = (timestamp + steps * FRAME_SAMPLES) & 0xFFFFFFFF

    async def send_silence(self, seconds: float) -> None:
        await self.send_pcm(b"\x00\x00" * int(RATE * seconds))

    async def send_tone(self, freq_hz: float, seconds: float, amplitude: float = 0.3) -> None:
        await self.send_pcm(tone_pcm(freq_hz, seconds, amplitude))

    async def send_file(self, wav_path: str | Path) -> None:
        """Send a 16-bit mono WAV (any rate: resampled to 8 kHz)."""
        await self.send_pcm(read_wav_8k(wav_path))


# ---------------------------------------------------------------------- audio helpers
def tone_pcm(freq_hz: float, seconds: float, amplitude: float = 0.3, rate: int = RATE) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * freq_hz * t) * amplitude * 32767).astype("<i2").tobytes()


def read_wav_8k(path: str | Path) -> bytes:
    """16-bit mono WAV → 8 kHz PCM (linear interpolation after a crude moving-average
    low-pass: good enough for test prompts)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: need 16-bit mono WAV")
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)
    if rate != RATE:
        if rate > RATE:
            k = max(1, round(rate / RATE))
            x = np.convolve(x, np.ones(k) / k, mode="same")
        n_out = int(len(x) * RATE / rate)
        x = np.interp(np.arange(n_out) * rate / RATE, np.arange(len(x)), x)
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


def _samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float64)


def rms(pcm: bytes) -> float:
    """Root-mean-square level of 16-bit PCM (0 for silence, ~9000 for a 0.4 FS sine)."""
    x = _samples(pcm)
    return float(np.sqrt(np.mean(x * x))) if len(x) else 0.0


def dominant_frequency(pcm: bytes, rate: int = RATE) -> float:
    """Frequency (Hz) of the strongest FFT bin, DC excluded; 0.0 for empty input."""
    x = _samples(pcm)
    if len(x) < 16:
        return 0.0
    x = (x - x.mean()) * np.hanning(len(x))
    spectrum = np.abs(np.fft.rfft(x))
    spectrum[0] = 0.0
    return float(np.argmax(spectrum) * rate / len(x))


def speech_like(
    pcm: bytes, rate: int = RATE, threshold: float = 300.0, min_active: float = 0.2
) -> bool:
    """True if at least `min_active` of the 20 ms frames carry energy above `threshold` RMS:
    a cheap "somebody is talking / a prompt is playing" check, not a VAD."""
    x = _samples(pcm)
    n = rate // 50
    frames = len(x) // n
    if frames == 0:
        return False
    levels = np.sqrt(np.mean(x[: frames * n].reshape(frames, n) ** 2, axis=1))
    return float(np.mean(levels > threshold)) >= min_active


def band_share(
    pcm: bytes, freqs: tuple[float, ...], width: float = 20.0, rate: int = RATE
) -> float:
    """Share (0..1) of the signal's spectral energy within `width` Hz of `freqs`."""
    x = _samples(pcm)
    if len(x) < 16:
        return 0.0
    x = (x - x.mean()) * np.hanning(len(x))
    power = np.abs(np.fft.rfft(x)) ** 2
    bins = np.fft.rfftfreq(len(x), 1 / rate)
    total = float(power[1:].sum())
    if total <= 0:
        return 0.0
    near = np.zeros(len(bins), dtype=bool)
    for f in freqs:
        near |= np.abs(bins - f) <= width
    return float(power[near].sum()) / total


RINGBACK_HZ = (440.0, 480.0)  # tone:ring of the lab's indications.conf (us: 440+480)


def ringback_windows(pcm: bytes, rate: int = RATE, window: float = 0.5) -> int:
    """How many `window`-second stretches of `pcm` are ringback (loud, nearly all of their
    energy at 440+480 Hz); speech and silence count 0."""
    n = int(rate * window) * 2
    count = 0
    for i in range(0, len(pcm) - n + 1, n):
        chunk = pcm[i : i + n]
        if rms(chunk) > 300 and band_share(chunk, RINGBACK_HZ) > 0.6:
            count += 1
    return count
