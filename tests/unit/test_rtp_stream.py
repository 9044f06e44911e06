"""RtpStream and MediaClock over real UDP sockets on loopback."""

from __future__ import annotations

import asyncio
import itertools
import struct

import numpy as np

from bridge.media.g711 import ulaw_decode, ulaw_encode
from bridge.media.rtp import PCM_FRAME_BYTES, MediaClock, RtpStream
from tests.support.daemon import wait_for


class Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.packets: list[tuple[float, bytes]] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.packets.append((asyncio.get_running_loop().time(), data))


async def open_sink() -> tuple[asyncio.DatagramTransport, Sink, int]:
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(Sink, local_addr=("127.0.0.1", 0))
    return transport, sink, transport.get_extra_info("sockname")[1]


def count_ticks(stream: RtpStream) -> list[int]:
    """Count the clock's ticks of `stream` (one-element list, read after the fact).

    "The stream never paused" is a property of the stream (one packet per tick of the
    clock), not of wall-clock gaps between packets: a loaded machine delays the loop (the
    clock then restarts its schedule), which is no fault of the stream."""
    ticks = [0]
    real = stream.tick

    def tick() -> bool:
        ticks[0] += 1
        return real()

    stream.tick = tick  # type: ignore[method-assign]
    return ticks


async def all_sent(clock: MediaClock, sink: Sink, ticks: list[int]) -> None:
    """Stop the clock, then wait until the sink has every packet the ticks sent."""
    await clock.close()
    await wait_for(lambda: len(sink.packets) >= ticks[0], f"{ticks[0]} packets at the sink", 10)
    assert len(sink.packets) == ticks[0], "a tick sent no packet (or more than one)"


async def test_playout_is_paced_in_20ms_frames_with_continuous_headers() -> None:
    clock = MediaClock()
    stream = RtpStream("ulaw")
    await stream.open("127.0.0.1", clock)
    transport, sink, port = await open_sink()
    stream.set_remote("127.0.0.1", port)
    ticks = count_ticks(stream)
    tone = (np.sin(np.arange(160 * 25) / 3) * 8000).astype("<i2").tobytes()  # 0.5 s
    t0 = asyncio.get_running_loop().time()
    assert await stream.play(tone).done is True
    elapsed = asyncio.get_running_loop().time() - t0
    await wait_for(lambda: len(sink.packets) >= 30, "silence after the playout", 10)
    await all_sent(clock, sink, ticks)
    speech = [p for _, p in sink.packets if p[12:] != b"\xff" * 160]
    assert [p[12:] for p in speech] == [ulaw_encode(tone[i : i + 320]) for i in range(0, 8000, 320)]
    headers = [struct.unpack("!BBHII", p[:12]) for _, p in sink.packets]
    seqs = [h[2] for h in headers]
    stamps = [h[3] for h in headers]
    assert all((b - a) % 65536 == 1 for a, b in itertools.pairwise(seqs))
    assert all(b - a == 160 for a, b in itertools.pairwise(stamps))
    assert headers[0][1] & 0x80 and not headers[1][1] & 0x80  # marker on the first only
    assert all(len(p) == 12 + 160 for _, p in sink.packets)
    assert sink.packets[-1][1][12:] == b"\xff" * 160  # silence after the speech
    # Paced: one packet a tick (all_sent) and the 25 speech frames above, one each; the
    # clock's absolute schedule cannot send them in less than 24 periods (a lower bound
    # only: a loaded machine makes it slower, never faster).
    assert elapsed > 0.45
    stream.close()
    transport.close()


async def test_flush_drops_interruptible_but_keeps_uninterruptible() -> None:
    clock = MediaClock()
    stream = RtpStream("ulaw")
    await stream.open("127.0.0.1", clock)
    transport, _sink, port = await open_sink()
    stream.set_remote("127.0.0.1", port)
    # 60 s of chatter: still playing when flushed, however late the test gets to it.
    chatter = stream.play(bytes(PCM_FRAME_BYTES * 3000))
    message = stream.play(bytes(PCM_FRAME_BYTES * 5), interruptible=False)
    await wait_for(lambda: stream.packets_out >= 2, "the chatter to start", 10)
    assert stream.flush() == 1
    assert await chatter.done is False
    assert await message.done is True
    stream.close()
    transport.close()
    await clock.close()


