"""RTP for one call's audio, and one shared 20 ms clock that paces every call's playout.

A single clock task for all calls (instead of one timer per call) keeps the wake-ups per
second constant as calls grow. Outbound audio is queued as playouts; `flush()` drops the
interruptible ones at once (barge-in) while an uninterruptible playout (a transfer message)
always plays to the end.

No gaps: once the PBX's address is known the clock sends a frame every 20 ms, silence when
nothing is queued (µ-law 0xFF, A-law 0xD5, L16 zeros), so a carrier's RTP inactivity timer
never hangs up a caller who listens while the assistant is silent. Inbound packets are
accepted only from the PBX's media address (the one `set_remote` names; before it, only from
`peer_host` if given): RTP from anyone else is counted and dropped.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bridge.log import get_logger
from bridge.media import g711
from bridge.media.jitter import JitterBuffer

log = get_logger(__name__)

FRAME_MS = 20
RATE = 8000
SAMPLES_PER_FRAME = RATE * FRAME_MS // 1000  # 160
PCM_FRAME_BYTES = SAMPLES_PER_FRAME * 2


@dataclass(frozen=True)
class Codec:
    name: str
    payload_type: int
    encode: Callable[[bytes], bytes]
    decode: Callable[[bytes], bytes]


def _slin_encode(pcm: bytes) -> bytes:  # RTP carries L16 in network byte order
    return np.frombuffer(pcm, dtype="<i2").astype(">i2").tobytes()


def _slin_decode(data: bytes) -> bytes:
    return np.frombuffer(data[: len(data) // 2 * 2], dtype=">i2").astype("<i2").tobytes()


def _same(data: bytes) -> bytes:  # our PCM is already L16 little-endian
    return data[: len(data) // 2 * 2]


CODECS = {
    "ulaw": Codec("ulaw", 0, g711.ulaw_encode, g711.ulaw_decode),
    "alaw": Codec("alaw", 8, g711.alaw_encode, g711.alaw_decode),
    "slin": Codec("slin", 10, _slin_encode, _slin_decode),
    # Host-order L16, as FreeSWITCH's `unicast` sends it (raw framing only: no payload type).
    "slin_le": Codec("slin_le", -1, _same, _same),
}
FRAMINGS = ("rtp", "raw")


@dataclass
class Playout:
    """Audio queued for the caller. `done` resolves True when played out, False if flushed."""

    pcm: bytes
    interruptible: bool = True
    offset: int = 0
    # Called once, when the first frame of this audio is sent to the caller (turn latency).
    on_start: Callable[[], None] | None = None
    done: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def finish(self, played: bool) -> None:
        if not self.done.done():
            self.done.set_result(played)


class RtpStream(asyncio.DatagramProtocol):
    """One call's RTP: decode what arrives, send what is queued, 20 ms at a time.

    With `framing="raw"` (set by `set_remote`, as the PBX dictates) every datagram is one bare
    payload both ways, no RTP header: FreeSWITCH's `unicast` media. Everything else (pacing,
    playouts, barge-in) is the same, so one session code drives both PBXs.
    """

    def __init__(
        self,
        codec: str,
        on_audio: Callable[[bytes], None] | None = None,
        *,
        peer_host: str | None = None,
    ) -> None:
        self.codec = CODECS[codec]
        self.peer_host = peer_host  # the PBX's media host, before set_remote says more
        self.on_audio = on_audio
        self.transport: asyncio.DatagramTransport | None = None
        self.remote: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self._queue: deque[Playout] = deque()
        self._seq = int.from_bytes(os.urandom(2), "big")
        self._ts = int.from_bytes(os.urandom(4), "big")
        self._ssrc = int.from_bytes(os.urandom(4), "big")
        self._talking = False
        self.framing = "rtp"
        self._jitter = JitterBuffer()
        self._frame_bytes = PCM_FRAME_BYTES
        self.packets_in = 0
        self.packets_out = 0
        self.packets_foreign = 0  # dropped: not from the PBX's media address
        self.silence_out = 0  # silence frames sent while nothing was queued
        self._silence = self.codec.encode(bytes(PCM_FRAME_BYTES))
        self._closed = False
        self._clock: MediaClock | None = None

    async def open(self, host: str, clock: MediaClock) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(host, 0))
        assert self.transport is not None
        self.local = self.transport.get_extra_info("sockname")[:2]
        self._clock = clock
        return self.local

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _from_pbx(self, addr: tuple[str, int]) -> bool:
        host, port = _norm_host(addr[0]), addr[1]
        if self.remote is not None:
            rhost, rport = self.remote
            return port == rport and (host == rhost or rhost in _ANY)
        return self.peer_host is not None and host == _norm_host(self.peer_host)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self._from_pbx(addr):
            self.packets_foreign += 1
            return
        if self.framing == "raw":
            self.packets_in += 1
            if self.on_audio is not None and data:
                self.on_audio(self.codec.decode(data))
            return
        if len(data) < 12 or data[0] >> 6 != 2:
            return  # not RTP v2
        pt = data[1] & 0x7F
        if pt != self.codec.payload_type:
            return  # comfort noise, DTMF events and the like: not audio for us
        header = 12 + 4 * (data[0] & 0x0F)
        if data[0] & 0x10 and len(data) >= header + 4:  # header extension
            header += 4 + 4 * struct.unpack_from("!H", data, header + 2)[0]
        payload = data[header:]
        if data[0] & 0x20 and payload:  # padding
            payload = payload[: -payload[-1]]
        self.packets_in += 1
        if self.on_audio is None or not payload:
            return
        seq, ssrc = struct.unpack_from("!H", data, 2)[0], struct.unpack_from("!I", data, 8)[0]
        for due in self._jitter.push(seq, payload, ssrc):
            if due is None:  # lost: silence of a frame's length keeps the turn timing right
                self.on_audio(bytes(self._frame_bytes))
                continue
            pcm = self.codec.decode(due)
            self._frame_bytes = len(pcm)
            self.on_audio(pcm)

    def set_remote(
        self, host: str, port: int, *, framing: str = "rtp", codec: str | None = None
    ) -> None:
        """Where to send; `framing` and `codec` as the PBX's attach answer says."""
        if framing not in FRAMINGS:
            raise ValueError(f"unknown framing {framing!r}")
        if codec is not None:
            self.codec = CODECS[codec]
        self._silence = self.codec.encode(bytes(PCM_FRAME_BYTES))
        self.framing = framing
        self.remote = (_norm_host(host), port)
        if self._clock is not None and not self._closed:
            self._clock.add(self)  # from now on a frame every 20 ms, speech or silence

    # --- outbound ---------------------------------------------------------------------------

    def play(
        self,
        pcm: bytes,
        *,
        interruptible: bool = True,
        on_start: Callable[[], None] | None = None,
    ) -> Playout:
        """Queue 8 kHz 16-bit PCM for the caller; returns the playout to await or watch.
        `on_start` runs when its first frame is sent (not if it is flushed before)."""
        playout = Playout(pcm, interruptible, on_start=on_start)
        if not pcm:
            playout.finish(True)
            return playout
        self._queue.append(playout)
        if self._clock is not None:
            self._clock.add(self)
        return playout

    def flush(self) -> int:
        """Barge-in: drop every interruptible playout; return how many were dropped."""
        kept: deque[Playout] = deque()
        dropped = 0
        for playout in self._queue:
            if playout.interruptible:
                playout.finish(False)
                dropped += 1
            else:
                kept.append(playout)
        self._queue = kept
        return dropped

    @property
    def playing(self) -> bool:
        return bool(self._queue)

    def tick(self) -> bool:
        """Send one 20 ms frame: queued audio, or silence when nothing is queued (no RTP gap
        for the carrier's inactivity timer). False once the stream has nowhere to send."""
        if self._closed or self.transport is None:
            return False
        if not self._queue:
            if self.remote is None:
                return False
            self._send(self._silence)
            self.silence_out += 1
            return True
        frame = bytearray()
        while len(frame) < PCM_FRAME_BYTES and self._queue:
            head = self._queue[0]
            if head.offset == 0 and head.on_start is not None:
                _started(head)
            take = head.pcm[head.offset : head.offset + PCM_FRAME_BYTES - len(frame)]
            frame += take
            head.offset += len(take)
            if head.offset >= len(head.pcm):
                self._queue.popleft()
                head.finish(True)
        if len(frame) < PCM_FRAME_BYTES:
            frame += bytes(PCM_FRAME_BYTES - len(frame))
        self._send(self.codec.encode(bytes(frame)))
        return True

    def _send(self, payload: bytes) -> None:
        if self.framing == "raw":
            if self.transport is not None and self.remote is not None:
                self.transport.sendto(payload, self.remote)
                self.packets_out += 1
            return
        marker = 0 if self._talking else 0x80
        self._talking = True
        header = struct.pack(
            "!BBHII", 0x80, marker | self.codec.payload_type, self._seq, self._ts, self._ssrc
        )
        self._seq = (self._seq + 1) & 0xFFFF
        self._ts = (self._ts + SAMPLES_PER_FRAME) & 0xFFFFFFFF
        if self.transport is not None and self.remote is not None:
            self.transport.sendto(header + payload, self.remote)
            self.packets_out += 1

    def close(self) -> None:
        self._closed = True
        for playout in self._queue:
            playout.finish(False)
        self._queue.clear()
        if self._clock is not None:
            self._clock.discard(self)
        if self.transport is not None:
            self.transport.close()


