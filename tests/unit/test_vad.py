"""VAD and turn detection on real synthesized speech, silence and noise (8 kHz, 20 ms frames)."""

from __future__ import annotations

import sys

import pytest

from bridge.speech.vad import (
    SileroVad,
    SpeechStarted,
    TurnConfig,
    TurnDetector,
    TurnEnded,
    VadError,
    WebRtcVad,
    make_vad,
    silero_model_path,
)
from tests.support.speech import frames, mix, noise, silence, through_ulaw, utterance

PHRASE = "I would like to talk to billing about my invoice please."
ONSET_MS = 220  # flite starts this phrase after 220 ms of its own silence


def run(detector: TurnDetector, pcm: bytes) -> list[SpeechStarted | TurnEnded]:
    events: list[SpeechStarted | TurnEnded] = []
    for frame in frames(pcm):
        events += detector.feed(frame)
    return events


@pytest.fixture(scope="module")
def speech() -> bytes:
    return through_ulaw(utterance(PHRASE))


def test_model_is_read_from_the_wheel_without_importing_it() -> None:
    path = silero_model_path()
    assert path.name == "silero_vad.onnx" and path.stat().st_size > 1_000_000
    SileroVad()
    assert "silero_vad" not in sys.modules  # its import would need torch


@pytest.mark.parametrize("engine", ["silero", "webrtc"])
def test_silence_and_quiet_hiss_give_no_events(engine: str) -> None:
    pcm = silence(1000) + noise(2000, level=0.01) + silence(500)
    assert run(TurnDetector(make_vad(engine)), pcm) == []


def test_silero_ignores_loud_hiss_that_webrtc_calls_speech() -> None:
    hiss = noise(3000, level=0.1)
    assert run(TurnDetector(SileroVad()), hiss) == []
    assert any(isinstance(e, SpeechStarted) for e in run(TurnDetector(WebRtcVad()), hiss))


@pytest.mark.parametrize("engine", ["silero", "webrtc"])
def test_one_utterance_gives_start_then_end(engine: str, speech: bytes) -> None:
    config = TurnConfig(min_speech_ms=200, silence_ms=500)
    events = run(TurnDetector(make_vad(engine), config), silence(500) + speech + silence(1000))
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded]
    start, end = events
    assert isinstance(start, SpeechStarted) and isinstance(end, TurnEnded)
    assert abs(start.at_ms - (500 + ONSET_MS)) <= 60
    assert not end.forced
    assert 2500 <= end.speech_ms <= 3100
    # The utterance keeps a little audio before and after the speech, not the whole second.
    duration_ms = len(end.audio) * 1000 // 16000
    assert 2800 <= duration_ms <= 3000 + 200 + 150 + 100
    # The end is decided `silence_ms` after the speech stopped (+ the model's ~100 ms tail).
    speech_end_ms = 500 + 3030
    assert speech_end_ms + 500 <= end.at_ms <= speech_end_ms + 500 + 200


def test_speech_in_line_noise_is_still_found(speech: bytes) -> None:
    pcm = mix(silence(500) + speech + silence(1000), noise(5000, level=0.01))
    events = run(TurnDetector(SileroVad()), pcm)
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded]


def test_short_pause_keeps_one_turn_long_pause_splits(speech: bytes) -> None:
    config = TurnConfig(silence_ms=600)
    one = run(TurnDetector(SileroVad(), config), speech + silence(300) + speech + silence(900))
    assert [type(e) for e in one] == [SpeechStarted, TurnEnded]
    two = run(TurnDetector(SileroVad(), config), speech + silence(1200) + speech + silence(900))
    assert [type(e) for e in two] == [SpeechStarted, TurnEnded, SpeechStarted, TurnEnded]


def test_click_shorter_than_min_speech_is_no_barge_in(speech: bytes) -> None:
    click = speech[ONSET_MS * 16 : (ONSET_MS + 100) * 16]  # 100 ms of real speech
    config = TurnConfig(min_speech_ms=250)
    assert run(TurnDetector(SileroVad(), config), silence(500) + click + silence(1000)) == []


def test_barge_in_fires_within_min_speech_of_onset(speech: bytes) -> None:
    detector = TurnDetector(SileroVad(), TurnConfig(min_speech_ms=200))
    elapsed = 0
    for frame in frames(silence(400) + speech):
        elapsed += 20
        if any(isinstance(e, SpeechStarted) for e in detector.feed(frame)):
            break
    else:
        pytest.fail("no SpeechStarted")
    assert elapsed - (400 + ONSET_MS) <= 200 + 100  # min speech + at most ~3 windows


def test_long_speech_is_cut_at_max_turn(speech: bytes) -> None:
    config = TurnConfig(max_turn_ms=1500)
    events = run(TurnDetector(SileroVad(), config), speech + silence(800))
    ended = [e for e in events if isinstance(e, TurnEnded)]
    assert ended and ended[0].forced


def test_state_is_per_stream(speech: bytes) -> None:
    # Two interleaved streams score exactly as each would alone.
    a, b = SileroVad(), SileroVad()
    alone = SileroVad()
    wins = [speech[i : i + 512] for i in range(0, 40 * 512, 512)]
    quiet = noise(40 * 32, level=0.02)
    probs_alone = [alone.is_speech(w) for w in wins]
    probs_a = []
    for i, w in enumerate(wins):
        probs_a.append(a.is_speech(w))
        b.is_speech(quiet[i * 512 : (i + 1) * 512])
    assert probs_a == pytest.approx(probs_alone, abs=1e-6)
    assert max(probs_alone) > 0.9


def test_sixteen_khz_and_bad_window() -> None:
    vad = SileroVad(16000)
    assert vad.window_samples == 512
    pcm16 = utterance(PHRASE, rate=16000)
    events = run_16k(TurnDetector(vad), silence(300, 16000) + pcm16 + silence(800, 16000))
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded]
    with pytest.raises(VadError):
        vad.is_speech(b"\x00" * 100)
    with pytest.raises(VadError):
        SileroVad(44100)


def run_16k(detector: TurnDetector, pcm: bytes) -> list[SpeechStarted | TurnEnded]:
    events: list[SpeechStarted | TurnEnded] = []
    for frame in frames(pcm, rate=16000):
        events += detector.feed(frame)
    return events
