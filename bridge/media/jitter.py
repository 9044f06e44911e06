"""A small reordering jitter buffer for inbound RTP.

In-order packets pass at once (no added latency: the usual case on a LAN or loopback). A
packet that arrives early is held until the gap before it fills or `depth` packets are
waiting; then the missing ones are declared lost and reported as `None` so the caller of
`push` can keep time (e.g. with silence). Late packets and duplicates are dropped. A jump of
more than `max_gap` sequence numbers, or a new SSRC, starts the stream over.
"""

from __future__ import annotations

_SEQ_MOD = 1 << 16
_HALF = 1 << 15


class JitterBuffer:
    def __init__(self, depth: int = 3, max_gap: int = 50) -> None:
        self.depth = depth
        self.max_gap = max_gap
        self._expected: int | None = None
        self._ssrc: int | None = None
        self._pending: dict[int, bytes] = {}
        self.lost = 0
        self.dropped = 0

    def push(self, seq: int, payload: bytes, ssrc: int = 0) -> list[bytes | None]:
        """Add one packet; return the payloads now due, in order (`None` for a lost one)."""
        if ssrc != self._ssrc or self._expected is None:
            flushed = self._restart(ssrc)
            self._expected = (seq + 1) % _SEQ_MOD
            return [*flushed, payload]
        ahead = (seq - self._expected) % _SEQ_MOD
        if ahead >= _HALF:  # older than what was already played out: late or duplicate
            self.dropped += 1
            return []
        if ahead > self.max_gap:  # the sender jumped: start over from this packet
            flushed = self._restart(ssrc)
            self._expected = (seq + 1) % _SEQ_MOD
            return [*flushed, payload]
        if seq in self._pending:
            self.dropped += 1
            return []
        self._pending[seq] = payload
        out: list[bytes | None] = []
        if len(self._pending) > self.depth:  # waited long enough: the gap is loss
            while self._expected not in self._pending:
                out.append(None)
                self.lost += 1
                self._expected = (self._expected + 1) % _SEQ_MOD
        while self._expected in self._pending:
            out.append(self._pending.pop(self._expected))
            self._expected = (self._expected + 1) % _SEQ_MOD
        return out

    def _restart(self, ssrc: int) -> list[bytes | None]:
        """Flush what was held (in order) and forget the old stream."""
        held: list[bytes | None] = []
        if self._pending and self._expected is not None:
            start = self._expected
            for seq in sorted(self._pending, key=lambda s: (s - start) % _SEQ_MOD):
                held.append(self._pending[seq])
        self._pending.clear()
        self._ssrc = ssrc
        return held
