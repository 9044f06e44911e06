"""What the HTTP API needs from the rest of the daemon, as Protocols.

The API never imports the call service: `app.py` passes an object that has these methods, and
unit tests pass a small fake. Errors are domain errors from `bridge.errors`; the API maps their
`error_id` to a status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

from bridge.calls.model import CallStatus, ControlCommand


class CallControl(Protocol):
    """The calls part of the API: read calls, send them commands."""

    async def list_calls(self, status: CallStatus | None, limit: int) -> list[dict[str, Any]]:
        """Newest first, at most `limit`, each a call's public dict."""
        ...

    async def get_call(self, call_id: str) -> dict[str, Any]:
        """A call's public dict with `events` and `transfers` lists; raises NotFound."""
        ...

    async def test_destination(
        self, destination: str, number_id: str | None, ring_timeout: float
    ) -> dict[str, Any]:
        """A test call by the route a transfer would take; the typed outcome."""
        ...

    async def transfer_stats(self, since: datetime | None) -> dict[str, Any]:
        """Transfer monitoring: counts and rates by outcome, source and destination."""
        ...

    async def control(self, call_id: str, command: ControlCommand) -> dict[str, Any]:
        """Start a command (it runs asynchronously) and say what was accepted, e.g.
        `{"id": call_id, "accepted": "transfer", "transfer_id": "..."}`.

        Raises NotFound, Conflict (ended call), InvalidInput, DestinationNotAllowed,
        PbxUnavailable.
        """
        ...


# Extra facts for GET /health, e.g. `{"pbx": "connected"}`; sync or async.
HealthProbe = Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]]
