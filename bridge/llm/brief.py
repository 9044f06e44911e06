"""The brief of a warm transfer made by the assistant's model (issue 9 §2): what the person
taking the call hears about the caller before the caller joins.

The model gets only the conversation's spoken words, rendered as a plain transcript inside
one user message, and an instruction of our own: never the assistant's system prompt, its
knowledge or its tool definitions, which are not the agent's to hear.
"""

from __future__ import annotations

from collections.abc import Sequence

from bridge.llm.base import ChatMessage

BRIEF_INSTRUCTION = (
    "You brief a colleague who is about to take over a phone call. From the transcript you "
    "are given, write one or two short sentences in the third person: who is calling and "
    "why, and any facts the caller gave (names, numbers, dates). Plain spoken English, no "
    "lists, no markup, nothing that is not in the transcript."
)
MAX_TURNS = 30  # the last turns of a long call are enough to say why the caller is here
MAX_BRIEF = 400  # characters: a brief longer than this is not brief


def brief_request(history: Sequence[ChatMessage]) -> list[ChatMessage] | None:
    """The messages that ask a model for the brief, or None when nobody said anything yet.
    Only the caller's and the assistant's words go in (no tool calls, no system text)."""
    lines = [
        f"{'Caller' if m.role == 'user' else 'Assistant'}: {m.content.strip()}"
        for m in history
        if m.role in ("user", "assistant") and m.content and m.content.strip()
    ][-MAX_TURNS:]
    if not lines:
        return None
    transcript = "\n".join(lines)
    return [
        ChatMessage.system(BRIEF_INSTRUCTION),
        ChatMessage.user(f"Transcript of the call so far:\n{transcript}\n\nThe brief:"),
    ]


def speakable_brief(text: str | None) -> str | None:
    """The model's brief as one line fit to speak, or None when there is nothing to say
    (empty, no words, markup only): the caller's transfer then uses the transcript brief."""
    line = " ".join((text or "").replace("*", " ").replace("#", " ").split())
    if sum(c.isalpha() for c in line) < 8:
        return None
    if len(line) > MAX_BRIEF:
        cut = line[:MAX_BRIEF].rsplit(" ", 1)[0]
        line = cut.rstrip(",;:") + "."
    return line
