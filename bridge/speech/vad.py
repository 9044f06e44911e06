"""Voice activity detection and end-of-turn detection on call audio.

A `Vad` scores fixed windows of 16-bit PCM with a speech probability. Two engines:

- `SileroVad`: silero's ONNX model on onnxruntime (8 and 16 kHz, 32 ms windows, ~50 µs per
  window on one core). It tells speech from hiss and hum, which the telephone line is full of.
  The model file comes from the `silero-vad` wheel, read from disk without importing the
  package (its import needs torch): install it with `--no-deps`.
- `WebRtcVad`: `webrtcvad-wheels`, a few µs per 20 ms frame, no model file; but it flags
  steady noise as speech. The light fallback.

Both are cheap enough to run inline on the event loop: a thread hop would cost more than the
inference. One ONNX session is shared by all calls (onnxruntime's `run` is thread-safe); the
recurrent state lives in each `SileroVad`, so use one `SileroVad` per audio stream.

`TurnDetector` turns the probabilities into events: `SpeechStarted` once the caller has spoken
for `min_speech_ms` (the barge-in signal: a cough or a click is shorter), and `TurnEnded`
with the utterance audio after `silence_ms` of silence, or sooner when the words say the
caller is done (`end_now`, decided by `bridge.agent.early` from the early transcript; a
trailing "and" or "um" makes it wait longer instead: `hold`).
"""

from __future__ import annotations

import collections
import functools
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

SILERO_DIST = "silero-vad"
SILERO_FILE = "silero_vad/data/silero_vad.onnx"


class VadError(Exception):
    pass


class Vad(Protocol):
    name: str
    sample_rate: int
    window_samples: int

    def is_speech(self, window: bytes) -> float:
        """Speech probability in [0, 1] for exactly `window_samples` 16-bit samples."""
        ...

    def reset(self) -> None:
        """Forget the stream's history (a new call, or after our own playback)."""
        ...


def silero_model_path() -> Path:
    """Where the installed `silero-vad` wheel keeps its ONNX model (package not imported)."""
    try:
        dist = importlib.metadata.distribution(SILERO_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise VadError("silero-vad is not installed (pip install --no-deps silero-vad)") from exc
    path = Path(str(dist.locate_file(SILERO_FILE)))
    if not path.is_file():
        raise VadError(f"silero-vad is installed but {SILERO_FILE} is missing")
    return path


@functools.cache
def _silero_session(path: str) -> Any:
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    # One thread per inference: calls run in parallel, and a 32 ms window is too small to split.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return onnxruntime.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


class SileroVad:
    """Silero VAD v5+ (the 8k/16k ONNX model) with per-stream recurrent state and context."""

    name = "silero"

    def __init__(self, sample_rate: int = 8000, model_path: Path | None = None) -> None:
        if sample_rate not in (8000, 16000):
            raise VadError("silero VAD runs at 8000 or 16000 Hz")
        self.sample_rate = sample_rate
        self.window_samples = 256 if sample_rate == 8000 else 512
        self._context_samples = 32 if sample_rate == 8000 else 64
        self._session = _silero_session(str(model_path or silero_model_path()))
        self._sr = np.array(sample_rate, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, self._context_samples), dtype=np.float32)

    def is_speech(self, window: bytes) -> float:
        x = np.frombuffer(window, dtype="<i2").astype(np.float32) / 32768.0
        if len(x) != self.window_samples:
            raise VadError(f"silero wants {self.window_samples} samples, got {len(x)}")
        # The model expects each window preceded by the tail of the previous one.
        x = np.concatenate([self._context, x[np.newaxis, :]], axis=1)
        out, self._state = self._session.run(
            None, {"input": x, "state": self._state, "sr": self._sr}
        )
        self._context = x[:, -self._context_samples :]
        return float(out[0][0])


class WebRtcVad:
    """WebRTC's GMM VAD: tiny and fast, but steady noise counts as speech."""

    name = "webrtc"

    def __init__(self, sample_rate: int = 8000, aggressiveness: int = 3) -> None:
        import webrtcvad

        if sample_rate not in (8000, 16000, 32000, 48000):
            raise VadError("webrtc VAD runs at 8, 16, 32 or 48 kHz")
        self.sample_rate = sample_rate
        self.window_samples = sample_rate // 50  # 20 ms
        self._vad = webrtcvad.Vad(aggressiveness)

    def reset(self) -> None:
        pass  # stateless between frames as far as we are concerned

    def is_speech(self, window: bytes) -> float:
        return 1.0 if self._vad.is_speech(window, self.sample_rate) else 0.0


def make_vad(engine: str = "silero", sample_rate: int = 8000) -> Vad:
    """Build a VAD for one stream; "auto" prefers silero and falls back to webrtc."""
    if engine == "silero":
        return SileroVad(sample_rate)
    if engine == "webrtc":
        return WebRtcVad(sample_rate)
    if engine == "auto":
        try:
            return SileroVad(sample_rate)
        except (VadError, ImportError, OSError):
            return WebRtcVad(sample_rate)
    raise VadError(f"unknown VAD engine {engine!r} (silero, webrtc, auto)")


# --- turn detection --------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnConfig:
    threshold: float = 0.5  # a window at or above starts (or continues) speech
    neg_threshold: float = 0.35  # below this a window counts as silence (hysteresis)
    min_speech_ms: int = 200  # shorter bursts (clicks, coughs) are dropped, no barge-in
    silence_ms: int = 500  # this much silence after speech ends the turn
    preroll_ms: int = 200  # audio kept from before the onset, so STT hears the first phoneme
    trail_ms: int = 150  # silence kept after the last speech in the utterance
    max_turn_ms: int = 30000  # a turn this long is cut, so a noisy line cannot stall the call


