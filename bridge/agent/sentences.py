"""Cut a streamed LLM reply into sentences, so speech starts before the reply is complete.

TTS per sentence is the unit that sounds natural (a phrase cut mid-sentence gets the wrong
intonation) and the first sentence of a reply is usually short, so the caller hears it while
the model is still writing the rest.
"""

from __future__ import annotations

import re

# A sentence ends at . ! ? (or a line break) followed by white space.
_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+|\n+")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st no nr vs etc e.g i.e approx dept tel ext inc ltd jr sr prof".split()
)


class SentenceSplitter:
    """Feed text deltas with `push`, get complete sentences back; `flush` returns the rest."""

    def __init__(self, min_chars: int = 2) -> None:
        self.min_chars = min_chars
        self._buffer = ""

    def push(self, text: str) -> list[str]:
        self._buffer += text
        out: list[str] = []
        start = 0
        for match in _END.finditer(self._buffer):
            candidate = self._buffer[start : match.end()].strip()
            if not candidate:
                start = match.end()
                continue
            last_word = candidate.rsplit(None, 1)[-1].rstrip(".").lower()
            if candidate.endswith(".") and last_word in _ABBREVIATIONS:
                continue  # "Dr. Smith": not the end of a sentence
            if len(candidate) < self.min_chars:
                continue
            out.append(candidate)
            start = match.end()
        self._buffer = self._buffer[start:]
        return out

    def flush(self) -> list[str]:
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if rest else []
