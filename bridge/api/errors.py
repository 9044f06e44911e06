"""Errors of the HTTP layer itself, and the one table from `error_id` to HTTP status.

Domain errors (`bridge.errors`) carry no status; this is the only place that decides one.
Every error response has the same shape:
`{"error": {"code": error_id, "message": ..., "field"?: dotted.path, "details"?: ...}}`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bridge.errors import BridgeError


class InvalidJson(BridgeError):
    error_id = "invalid-json"


class InvalidBody(BridgeError):
    """Well-formed JSON, but not an object."""

    error_id = "invalid-body"


class Unauthorized(BridgeError):
    """No bearer key was sent."""

    error_id = "unauthorized"


class InvalidApiKey(Unauthorized):
    """A bearer key was sent but is unknown or revoked (RFC 6750 `invalid_token`)."""


class MethodNotAllowed(BridgeError):
    error_id = "method-not-allowed"


class PayloadTooLarge(BridgeError):
    error_id = "payload-too-large"


class UnsupportedMediaType(BridgeError):
    error_id = "unsupported-media-type"


STATUS_BY_ERROR_ID: dict[str, int] = {
    "invalid-json": 400,
    "invalid-body": 400,
    "unauthorized": 401,
    # The destination is well-formed but policy forbids it (not one of the assistant's
    # destinations, not routable): a refusal, not a malformed request.
    "destination-not-allowed": 403,
    "not-found": 404,
    "method-not-allowed": 405,
    "conflict": 409,
    "payload-too-large": 413,
    "unsupported-media-type": 415,
    "invalid-input": 422,
    "internal-error": 500,
    # The PBX answered but refused the command: an upstream failure, not ours nor the client's.
    "pbx-command-failed": 502,
    "pbx-unavailable": 503,
}

# aiohttp's own exceptions (unknown route, wrong method, body over client_max_size).
ERROR_ID_BY_STATUS: dict[int, str] = {
    400: "invalid-body",
    404: "not-found",
    405: "method-not-allowed",
    413: "payload-too-large",
    415: "unsupported-media-type",
}


def status_for(error: BridgeError) -> int:
    return STATUS_BY_ERROR_ID.get(error.error_id, 500)


def error_body(error: BridgeError) -> dict[str, Any]:
    """The JSON body for an error. `details` is the list of every failing field for
    invalid-input from validation, else the error's extra facts (e.g. the numbers that use a
    trunk), when there are any."""
    info: dict[str, Any] = {"code": error.error_id, "message": error.message}
    if error.field:
        info["field"] = error.field
    details = dict(error.details)
    errors = details.pop("errors", None)
    if isinstance(errors, list):
        info["details"] = errors
    elif details:
        info["details"] = details
    return {"error": info}


def error_response(error: BridgeError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(error), status=status_for(error), headers=headers)
