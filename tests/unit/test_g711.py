"""G.711 tables against the reference (CPython's audioop where it still exists)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from bridge.media import g711

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    audioop = pytest.importorskip("audioop")

ALL_PCM = np.arange(-32768, 32768, dtype="<i2").tobytes()
ALL_CODES = bytes(range(256))


def test_ulaw_bit_exact() -> None:
    assert g711.ulaw_encode(ALL_PCM) == audioop.lin2ulaw(ALL_PCM, 2)
    assert g711.ulaw_decode(ALL_CODES) == audioop.ulaw2lin(ALL_CODES, 2)


def test_alaw_bit_exact() -> None:
    assert g711.alaw_encode(ALL_PCM) == audioop.lin2alaw(ALL_PCM, 2)
    assert g711.alaw_decode(ALL_CODES) == audioop.alaw2lin(ALL_CODES, 2)


def test_round_trip_error_is_small() -> None:
    t = np.arange(8000) / 8000
    pcm = (np.sin(2 * np.pi * 440 * t) * 12000).astype("<i2")
    back = np.frombuffer(g711.ulaw_decode(g711.ulaw_encode(pcm.tobytes())), dtype="<i2")
    assert np.max(np.abs(back.astype(int) - pcm.astype(int))) < 12000 * 0.04
