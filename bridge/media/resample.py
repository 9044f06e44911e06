"""Resampling of 16-bit mono PCM between rates, with soxr.

Two tools, because calls need two different things:

- `resample()`: one-shot, soxr's high quality, for whole buffers (a TTS sentence, an utterance
  going to STT). Latency does not matter there; quality does.
- `StreamResampler`: frame by frame (20 ms in, about 20 ms out) for live media. soxr's own
  `ResampleStream` holds back 20-90 ms of audio at every quality except QQ (measured on soxr
  1.1: LQ 60 ms, HQ 66 ms, VHQ 92 ms at 16k→8k), and QQ is a plain cubic interpolator with no
  anti-alias filter (a 6 kHz tone resampled 16k→8k comes out at full strength as 2 kHz). So the
  stream uses QQ for the rate change and wraps it in a short linear-phase FIR low-pass of our
  own: before QQ when going down, after it when going up. Measured: about 5 ms of delay, alias
  and image rejection better than 50 dB. See docs/speech-notes.md.
"""

from __future__ import annotations

import numpy as np
import soxr

_STOPBAND_DB = 60.0


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    """16-bit little-endian PCM → float32 in [-1, 1), the form models want."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """float in [-1, 1] → 16-bit little-endian PCM, clipped rather than wrapped."""
    scaled = np.clip(np.round(samples * 32768.0), -32768, 32767)
    return scaled.astype("<i2").tobytes()


def resample(pcm: bytes, from_rate: int, to_rate: int, quality: str = "HQ") -> bytes:
    """Resample a whole 16-bit mono buffer (soxr one-shot)."""
    if from_rate == to_rate or not pcm:
        return pcm
    samples = np.frombuffer(pcm, dtype="<i2")
    out = soxr.resample(samples, from_rate, to_rate, quality=quality)
    return np.asarray(out, dtype="<i2").tobytes()


def resample_float(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample float32 samples (one-shot), e.g. 8 kHz call audio → 16 kHz for Whisper."""
    if from_rate == to_rate:
        return samples.astype(np.float32, copy=False)
    out = soxr.resample(samples.astype(np.float32, copy=False), from_rate, to_rate, quality="HQ")
    return np.asarray(out, dtype=np.float32)


def lowpass_taps(cutoff_hz: float, rate: int, transition_hz: float) -> np.ndarray:
    """Kaiser-windowed sinc low-pass (linear phase, unit DC gain)."""
    width = transition_hz / (rate / 2)
    beta = 0.1102 * (_STOPBAND_DB - 8.7)
    ntaps = int(np.ceil((_STOPBAND_DB - 7.95) / (2.285 * np.pi * width))) + 1
    ntaps |= 1  # odd: integer-sample group delay
    n = np.arange(ntaps) - (ntaps - 1) / 2
    taps = 2 * cutoff_hz / rate * np.sinc(2 * cutoff_hz / rate * n) * np.kaiser(ntaps, beta)
    return np.asarray(taps / taps.sum(), dtype=np.float32)


class _StreamFir:
    """A FIR filter applied chunk by chunk, carrying the history between chunks."""

    def __init__(self, taps: np.ndarray) -> None:
        self.taps = taps
        self.history = np.zeros(len(taps) - 1, dtype=np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if not len(x):
            return x
        buf = np.concatenate([self.history, x])
        self.history = buf[len(buf) - len(self.history) :]
        return np.convolve(buf, self.taps, mode="valid").astype(np.float32)

    @property
    def delay_samples(self) -> int:
        return (len(self.taps) - 1) // 2


class StreamResampler:
    """Frame-by-frame resampler for live audio with a few milliseconds of delay.

    One instance per direction per call: it keeps filter state between frames.
    """

    def __init__(self, from_rate: int, to_rate: int) -> None:
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._pre: _StreamFir | None = None
        self._post: _StreamFir | None = None
        self._soxr: soxr.ResampleStream | None = None
        if from_rate == to_rate:
            return
        nyquist = min(from_rate, to_rate) / 2
        # Pass up to 90 % of the lower Nyquist (3.6 kHz at 8 kHz: all of the telephone band),
        # stop from 100 %.
        cutoff, transition = nyquist * 0.95, nyquist * 0.1
        if to_rate < from_rate:
            self._pre = _StreamFir(lowpass_taps(cutoff, from_rate, transition))
        else:
            self._post = _StreamFir(lowpass_taps(cutoff, to_rate, transition))
        self._soxr = soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32", quality="QQ")

    @property
    def delay_ms(self) -> float:
        """Group delay of the filters (QQ itself adds well under 1 ms)."""
        if self._pre is not None:
            return 1000 * self._pre.delay_samples / self.from_rate
        if self._post is not None:
            return 1000 * self._post.delay_samples / self.to_rate
        return 0.0

    def process(self, pcm: bytes, last: bool = False) -> bytes:
        """Resample one chunk; `last=True` drains what the resampler still holds."""
        if self._soxr is None:
            return pcm
        x = pcm16_to_float(pcm)
        if self._pre is not None:
            x = self._pre(x)
        y = self._soxr.resample_chunk(x, last=last)
        if self._post is not None:
            y = self._post(y)
        return float_to_pcm16(y)
