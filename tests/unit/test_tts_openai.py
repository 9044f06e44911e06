"""The cloud TTS provider against a local server speaking OpenAI's /audio/speech protocol."""

from __future__ import annotations

import io
import wave
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from bridge.speech.tts import OpenAiTts, TtsError


def wav_24k(seconds: float = 0.5) -> bytes:
    t = np.arange(int(24000 * seconds)) / 24000
    pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(pcm)
    return out.getvalue()


@pytest.fixture
async def speech_server() -> Any:
    seen: list[dict[str, Any]] = []

    async def speech(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append({"auth": request.headers.get("Authorization"), **body})
        if body["input"] == "fail":
            return web.json_response({"error": {"message": "quota"}}, status=429)
        if body["input"] == "garbage":
            return web.Response(body=b"not a wav")
        return web.Response(body=wav_24k(), content_type="audio/wav")

    app = web.Application()
    app.router.add_post("/v1/audio/speech", speech)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/v1", seen
    await runner.cleanup()


async def test_synthesizes_and_resamples_to_the_call_rate(speech_server: Any) -> None:
    url, seen = speech_server
    tts = OpenAiTts(base_url=url, api_key="sk-test", voice="nova")
    pcm = await tts.synthesize("Hello there.")
    assert len(pcm) == 2 * 4000  # 0.5 s at 8 kHz
    assert seen == [
        {
            "auth": "Bearer sk-test",
            "model": "tts-1",
            "input": "Hello there.",
            "voice": "nova",
            "response_format": "wav",
        }
    ]
    with pytest.raises(TtsError, match="429"):
        await tts.synthesize("fail")
    with pytest.raises(TtsError, match="WAV"):
        await tts.synthesize("garbage")
    await tts.aclose()


async def test_unreachable_server_is_a_tts_error() -> None:
    tts = OpenAiTts(base_url="http://127.0.0.1:9/v1", timeout=2)
    with pytest.raises(TtsError, match="cannot reach"):
        await tts.synthesize("Hello")
    await tts.aclose()
