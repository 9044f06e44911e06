"""Early transcription: start STT at a pause, before the turn detector is sure the turn ended.

The detector waits `silence_ms` (500) of silence before it ends a turn, so a caller who has
finished is not cut off at every breath. Started at the first `pause_ms` (120) of silence
instead, the transcript is usually ready before the turn ends. If the caller speaks again,
the early result is thrown away (the decode still runs on the STT thread: ~0.2 s of one core
wasted, not the caller's time; under load no early decode starts while every worker is busy).
With a paid cloud STT this costs an extra request per mid-sentence pause: set
`agent.early_stt_ms = 0` to turn it off (the turn then always waits `silence_ms`).

The early transcript also decides the end of the turn (`agent.end_turn_on_transcript`): when
it is a complete sentence ("What are your opening hours?"), the turn ends as soon as it is in,
without waiting for the rest of `silence_ms`; when it stops on a word that announces more
("and", "um", "because", "to"), the detector waits `hold_ms` longer than `silence_ms` before
it ends the turn. Anything else (no punctuation, nothing heard) keeps the silence rule.
"""

from __future__ import annotations

import asyncio
import collections
import re

from bridge.speech.stt import SttProvider, Transcript
from bridge.speech.vad import SpeechStarted, TurnDetector, TurnEvent

SAMPLE_RATE = 8000
# A turn whose last word is one of these is not over ("I'd like to talk to ... um").
# Not words a question can end on ("Where is your office?", "Where are you from?").
TRAILING = frozenset(
    "and or but because cause um uh er erm hmm mm the a an to of for with about my your our "
    "if than".split()
)


def turn_complete(text: str) -> bool | None:
    """What a transcript says about the end of the turn: True (a complete sentence), False
    (it stops on a word that announces more, or trails off with "..."), None (no opinion:
    nothing heard, or no closing punctuation)."""
    text = text.strip()
    words = re.findall(r"[a-z']+", text.lower())
    if not words:
        return None
    if words[-1] in TRAILING or text.endswith(("...", "…", ",", "-")):
        return False
    if text.endswith((".", "?", "!")):
        return True
    return None


class EarlyTranscriber:
    """Watches the frames the detector scored; `take()` at TurnEnded gives the early STT."""

    def __init__(
        self,
        stt: SttProvider,
        prompt: str | None,
        detector: TurnDetector,
        pause_ms: int,
        *,
        end_on_transcript: bool = False,
        hold_ms: int = 500,
    ) -> None:
        self.stt = stt
        self.prompt = prompt
        self.detector = detector
        self.pause_ms = pause_ms
        self.end_on_transcript = end_on_transcript
        self.hold_ms = hold_ms
        self._judged: asyncio.Task[Transcript] | None = None
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

    def turn_over(self) -> bool:
        """Call after `observe`: True when the early transcript is in and is a complete
        sentence, the caller still silent (the agent then ends the turn: `detector.end_now`).
        A transcript that stops on "and"/"um" makes the detector wait longer, once."""
        task = self._task
        if (
            not self.end_on_transcript
            or task is None
            or not task.done()
            or task is self._judged
            or not self.detector.in_speech
        ):
            return False
        self._judged = task
        if task.cancelled() or task.exception() is not None:
            return False
        verdict = turn_complete(task.result().text)
        if verdict is False:
            self.detector.hold(self.hold_ms)
        return verdict is True

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
