"""RtpStream and MediaClock over real UDP sockets on loopback."""

from __future__ import annotations

import asyncio
import itertools
import struct

import numpy as np

from bridge.media.g711 import ulaw_decode, ulaw_encode
from bridge.media.rtp import PCM_FRAME_BYTES, MediaClock, RtpStream


class Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.packets: list[tuple[float, bytes]] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.packets.append((asyncio.get_running_loop().time(), data))


async def open_sink() -> tuple[asyncio.DatagramTransport, Sink, int]:
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(Sink, local_addr=("127.0.0.1", 0))
    return transport, sink, transport.get_extra_info("sockname")[1]


async def test_playout_is_paced_in_20ms_frames_with_continuous_headers() -> None:
    clock = MediaClock()
    stream = RtpStream("ulaw")
    await stream.open("127.0.0.1", clock)
    transport, sink, port = await open_sink()
    stream.set_remote("127.0.0.1", port)
    pcm = bytes(PCM_FRAME_BYTES * 25)  # 0.5 s
    t0 = asyncio.get_running_loop().time()
    assert await stream.play(pcm).done is True
    elapsed = asyncio.get_running_loop().time() - t0
    await asyncio.sleep(0.05)
    assert len(sink.packets) == 25
    headers = [struct.unpack("!BBHII", p[:12]) for _, p in sink.packets]
    seqs = [h[2] for h in headers]
    stamps = [h[3] for h in headers]
    assert all((b - a) % 65536 == 1 for a, b in itertools.pairwise(seqs))
    assert all(b - a == 160 for a, b in itertools.pairwise(stamps))
    assert headers[0][1] & 0x80 and not headers[1][1] & 0x80  # marker on the first only
    assert all(len(p) == 12 + 160 for _, p in sink.packets)
    assert 0.4 < elapsed < 0.7  # real-time pacing, not a burst
    stream.close()
    transport.close()
    await clock.close()


async def test_flush_drops_interruptible_but_keeps_uninterruptible() -> None:
    clock = MediaClock()
    stream = RtpStream("ulaw")
    await stream.open("127.0.0.1", clock)
    transport, _sink, port = await open_sink()
    stream.set_remote("127.0.0.1", port)
    chatter = stream.play(bytes(PCM_FRAME_BYTES * 50))
    message = stream.play(bytes(PCM_FRAME_BYTES * 5), interruptible=False)
    await asyncio.sleep(0.05)
    assert stream.flush() == 1
    assert await chatter.done is False
    assert await message.done is True
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
    tone = (np.sin(np.arange(160) / 3) * 8000).astype("<i2").tobytes()
    transport.sendto(struct.pack("!BBHII", 0x80, 0, 1, 160, 7) + ulaw_encode(tone))
    transport.sendto(struct.pack("!BBHII", 0x80, 101, 2, 320, 7) + b"\x01\x00\x00\xa0")  # DTMF
    transport.sendto(b"junk")
    await asyncio.sleep(0.05)
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
    frames = {seq: bytes([0x80 + seq]) * 160 for seq in range(1, 9)}  # distinct µ-law levels
    for seq in (1, 3, 2, 5, 6, 7, 8):  # 2 arrives late, 4 never
        transport.sendto(struct.pack("!BBHII", 0x80, 0, seq, 160 * seq, 9) + frames[seq])
    await asyncio.sleep(0.05)
    expected = [ulaw_decode(frames[s]) if s != 4 else bytes(320) for s in range(1, 9)]
    assert heard == expected
    transport.close()
    stream.close()
    await clock.close()
