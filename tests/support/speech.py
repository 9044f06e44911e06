"""Test audio made offline: synthetic utterances (flite / espeak-ng), silence, noise, G.711.

Utterances are cached per process, so a test session synthesises each phrase once.
"""

from __future__ import annotations

import functools
import io
import shutil
import subprocess
import wave

import numpy as np

from bridge.media import g711
from bridge.media.resample import resample


def _wav_pcm(data: bytes) -> tuple[bytes, int]:
    with wave.open(io.BytesIO(data)) as wav:
        return wav.readframes(wav.getnframes()), wav.getframerate()


@functools.cache
def utterance(text: str, rate: int = 8000, engine: str = "flite") -> bytes:
    """16-bit mono PCM of `text` spoken by flite (kal, 8 kHz) or espeak-ng, at `rate`."""
    if engine == "flite":
        argv = ["flite", "-voice", "kal", "-t", text, "-o", "/dev/stdout"]
    elif engine == "espeak-ng":
        argv = ["espeak-ng", "--stdout", "-v", "en-us", "-s", "160", text]
    else:
        raise ValueError(engine)
    if shutil.which(argv[0]) is None:
        raise RuntimeError(f"{argv[0]} is not installed (apt-get install {argv[0]})")
    out = subprocess.run(argv, check=True, capture_output=True, timeout=30).stdout
    pcm, native = _wav_pcm(out)
    return resample(pcm, native, rate)


def silence(ms: int, rate: int = 8000) -> bytes:
    return b"\x00\x00" * (rate * ms // 1000)


def noise(ms: int, rate: int = 8000, level: float = 0.02, seed: int = 1) -> bytes:
    """White noise (line hiss) at `level` of full scale RMS."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(rate * ms // 1000) * level * 32768
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


def mix(a: bytes, b: bytes) -> bytes:
    """Sum two PCM buffers (the shorter one padded with silence)."""
    x = np.frombuffer(a, "<i2").astype(np.int32)
    y = np.frombuffer(b, "<i2").astype(np.int32)
    n = max(len(x), len(y))
    x = np.pad(x, (0, n - len(x)))
    y = np.pad(y, (0, n - len(y)))
    return np.clip(x + y, -32768, 32767).astype("<i2").tobytes()


def through_ulaw(pcm: bytes) -> bytes:
    """What the caller's audio looks like after a G.711 µ-law phone line."""
    return g711.ulaw_decode(g711.ulaw_encode(pcm))


def frames(pcm: bytes, ms: int = 20, rate: int = 8000) -> list[bytes]:
    """Split PCM into `ms` frames as the media layer delivers them (last one padded)."""
    size = rate * ms // 1000 * 2
    if len(pcm) % size:
        pcm += b"\x00" * (size - len(pcm) % size)
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]
