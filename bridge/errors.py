"""Domain errors: a stable kebab-case `error_id`, a message for people, optional details.

They carry no HTTP status: the API maps `error_id`s to statuses in one table.
"""

from __future__ import annotations

from typing import Any


class BridgeError(Exception):
    error_id = "internal-error"

    def __init__(self, message: str, *, field: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details


class NotFound(BridgeError):
    error_id = "not-found"


class Conflict(BridgeError):
    """The request is valid but the object's state forbids it (e.g. control on an ended call)."""

    error_id = "conflict"


class InvalidInput(BridgeError):
    error_id = "invalid-input"


class DestinationNotAllowed(BridgeError):
    error_id = "destination-not-allowed"


class PbxUnavailable(BridgeError):
    """The PBX connection is down; the command could not be sent."""

    error_id = "pbx-unavailable"


class PbxCommandFailed(BridgeError):
    """The PBX refused a command (wrong state, bad argument)."""

    error_id = "pbx-command-failed"


class UnsafeDialString(PbxCommandFailed, ValueError):
    """An adapter refused to send a dial string it built: it holds characters the PBX would
    interpret (`&`, `,`, `(`, `$`, whitespace...) or is not one of the shapes it builds. A local
    refusal (our policy, not the destination): nothing was sent to the PBX."""

    local = True
