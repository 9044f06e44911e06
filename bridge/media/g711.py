"""G.711 µ-law and A-law as numpy lookup tables (bit-exact with the ITU reference code).

Encoding indexes a 65,536-entry table by the 16-bit sample; decoding a 256-entry table.
`audioop` would do it but is deprecated and gone in Python 3.13.
"""

from __future__ import annotations

import numpy as np

_ULAW_BIAS = 0x84
_ULAW_CLIP14 = 8159


def _build_ulaw_encode() -> np.ndarray:
    # The 14-bit reference algorithm (G.191 / CPython audioop): arithmetic shift first.
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), _ULAW_CLIP14) + (_ULAW_BIAS >> 2)
    seg_ends = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
    seg = np.searchsorted(seg_ends, mag, side="left")
    uval = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0x0F))
    return ((uval ^ mask) & 0xFF).astype(np.uint8)


def _build_ulaw_decode() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    mag = (((mantissa << 3) + _ULAW_BIAS) << exponent) - _ULAW_BIAS
    return np.where(sign != 0, -mag, mag).astype(np.int16)


def _build_alaw_encode() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 3
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    mag = np.where(pcm >= 0, pcm, -pcm - 1)
    seg_ends = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
    seg = np.searchsorted(seg_ends, mag, side="left")
    low = np.where(seg < 2, (mag >> 1) & 0x0F, (mag >> np.maximum(seg, 1)) & 0x0F)
    aval = np.where(seg >= 8, 0x7F, (seg << 4) | low)
    return ((aval ^ mask) & 0xFF).astype(np.uint8)


def _build_alaw_decode() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, np.where(seg == 1, t + 0x108, (t + 0x108) << (seg - 1)))
    return np.where(a & 0x80, t, -t).astype(np.int16)


_ULAW_ENC = _build_ulaw_encode()
_ULAW_DEC = _build_ulaw_decode()
_ALAW_ENC = _build_alaw_encode()
_ALAW_DEC = _build_alaw_decode()


def _index(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.int32) + 32768


def ulaw_encode(pcm: bytes) -> bytes:
    """16-bit little-endian signed PCM → µ-law bytes."""
    return bytes(_ULAW_ENC[_index(pcm)].tobytes())


def ulaw_decode(data: bytes) -> bytes:
    return _ULAW_DEC[np.frombuffer(data, dtype=np.uint8)].astype("<i2").tobytes()


def alaw_encode(pcm: bytes) -> bytes:
    return bytes(_ALAW_ENC[_index(pcm)].tobytes())


def alaw_decode(data: bytes) -> bytes:
    return _ALAW_DEC[np.frombuffer(data, dtype=np.uint8)].astype("<i2").tobytes()
