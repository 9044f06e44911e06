"""STT: offline Whisper on synthetic phone audio, and the OpenAI-protocol cloud provider."""

from __future__ import annotations

import io
import re
import wave
from collections.abc import AsyncIterator

import pytest

from bridge.speech.stt import OpenAiStt, SttError, SttTimeout, vocabulary_prompt
from bridge.speech.whisper import WhisperStt, collapse_repeats, whisper_model_dir
from tests.support.fake_openai import FakeOpenAI, Transcription
from tests.support.speech import silence, through_ulaw, utterance

PROMPT = "Sales team, technical support, billing department, invoice."


@pytest.fixture(scope="module")
def whisper() -> WhisperStt:
    return WhisperStt()


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_model_ships_in_the_wheel() -> None:
    path = whisper_model_dir()
    assert (path / "model.bin").stat().st_size > 50_000_000
    assert (path / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ("I would like to talk to billing about my invoice please.", {"invoice", "talk"}),
        (
            "Can you put me through to technical support, my router is broken.",
            {"technical", "support", "router", "broken"},
        ),
        ("Let me speak to a human.", {"speak", "human"}),
    ],
)
async def test_whisper_hears_key_words_through_8khz_ulaw(
    whisper: WhisperStt, phrase: str, expected: set[str]
) -> None:
    pcm = through_ulaw(utterance(phrase))  # 8 kHz, G.711 µ-law encode + decode
    transcript = await whisper.transcribe(pcm, 8000, prompt=PROMPT)
    assert expected <= words(transcript.text), transcript.text
    assert transcript.confidence is not None and transcript.confidence > 0.5


async def test_whisper_on_silence_says_nothing_much(whisper: WhisperStt) -> None:
    transcript = await whisper.transcribe(silence(1500), 8000)
    assert len(transcript.text.split()) <= 2
    assert transcript.no_speech_prob is not None


async def test_whisper_accepts_16khz(whisper: WhisperStt) -> None:
    transcript = await whisper.transcribe(utterance("Let me speak to a human.", 16000), 16000)
    assert {"speak", "human"} <= words(transcript.text)


async def test_short_turns_take_the_short_window_long_ones_the_standard_path(
    whisper: WhisperStt, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short utterance is decoded in the 10 s window; one longer than the window still
    goes through faster-whisper's 30 s path, and both are heard."""
    paths: list[str] = []
    short = whisper._transcribe_short

    def spy(audio: object, prompt: str | None, window: float) -> object:
        paths.append("short")
        return short(audio, prompt, window)  # type: ignore[arg-type]

    monkeypatch.setattr(whisper, "_transcribe_short", spy)
    phrase = "Can you put me through to technical support, my router is broken."
    heard = await whisper.transcribe(through_ulaw(utterance(phrase)), 8000, prompt=PROMPT)
    assert paths == ["short"] and {"support", "router"} <= words(heard.text)
    long = utterance(phrase) + silence(4000) + utterance("Let me speak to a human.")
    assert len(long) / 2 / 8000 > (whisper.short_window_s or 0) - 2
    heard = await whisper.transcribe(long, 8000, prompt=PROMPT)
    assert paths == ["short"] and {"router", "human"} <= words(heard.text), heard.text


def test_a_sentence_said_again_into_the_padding_is_dropped() -> None:
    assert collapse_repeats("Yes? Yes? Yes?") == "Yes?"
    assert collapse_repeats("Goodbye. Goodbye.") == "Goodbye."
    assert collapse_repeats("Sales. Billing, please.") == "Sales. Billing, please."
    assert collapse_repeats("I want sales. No, sales. Thanks") == "I want sales. No, sales. Thanks"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


async def test_cloud_stt_uploads_a_wav_with_prompt(fake: FakeOpenAI) -> None:
    fake.transcription_replies.append(Transcription(text=" I need billing. "))
    stt = OpenAiStt(base_url=fake.base_url, api_key="test-key", model="whisper-large")
    pcm = utterance("billing please")
    transcript = await stt.transcribe(pcm, 8000, prompt=PROMPT)
    await stt.aclose()
    assert transcript.text == "I need billing."
    sent = fake.transcriptions[0]
    assert sent["model"] == "whisper-large" and sent["prompt"] == PROMPT
    assert sent["language"] == "en" and sent["response_format"] == "json"
    assert sent["file"]["filename"] == "utterance.wav"
    assert sent["file"]["content_type"] == "audio/wav"
    with wave.open(io.BytesIO(sent["file"]["data"])) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (8000, 1, 2)
        assert wav.readframes(wav.getnframes()) == pcm


async def test_cloud_stt_errors_are_typed(fake: FakeOpenAI) -> None:
    bad_key = OpenAiStt(base_url=fake.base_url, api_key="nope")
    with pytest.raises(SttError) as err:
        await bad_key.transcribe(silence(100), 8000)
    assert err.value.status == 401
    await bad_key.aclose()

    fake.transcription_replies.append(Transcription(delay=1.0))
    slow = OpenAiStt(base_url=fake.base_url, api_key="test-key", timeout=0.2)
    with pytest.raises(SttTimeout):
        await slow.transcribe(silence(100), 8000)
    await slow.aclose()

    fake.transcription_replies.append(Transcription(status=500))
    broken = OpenAiStt(base_url=fake.base_url, api_key="test-key")
    with pytest.raises(SttError, match="500"):
        await broken.transcribe(silence(100), 8000)
    await broken.aclose()


def test_vocabulary_prompt_from_descriptions() -> None:
    prompt = vocabulary_prompt(
        [
            "Sales team - for pricing and quotes",
            "Technical support - for product issues",
            "Billing department: invoices",
            "Sales team - again",
        ]
    )
    assert prompt == "Sales team, Technical support, Billing department."
    assert vocabulary_prompt([]) is None
    assert len(vocabulary_prompt([f"Team {i}" for i in range(100)]) or "") <= 200