def _started(playout: Playout) -> None:
    callback, playout.on_start = playout.on_start, None
    try:
        if callback is not None:
            callback()
    except Exception:  # a listener's bug must not stop the pacing of every call
        log.exception("media.on_start_failed")


_ANY = ("0.0.0.0", "::")


def _norm_host(host: str) -> str:
    """`::ffff:10.0.0.1` (a v4 peer on a dual-stack socket) compares equal to `10.0.0.1`."""
    return host.removeprefix("::ffff:")


class MediaClock:
    """Ticks every 20 ms on an absolute schedule and sends a frame for each stream that has
    somewhere to send (speech, or silence when idle).

    Runs only while some stream is registered. A late wake-up sends the missed frames at
    once (up to 60 ms) so the caller's jitter buffer sees steady timestamps.
    """

    MAX_CATCH_UP = 3

    def __init__(self) -> None:
        self._streams: set[RtpStream] = set()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def add(self, stream: RtpStream) -> None:
        self._streams.add(stream)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    def discard(self, stream: RtpStream) -> None:
        self._streams.discard(stream)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        period = FRAME_MS / 1000
        while True:
            if not self._streams:
                self._wake.clear()
                await self._wake.wait()
            next_tick = loop.time()
            while self._streams:
                behind = loop.time() - next_tick
                if behind > self.MAX_CATCH_UP * period:
                    next_tick = loop.time()  # too far behind: restart the schedule
                    due = 1
                else:
                    due = int(max(behind, 0.0) / period) + 1
                for _ in range(due):
                    for stream in list(self._streams):
                        if not stream.tick():
                            self._streams.discard(stream)
                    next_tick += period
                await asyncio.sleep(max(0.0, next_tick - loop.time()))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
