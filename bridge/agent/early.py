"""Early transcription: start STT at a pause, before the turn detector is sure the turn ended.

The detector waits `silence_ms` (500) of silence before it ends a turn, so a caller who has
finished is not cut off at every breath. Whisper then needs ~0.3 s more. Started at the first
`pause_ms` (200) of silence instead, the transcript is usually ready when the turn ends, and
the caller hears the reply ~0.3 s sooner. If the caller speaks again, the early result is
thrown away (the decode still runs on the STT thread: a wasted ~0.3 s of one core, not of the
caller's time). With a paid cloud STT this costs an extra request per mid-sentence pause:
set `agent.early_stt_ms = 0` to turn it off.
"""

from __future__ import annotations

import asyncio
import collections

from bridge.speech.stt import SttProvider, Transcript
from bridge.speech.vad import SpeechStarted, TurnDetector, TurnEvent

SAMPLE_RATE = 8000


class EarlyTranscriber:
    """Watches the frames the detector scored; `take()` at TurnEnded gives the early STT."""

    def __init__(
        self, stt: SttProvider, prompt: str | None, detector: TurnDetector, pause_ms: int
    ) -> None:
        self.stt = stt
        self.prompt = prompt
        self.detector = detector
        self.pause_ms = pause_ms
        cfg = detector.config
        # Enough audio from before SpeechStarted: the onset (min_speech_ms) and the pre-roll.
        self._recent: collections.deque[bytes] = collections.deque(
            maxlen=(cfg.min_speech_ms + cfg.preroll_ms) // 20 + 4
        )
        self._utterance: list[bytes] = []
        self._quiet_ms = 0
        self._task: asyncio.Task[Transcript] | None = None

    def observe(self, frame: bytes, events: list[TurnEvent]) -> None:
        """Call after `detector.feed(frame)` returned `events`."""
        if self.pause_ms <= 0:
            return
        if any(isinstance(e, SpeechStarted) for e in events):
            self._discard()
            self._utterance = list(self._recent)
            self._quiet_ms = 0
        if self.detector.in_speech:
            self._utterance.append(frame)
            if self.detector.last_probability >= self.detector.config.neg_threshold:
                self._quiet_ms = 0
                self._discard()  # the caller goes on: the early text would be incomplete
            else:
                self._quiet_ms += len(frame) * 1000 // (2 * SAMPLE_RATE)
                if (
                    self._quiet_ms >= self.pause_ms
                    and self._task is None
                    and not getattr(self.stt, "busy", False)  # loaded: no speculative work
                ):
                    audio = b"".join(self._utterance)
                    transcribe = getattr(self.stt, "transcribe_early", self.stt.transcribe)
                    self._task = asyncio.get_running_loop().create_task(
                        transcribe(audio, SAMPLE_RATE, self.prompt)
                    )
        self._recent.append(frame)

    def take(self) -> asyncio.Task[Transcript] | None:
        """At TurnEnded: the transcription started at the pause (still valid: any speech
        since would have discarded it), or None. Resets for the next utterance."""
        task, self._task = self._task, None
        self._utterance = []
        self._quiet_ms = 0
        promote = getattr(self.stt, "promote", None)
        if task is not None and promote is not None:
            promote(task)  # the turn's own transcription now: no longer speculative
        return task

    def _discard(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            task.add_done_callback(_swallow)

    def reset(self) -> None:
        """Forget the utterance under way (the caller was not talking to us meanwhile)."""
        self._discard()
        self._recent.clear()
        self._utterance = []
        self._quiet_ms = 0

    def close(self) -> None:
        self._discard()


def _swallow(task: asyncio.Task[Transcript]) -> None:
    if not task.cancelled():
        task.exception()  # a failed early decode is not an error: the turn transcribes again