@dataclass(frozen=True)
class SpeechStarted:
    """The caller has been speaking for `min_speech_ms`: stop talking over them."""

    at_ms: int  # stream time of the speech onset


@dataclass(frozen=True)
class TurnEnded:
    """The caller finished an utterance; `audio` is its PCM at the detector's rate."""

    audio: bytes
    speech_ms: int
    at_ms: int  # stream time at which the end was decided
    forced: bool = False  # cut at `max_turn_ms` rather than ended by silence
    by_transcript: bool = False  # ended before `silence_ms`: its transcript was complete


TurnEvent = SpeechStarted | TurnEnded


class TurnDetector:
    """Feed 20 ms frames (any size works), get turn events back. One per call leg."""

    def __init__(self, vad: Vad, config: TurnConfig | None = None) -> None:
        self.vad = vad
        self.config = config or TurnConfig()
        self.sample_rate = vad.sample_rate
        self._window_bytes = vad.window_samples * 2
        self._pending = b""
        self._t = 0  # samples scored so far
        self.last_probability = 0.0
        self.reset()

    def _ms(self, samples: int) -> int:
        return samples * 1000 // self.sample_rate

    def _samples(self, ms: int) -> int:
        return ms * self.sample_rate // 1000

    def reset(self) -> None:
        """Back to silence, dropping any partial utterance (VAD state is reset too)."""
        self.vad.reset()
        self._state = "silence"  # silence → onset → speech
        window = self.vad.window_samples
        preroll_windows = max(1, -(-self._samples(self.config.preroll_ms) // window))
        self._preroll: collections.deque[bytes] = collections.deque(maxlen=preroll_windows)
        self._utterance: list[bytes] = []
        self._onset_t = 0
        self._voiced = 0  # voiced samples in the current utterance
        self._silent_run = 0  # consecutive silent samples
        self._last_voiced_len = 0  # utterance length (windows) at the last voiced window
        self._extra_silence = 0  # samples more to wait for this utterance (`hold`)

    @property
    def in_speech(self) -> bool:
        return self._state == "speech"

    def feed(self, frame: bytes) -> list[TurnEvent]:
        events: list[TurnEvent] = []
        self._pending += frame
        w = self._window_bytes
        while len(self._pending) >= w:
            window, self._pending = self._pending[:w], self._pending[w:]
            event = self._step(window)
            if event is not None:
                events.append(event)
        return events

    def _step(self, window: bytes) -> TurnEvent | None:
        cfg = self.config
        n = self.vad.window_samples
        prob = self.vad.is_speech(window)
        self.last_probability = prob
        start_t, self._t = self._t, self._t + n
        if self._state == "silence":
            if prob >= cfg.threshold:
                self._state = "onset"
                self._onset_t = start_t
                self._utterance = [*self._preroll, window]
                self._preroll.clear()
                self._voiced, self._silent_run = n, 0
                self._last_voiced_len = len(self._utterance)
                return self._maybe_confirm()
            self._preroll.append(window)
            return None

        self._utterance.append(window)
        if prob >= cfg.neg_threshold:
            self._voiced += n
            self._silent_run = 0
            self._last_voiced_len = len(self._utterance)
        else:
            self._silent_run += n
        if self._state == "onset":
            if self._silent_run >= self._samples(min(cfg.silence_ms, cfg.min_speech_ms)):
                self._back_to_silence()  # a blip, not speech
                return None
            return self._maybe_confirm()
        if self._silent_run >= self._samples(cfg.silence_ms) + self._extra_silence:
            return self._end_turn(forced=False)
        if self._t - self._onset_t >= self._samples(cfg.max_turn_ms):
            return self._end_turn(forced=True)
        return None

    def _maybe_confirm(self) -> SpeechStarted | None:
        if self._voiced >= self._samples(self.config.min_speech_ms):
            self._state = "speech"
            return SpeechStarted(at_ms=self._ms(self._onset_t))
        return None

    @property
    def silent_ms(self) -> int:
        """How long the caller has been silent in the utterance under way (0 outside one)."""
        return self._ms(self._silent_run) if self._state == "speech" else 0

    def end_now(self) -> TurnEnded | None:
        """End the utterance under way now, before `silence_ms` (its transcript says the
        caller is done: `bridge.agent.early`). None if the caller is not in a pause of an
        utterance."""
        if self._state != "speech" or self._silent_run == 0:
            return None
        return self._end_turn(forced=False, by_transcript=True)

    def hold(self, ms: int) -> None:
        """Wait `ms` more silence than `silence_ms` before ending this utterance (the caller
        stopped on "and" or "um": more is coming)."""
        if self._state == "speech":
            self._extra_silence = max(self._extra_silence, self._samples(ms))

    def _end_turn(self, forced: bool, by_transcript: bool = False) -> TurnEnded:
        n = self.vad.window_samples
        keep = self._last_voiced_len + -(-self._samples(self.config.trail_ms) // n)
        audio = b"".join(self._utterance[:keep] if not forced else self._utterance)
        event = TurnEnded(
            audio=audio,
            speech_ms=self._ms(self._voiced),
            at_ms=self._ms(self._t),
            forced=forced,
            by_transcript=by_transcript,
        )
        self._back_to_silence()
        return event

    def _back_to_silence(self) -> None:
        self._state = "silence"
        self._utterance = []
        self._voiced = self._silent_run = 0
        self._extra_silence = 0
