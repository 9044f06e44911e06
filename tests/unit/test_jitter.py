"""The jitter buffer: order restored, loss reported, late and duplicate packets dropped."""

from __future__ import annotations

from bridge.media.jitter import JitterBuffer


def feed(jb: JitterBuffer, seqs: list[int], ssrc: int = 1) -> list[bytes | None]:
    out: list[bytes | None] = []
    for seq in seqs:
        out += jb.push(seq, f"p{seq}".encode(), ssrc)
    return out


def test_in_order_packets_pass_at_once() -> None:
    jb = JitterBuffer()
    for seq in (10, 11, 12):
        assert jb.push(seq, b"x", 1) == [b"x"]


def test_reordering_is_undone() -> None:
    assert feed(JitterBuffer(), [1, 3, 2, 4]) == [b"p1", b"p2", b"p3", b"p4"]


def test_a_lost_packet_is_reported_once_the_buffer_is_deep_enough() -> None:
    jb = JitterBuffer(depth=2)
    assert feed(jb, [1, 3, 4]) == [b"p1"]  # waiting for 2
    assert jb.push(5, b"p5", 1) == [None, b"p3", b"p4", b"p5"]
    assert jb.lost == 1
    assert jb.push(2, b"p2", 1) == []  # too late now
    assert jb.dropped == 1


def test_duplicates_are_dropped() -> None:
    jb = JitterBuffer()
    assert feed(jb, [1, 2, 2, 3, 3]) == [b"p1", b"p2", b"p3"]
    assert jb.dropped == 2


def test_sequence_wraps_around() -> None:
    assert feed(JitterBuffer(), [65534, 0, 65535, 1]) == [b"p65534", b"p65535", b"p0", b"p1"]


def test_new_ssrc_or_a_big_jump_starts_over() -> None:
    jb = JitterBuffer()
    assert feed(jb, [100, 101]) == [b"p100", b"p101"]
    assert jb.push(7, b"new", 2) == [b"new"]  # a new stream (re-INVITE, new source)
    assert jb.push(8, b"next", 2) == [b"next"]
    assert jb.push(5000, b"jump", 2) == [b"jump"]