async def test_on_start_runs_when_the_first_frame_goes_out_and_never_for_flushed_audio() -> None:
    """The turn-latency hook: called once, as a playout's first frame is sent (after what was
    queued before it), never for audio flushed before it started; a failing hook does not
    stop the pacing."""
    clock = MediaClock()
    stream = RtpStream("ulaw")
    await stream.open("127.0.0.1", clock)
    transport, _sink, port = await open_sink()
    stream.set_remote("127.0.0.1", port)
    starts: list[tuple[str, int]] = []

    def failing() -> None:
        starts.append(("b", stream.packets_out))
        raise RuntimeError("a listener's bug")

    dropped = stream.play(bytes(PCM_FRAME_BYTES), on_start=lambda: starts.append(("x", 0)))
    assert stream.flush() == 1  # before any tick: never started
    first = stream.play(
        bytes(PCM_FRAME_BYTES * 3),
        interruptible=False,
        on_start=lambda: starts.append(("a", stream.packets_out)),
    )
    second = stream.play(bytes(PCM_FRAME_BYTES * 2), on_start=failing)
    assert await first.done is True
    assert await second.done is True
    assert await dropped.done is False
    (a, before), (b, at) = starts
    assert (a, b) == ("a", "b")
    assert at == before + 3  # b's first frame went out right after a's three
    stream.close()
    transport.close()
    await clock.close()


async def test_inbound_rtp_is_decoded_and_foreign_payloads_ignored() -> None:
    clock = MediaClock()
    heard: list[bytes] = []
    stream = RtpStream("ulaw", on_audio=heard.append)
    host, port = await stream.open("127.0.0.1", clock)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=(host, port)
    )
    stream.set_remote(*transport.get_extra_info("sockname")[:2])  # the PBX's media address
    tone = (np.sin(np.arange(160) / 3) * 8000).astype("<i2").tobytes()
    transport.sendto(struct.pack("!BBHII", 0x80, 0, 1, 160, 7) + ulaw_encode(tone))
    transport.sendto(struct.pack("!BBHII", 0x80, 101, 2, 320, 7) + b"\x01\x00\x00\xa0")  # DTMF
    transport.sendto(b"junk")
    await wait_for(lambda: stream.packets_in + stream.packets_foreign >= 1, "the packets", 2)
    await wait_for(lambda: len(heard) >= 1, "the audio", 2)
    assert len(heard) == 1 and len(heard[0]) == 320
    assert stream.packets_in == 1
    transport.close()
    stream.close()
    await clock.close()


async def test_inbound_packets_are_reordered_and_loss_becomes_silence() -> None:
    clock = MediaClock()
    heard: list[bytes] = []
    stream = RtpStream("ulaw", on_audio=heard.append)
    host, port = await stream.open("127.0.0.1", clock)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=(host, port)
    )
    stream.set_remote(*transport.get_extra_info("sockname")[:2])
    frames = {seq: bytes([0x80 + seq]) * 160 for seq in range(1, 9)}  # distinct µ-law levels
    for seq in (1, 3, 2, 5, 6, 7, 8):  # 2 arrives late, 4 never
        transport.sendto(struct.pack("!BBHII", 0x80, 0, seq, 160 * seq, 9) + frames[seq])
    await wait_for(lambda: len(heard) >= 8, "all eight frames", 2)
    expected = [ulaw_decode(frames[s]) if s != 4 else bytes(320) for s in range(1, 9)]
    assert heard == expected
    transport.close()
    stream.close()
    await clock.close()


async def _stream_to_sink(
    codec_name: str, **remote: str
) -> tuple[RtpStream, MediaClock, Sink, object]:
    clock = MediaClock()
    stream = RtpStream(codec_name)
    await stream.open("127.0.0.1", clock)
    transport, sink, port = await open_sink()
    stream.set_remote("127.0.0.1", port, **remote)
    return stream, clock, sink, transport


