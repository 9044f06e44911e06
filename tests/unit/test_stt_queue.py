"""Bounded STT concurrency: `QueuedStt` (issue 7, section 8)."""

from __future__ import annotations

import asyncio

import pytest

from bridge.lab.harness import wait_for
from bridge.speech.stt import QueuedStt, Transcript


class GatedStt:
    """Each transcription waits until the test opens its gate (by the prompt as its name)."""

    name = "gated"

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.started: list[str] = []
        self.running = 0
        self.most = 0

    async def transcribe(
        self, pcm: bytes, sample_rate: int, prompt: str | None = None
    ) -> Transcript:
        assert prompt is not None
        self.started.append(prompt)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.gates.setdefault(prompt, asyncio.Event()).wait()
        finally:
            self.running -= 1
        return Transcript(prompt)

    def open(self, name: str) -> None:
        self.gates.setdefault(name, asyncio.Event()).set()


async def test_at_most_workers_decode_and_the_rest_wait_in_order() -> None:
    inner = GatedStt()
    stt = QueuedStt(inner, workers=2)
    names = ["a", "b", "c", "d", "e"]
    tasks = [asyncio.ensure_future(stt.transcribe(b"", 8000, n)) for n in names]
    await wait_for(lambda: inner.started == ["a", "b"], "two decoding", every=0.005)
    assert stt.backlog == 5 and stt.busy
    for name in names:
        inner.open(name)
    results = await asyncio.gather(*tasks)
    assert [r.text for r in results] == names
    assert inner.started == names and inner.most == 2
    assert stt.backlog == 0 and not stt.busy and stt.done == 5


async def test_a_turns_transcription_goes_before_early_ones() -> None:
    inner = GatedStt()
    stt = QueuedStt(inner, workers=1)
    first = asyncio.ensure_future(stt.transcribe(b"", 8000, "first"))
    await wait_for(lambda: inner.started == ["first"], "first decoding", every=0.005)
    early = asyncio.ensure_future(stt.transcribe_early(b"", 8000, "early"))
    turn = asyncio.ensure_future(stt.transcribe(b"", 8000, "turn"))
    await wait_for(lambda: stt.backlog == 3, "both queued", every=0.005)
    for name in ("first", "turn", "early"):
        inner.open(name)
    await asyncio.gather(first, early, turn)
    assert inner.started == ["first", "turn", "early"]


async def test_cancelled_requests_leave_the_queue_and_a_running_one_keeps_its_worker() -> None:
    inner = GatedStt()
    stt = QueuedStt(inner, workers=1)
    running = asyncio.ensure_future(stt.transcribe(b"", 8000, "running"))
    await wait_for(lambda: inner.started == ["running"], "decoding", every=0.005)
    waiting = asyncio.ensure_future(stt.transcribe(b"", 8000, "waiting"))
    later = asyncio.ensure_future(stt.transcribe(b"", 8000, "later"))
    await wait_for(lambda: stt.backlog == 3, "queued", every=0.005)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert stt.backlog == 2
    running.cancel()  # the caller gave up; the decode (a thread, in whisper) goes on
    with pytest.raises(asyncio.CancelledError):
        await running
    assert inner.started == ["running"] and stt.busy  # "later" waits for the worker
    inner.open("running")
    inner.open("later")
    assert (await later).text == "later"
    assert inner.started == ["running", "later"] and inner.most == 1
    assert stt.backlog == 0


async def test_whisper_threads_run_at_a_lower_priority_than_the_event_loop() -> None:
    """On a saturated machine the decodes yield the CPU to the loop (media, ARI, API)."""
    import os
    import threading

    from bridge.speech.whisper import _executor

    def nice_here() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    loop = asyncio.get_running_loop()
    mine = nice_here()
    decoding = await loop.run_in_executor(_executor(1, nice=10), nice_here)
    assert decoding == min(19, mine + 10)
    assert await loop.run_in_executor(_executor(1, nice=0), nice_here) == mine


async def test_an_early_transcription_that_became_the_turns_is_promoted() -> None:
    inner = GatedStt()
    stt = QueuedStt(inner, workers=1)
    first = asyncio.ensure_future(stt.transcribe(b"", 8000, "first"))
    await wait_for(lambda: inner.started == ["first"], "first decoding", every=0.005)
    other_early = asyncio.ensure_future(stt.transcribe_early(b"", 8000, "other early"))
    mine = asyncio.ensure_future(stt.transcribe_early(b"", 8000, "mine"))
    later_turn = asyncio.ensure_future(stt.transcribe(b"", 8000, "later turn"))
    await wait_for(lambda: stt.backlog == 4, "queued", every=0.005)
    stt.promote(mine)  # its turn ended: it goes before early ones, after earlier turns
    for name in ("first", "other early", "mine", "later turn"):
        inner.open(name)
    await asyncio.gather(first, other_early, mine, later_turn)
    assert inner.started == ["first", "mine", "later turn", "other early"]


async def test_a_turn_that_cannot_get_a_worker_within_budget_leaves_the_queue() -> None:
    """The time budget: the second turn waits behind a decode that never ends, and leaves
    with SttTimeout (the agent then asks the caller again) instead of waiting forever; the
    worker goes to the next one once it is free."""
    from bridge.speech.stt import SttTimeout

    inner = GatedStt()
    stt = QueuedStt(inner, workers=1, max_wait_s=0.05)
    first = asyncio.ensure_future(stt.transcribe(b"", 8000, "first"))
    await wait_for(lambda: inner.started == ["first"], "first decoding", every=0.005)
    with pytest.raises(SttTimeout, match="no STT worker free"):
        await stt.transcribe(b"", 8000, "second")
    assert stt.backlog == 1 and stt.over_budget == 1 and inner.started == ["first"]
    inner.open("first")
    inner.open("third")
    assert (await first).text == "first"
    assert (await stt.transcribe(b"", 8000, "third")).text == "third"
    stats = stt.stats()
    assert stats["done"] == 2 and stats["over_budget"] == 1 and stats["per_s"] is not None
