"""What a call session needs from the conversation (the assistant's voice pipeline).

The session owns the call and its media; the conversation listens to the caller's audio and
speaks through `session.say`. It changes the call only by commands through the session's
queue (`await session.command(..., source="assistant")`), so its decisions take the same path,
checks and records as the control API's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bridge.calls.session import CallSession
    from bridge.calls.transfer import Transfer


class Conversation(Protocol):
    async def start(self, *, resumed: bool) -> None:
        """The caller's media is attached: greet (or, after a restart, carry on)."""
        ...

    def on_audio(self, pcm: bytes) -> None:
        """20 ms of the caller's audio, 8 kHz 16-bit PCM. Called on the event loop: be quick."""
        ...

    def on_transfer_started(self) -> None:
        """A transfer was accepted (control API or the assistant): cancel the turn under way
        (LLM stream, sentences not yet spoken, queued interruptible audio) and stop reacting
        to the caller's audio until `on_transfer_result`. Called by `start_transfer` when it
        accepts the transfer."""
        ...

    def on_transfer_result(self, transfer: Transfer) -> None:
        """A transfer reached its final state (typed outcome in `transfer`). For a failed
        transfer, call it only once the call is back ACTIVE with media attached: the
        conversation listens again from then on, and gives the model the typed outcome."""
        ...

    async def close(self) -> None: ...

    # Optional (looked up with getattr, as a conversation without a model has none):
    # `async def brief_summary(self) -> str | None`, a warm transfer's brief written by the
    # assistant's model from the conversation (issue 9 §2).


ConversationFactory = Callable[["CallSession"], "Conversation | None"]