async def test_silence_is_sent_while_nothing_is_queued() -> None:
    """Contract 5: no RTP gap while the assistant is silent (carriers' inactivity timers)."""
    stream, clock, sink, transport = await _stream_to_sink("ulaw")
    ticks = count_ticks(stream)
    await wait_for(lambda: len(sink.packets) >= 50, "a second of silence frames", 10)
    await all_sent(clock, sink, ticks)  # a silence frame on every tick: no gap
    payloads = [p[12:] for _, p in sink.packets]
    assert set(payloads) == {b"\xff" * 160}
    headers = [struct.unpack("!BBHII", p[:12]) for _, p in sink.packets]
    assert all((b[2] - a[2]) % 65536 == 1 for a, b in itertools.pairwise(headers))
    assert all(b[3] - a[3] == 160 for a, b in itertools.pairwise(headers))
    assert stream.silence_out == len(sink.packets)
    stream.close()
    transport.close()  # type: ignore[attr-defined]


async def test_speech_between_silences_keeps_one_timeline_and_barge_in() -> None:
    stream, clock, sink, transport = await _stream_to_sink("alaw")
    ticks = count_ticks(stream)
    await wait_for(lambda: len(sink.packets) >= 5, "silence first", 10)
    # 60 s of tone: still playing at the barge-in however late the test gets to it (a 1 s
    # tone could end first on a loaded machine, and flush() then had nothing to drop).
    tone = (np.sin(np.arange(160 * 3000) / 3) * 8000).astype("<i2").tobytes()
    chatter = stream.play(tone)
    await wait_for(lambda: any(p[12:] != b"\xd5" * 160 for _, p in sink.packets), "speech", 10)
    assert stream.flush() == 1  # barge-in still drops the interruptible playout
    assert await chatter.done is False
    count = len(sink.packets)
    await wait_for(lambda: len(sink.packets) >= count + 10, "silence again", 10)
    await all_sent(clock, sink, ticks)  # a frame on every tick: the stream never paused
    assert sink.packets[-1][1][12:] == b"\xd5" * 160  # A-law silence
    headers = [struct.unpack("!BBHII", p[:12]) for _, p in sink.packets]
    assert all((b[2] - a[2]) % 65536 == 1 for a, b in itertools.pairwise(headers))
    assert all(b[3] - a[3] == 160 for a, b in itertools.pairwise(headers))
    assert sum(1 for h in headers if h[1] & 0x80) == 1  # one marker: the stream never paused
    stream.close()
    transport.close()  # type: ignore[attr-defined]


async def test_raw_framing_silence_is_l16_zeros() -> None:
    stream, clock, sink, transport = await _stream_to_sink("ulaw", framing="raw", codec="slin_le")
    await wait_for(lambda: len(sink.packets) >= 5, "silence frames", 2)
    assert {p for _, p in sink.packets} == {bytes(320)}
    stream.close()
    await wait_for(lambda: clock._streams == set(), "the closed stream to leave the clock", 1)
    transport.close()  # type: ignore[attr-defined]
    await clock.close()


async def test_rtp_is_accepted_only_from_the_pbx_media_address() -> None:
    clock = MediaClock()
    heard: list[bytes] = []
    stream = RtpStream("ulaw", on_audio=heard.append, peer_host="127.0.0.1")
    host, port = await stream.open("127.0.0.1", clock)
    loop = asyncio.get_running_loop()
    pbx, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=(host, port))
    intruder, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=(host, port)
    )
    frame = struct.pack("!BBHII", 0x80, 0, 1, 160, 7) + b"\x10" * 160
    pbx.sendto(frame)  # before set_remote: the PBX host is enough
    await wait_for(lambda: len(heard) == 1, "the PBX's early packet", 2)
    stream.set_remote(*pbx.get_extra_info("sockname")[:2])
    intruder.sendto(struct.pack("!BBHII", 0x80, 0, 2, 320, 8) + b"\x20" * 160)
    pbx.sendto(struct.pack("!BBHII", 0x80, 0, 2, 320, 7) + b"\x30" * 160)
    await wait_for(lambda: len(heard) == 2 and stream.packets_foreign == 1, "both packets", 2)
    assert heard[1] == ulaw_decode(b"\x30" * 160)  # only the PBX's audio reached us
    no_peer = RtpStream("ulaw", on_audio=heard.append)  # no peer_host, no remote: nothing
    nhost, nport = await no_peer.open("127.0.0.1", clock)
    stray, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=(nhost, nport)
    )
    stray.sendto(frame)
    await wait_for(lambda: no_peer.packets_foreign == 1, "the stray packet", 2)
    assert no_peer.packets_in == 0
    for t in (pbx, intruder, stray):
        t.close()
    stream.close()
    no_peer.close()
    await clock.close()
