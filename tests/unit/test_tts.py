"""TTS engines: each speaks a sentence that Whisper can read back after a µ-law phone line."""

from __future__ import annotations

import importlib.util
import re

import pytest

from bridge.speech.tts import EspeakTts, FliteTts, PiperTts, TtsError, make_tts
from bridge.speech.whisper import WhisperStt
from tests.support.speech import through_ulaw

SENTENCE = "I am transferring you to technical support."
needs_piper = pytest.mark.skipif(
    importlib.util.find_spec("piper") is None, reason="piper-tts (GPL-3, optional) not installed"
)


@pytest.fixture(scope="module")
def whisper() -> WhisperStt:
    return WhisperStt()


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


@pytest.mark.parametrize(
    "engine",
    ["flite", "espeak-ng", pytest.param("piper", marks=needs_piper)],
)
async def test_engine_speaks_intelligibly_at_8khz(engine: str, whisper: WhisperStt) -> None:
    tts = make_tts(engine)
    pcm = await tts.synthesize(SENTENCE)
    assert tts.sample_rate == 8000
    seconds = len(pcm) / 2 / 8000
    assert 1.5 < seconds < 5.0
    heard = await whisper.transcribe(through_ulaw(pcm), 8000)
    assert {"technical", "support"} <= words(heard.text), heard.text


async def test_espeak_native_rate_and_leading_dash() -> None:
    tts = EspeakTts(sample_rate=None)
    pcm = await tts.synthesize("-v is not an option here")
    assert tts.sample_rate == 22050 and len(pcm) > 22050


@needs_piper
async def test_piper_native_rate_and_shared_voice() -> None:
    a, b = PiperTts(sample_rate=None), PiperTts(sample_rate=None)
    await a.warm_up()
    assert a.sample_rate == 22050
    assert a._voice() is b._voice()  # one model per process
    assert len(await b.synthesize("Hello.")) > 0.3 * 22050 * 2


def test_make_tts() -> None:
    assert isinstance(make_tts("flite"), FliteTts)
    assert isinstance(make_tts("espeak"), EspeakTts)
    assert isinstance(make_tts("piper", sample_rate=16000), PiperTts)
    with pytest.raises(TtsError, match="unknown TTS engine"):
        make_tts("festival")
