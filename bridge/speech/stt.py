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
import io
import re
import wave
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

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
