"""Speech-to-text behind one small interface, and a cloud provider for OpenAI's protocol.

`SttProvider.transcribe(pcm, sample_rate, prompt)` takes a whole utterance (the turn detector
cuts them) as 16-bit mono PCM and returns a `Transcript`. `prompt` biases recognition toward
words the call expects, such as the destination names ("invoice", "billing"): with Whisper it
fixed "end voice" → "invoice" on phone audio.

Offline default: `WhisperStt` in `bridge.speech.whisper` (faster-whisper, tiny.en shipped in a
PyPI package). Cloud: `OpenAiStt`, the `/v1/audio/transcriptions` multipart protocol that
OpenAI, Groq, faster-whisper-server / speaches, LocalAI and vLLM serve.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import io
import itertools
import re
import time
import wave
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp


class SttError(Exception):
    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SttTimeout(SttError):
    pass


@dataclass(frozen=True)
class Transcript:
    text: str
    # Mean token probability (0..1) when the engine reports it, else None.
    confidence: float | None = None
    # Whisper's probability that there was no speech at all.
    no_speech_prob: float | None = None


class SttProvider(Protocol):
    name: str

    async def transcribe(
        self, pcm: bytes, sample_rate: int, prompt: str | None = None
    ) -> Transcript: ...


class QueuedStt:
    """At most `workers` transcriptions at once; the others wait in a queue the caller does
    not notice (their turn ends while earlier ones decode). A turn's transcription goes before
    early (speculative) ones, and early ones are not started while every worker is busy.

    `backlog` (decoding + waiting) is what admission control bounds. A request cancelled while
    it waits leaves the queue; one cancelled while it decodes keeps its worker until the
    decode is over (a thread cannot be stopped), so the bound is never exceeded.

    Time budget: a request that has waited `max_wait_s` for a worker leaves the queue with
    `SttTimeout` (the caller is asked to say it again rather than left in silence for longer;
    the agent speaks a holding phrase long before that). `stats()` gives utterances per
    second and the wait distribution (logged as `stt.stats` when the daemon stops)."""

    def __init__(self, inner: SttProvider, workers: int, max_wait_s: float | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.workers = max(1, workers)
        self.max_wait_s = max_wait_s
        self._running = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiting_tasks: dict[asyncio.Task[Any], tuple[int, int, asyncio.Future[None]]] = {}
        self._seq = itertools.count()
        self.max_wait_ms = 0.0
        self.done = 0
        self.over_budget = 0
        self._waits: collections.deque[float] = collections.deque(maxlen=20000)  # turns, ms
        self._decodes: collections.deque[float] = collections.deque(maxlen=20000)  # ms
        self._first_done: float | None = None
        self._last_done = 0.0

    @property
    def backlog(self) -> int:
        return self._running + len(self._waiters)

    @property
    def busy(self) -> bool:
        """Every worker is taken: new work would wait."""
        return self._running >= self.workers

    async def transcribe(
        self, pcm: bytes, sample_rate: int, prompt: str | None = None
    ) -> Transcript:
        return await self._submit(0, pcm, sample_rate, prompt)

    async def transcribe_early(
        self, pcm: bytes, sample_rate: int, prompt: str | None = None
    ) -> Transcript:
        return await self._submit(1, pcm, sample_rate, prompt)

    def promote(self, task: asyncio.Task[Any]) -> None:
        """An early transcription became the turn's (the turn ended): if it still waits, it
        now goes before other early ones, in its place among the turns."""
        entry = self._waiting_tasks.get(task)
        if entry is None or entry[0] == 0 or entry not in self._waiters:
            return
        self._waiters.remove(entry)
        promoted = (0, entry[1], entry[2])
        self._waiters.append(promoted)
        heapq.heapify(self._waiters)
        self._waiting_tasks[task] = promoted

    async def warm_up(self) -> None:
        warm = getattr(self.inner, "warm_up", None)
        if warm is not None:
            await warm()

    async def aclose(self) -> None:
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()

    def stats(self) -> dict[str, Any]:
        """Utterances decoded, per second (first to last), turns' waits for a worker, decode
        times, and how many requests left the queue over budget."""
        waits = sorted(self._waits)
        decodes = sorted(self._decodes)

        def pct(values: list[float], p: float) -> float:
            return round(values[min(len(values) - 1, int(p * len(values)))], 1) if values else 0.0

        span = self._last_done - self._first_done if self._first_done is not None else 0.0
        return {
            "done": self.done,
            "per_s": round((self.done - 1) / span, 2) if span > 0 else None,
            "wait_p50_ms": pct(waits, 0.5),
            "wait_p95_ms": pct(waits, 0.95),
            "wait_max_ms": round(self.max_wait_ms, 1),
            "decode_p50_ms": pct(decodes, 0.5),
            "decode_p95_ms": pct(decodes, 0.95),
            "over_budget": self.over_budget,
        }

    async def _submit(
        self, priority: int, pcm: bytes, sample_rate: int, prompt: str | None
    ) -> Transcript:
        queued = time.monotonic()
        try:
            async with asyncio.timeout(self.max_wait_s):
                await self._acquire(priority)
        except TimeoutError:
            self.over_budget += 1
            raise SttTimeout(
                f"no STT worker free within {self.max_wait_s:g} s ({self.backlog} in the queue)"
            ) from None
        started = time.monotonic()
        wait_ms = (started - queued) * 1000
        self.max_wait_ms = max(self.max_wait_ms, wait_ms)
        if priority == 0:
            self._waits.append(wait_ms)
        work = asyncio.ensure_future(self.inner.transcribe(pcm, sample_rate, prompt))
        work.add_done_callback(self._finished)
        work.add_done_callback(lambda _: self._decodes.append((time.monotonic() - started) * 1000))
        return await asyncio.shield(work)

    async def _acquire(self, priority: int) -> None:
        if self._running < self.workers and not self._waiters:
            self._running += 1
            return
        turn = asyncio.get_running_loop().create_future()
        entry = (priority, next(self._seq), turn)
        heapq.heappush(self._waiters, entry)
        me = asyncio.current_task()
        if me is not None:
            self._waiting_tasks[me] = entry
        try:
            await turn
        except asyncio.CancelledError:
            entry = self._waiting_tasks.get(me, entry) if me is not None else entry
            if turn.done() and not turn.cancelled():
                self._release()  # granted just as we were cancelled: pass it on
            elif entry in self._waiters:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise
        finally:
            if me is not None:
                self._waiting_tasks.pop(me, None)

    def _finished(self, work: asyncio.Future[Any]) -> None:
        if not work.cancelled():
            work.exception()  # retrieved: a cancelled caller's failure is not an error
        self.done += 1
        self._last_done = time.monotonic()
        if self._first_done is None:
            self._first_done = self._last_done
        self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, turn = heapq.heappop(self._waiters)
            if not turn.done():
                turn.set_result(None)  # the worker goes to the next in line
                return
        self._running -= 1


def vocabulary_prompt(descriptions: Iterable[str], max_chars: int = 200) -> str | None:
    """A recognition prompt from destination descriptions: their heads, comma-separated
    ("Sales team, Technical support, Billing department."). Whisper reads the prompt as
    preceding text, so a short list of the words the caller is likely to say is what helps."""
    heads: list[str] = []
    for description in descriptions:
        head = re.split(r"\s+[-–—]\s+|[:;,(]", description, maxsplit=1)[0].strip()
        if head and head not in heads:
            heads.append(head)
    prompt = ""
    for head in heads:
        candidate = f"{prompt}, {head}" if prompt else head
        if len(candidate) + 1 > max_chars:
            break
        prompt = candidate
    return prompt + "." if prompt else None


def pcm_to_wav(pcm: bytes, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm)
    return buf.getvalue()


class OpenAiStt:
    """Cloud STT over the OpenAI-compatible `{base_url}/audio/transcriptions` endpoint.

    Sends the utterance as a WAV at its own rate (8 kHz phone audio is accepted as is).
    """

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None = None,
        model: str = "whisper-1",
        language: str | None = "en",
        timeout: float = 15.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/audio/transcriptions"
        self.api_key = api_key
        self.model = model
        self.language = language
        self.timeout = timeout
        self._session = session
        self._own_session = session is None

    async def aclose(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def transcribe(
        self, pcm: bytes, sample_rate: int, prompt: str | None = None
    ) -> Transcript:
        form = aiohttp.FormData()
        form.add_field(
            "file", pcm_to_wav(pcm, sample_rate), filename="utterance.wav", content_type="audio/wav"
        )
        form.add_field("model", self.model)
        form.add_field("response_format", "json")
        if self.language:
            form.add_field("language", self.language)
        if prompt:
            form.add_field("prompt", prompt)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        try:
            async with asyncio.timeout(self.timeout):
                async with self._session.post(self.url, data=form, headers=headers) as resp:
                    if resp.status != 200:
                        body = await resp.text(errors="replace")
                        message = f"transcription failed ({resp.status}): {body[:300]}"
                        raise SttError(message, status=resp.status)
                    data = await resp.json(content_type=None)
        except TimeoutError:
            raise SttTimeout(f"no transcript from {self.url} within {self.timeout} s") from None
        except aiohttp.ClientError as exc:
            raise SttError(f"cannot reach {self.url}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise SttError(f"unexpected transcription response: {str(data)[:200]}")
        return Transcript(data["text"].strip())
