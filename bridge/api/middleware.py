"""Two middlewares: errors → JSON (outermost), then bearer-key authentication.

Every failure leaves as `{"error": {...}}` with the status from `errors.STATUS_BY_ERROR_ID`,
including aiohttp's own 404/405/413. Unexpected exceptions are logged with their trace and
answered with a bare `internal-error`: no trace reaches the client.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from bridge.api.errors import (
    ERROR_ID_BY_STATUS,
    InvalidApiKey,
    Unauthorized,
    error_response,
    status_for,
)
from bridge.api.http import DB, Handler
from bridge.api.keys import verify_api_key
from bridge.errors import BridgeError
from bridge.log import get_logger

log = get_logger(__name__)

PUBLIC_PATHS = web.AppKey("public_paths", frozenset)
# Counts every request by route template, method and final status (bridge.ops.metrics).
REQUEST_OBSERVER: web.AppKey[Callable[[str, str, int], None]] = web.AppKey("request_observer")
_REALM = 'Bearer realm="callbridge"'


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: sees the status the client gets (errors already rendered below)."""
    observe = request.app.get(REQUEST_OBSERVER)
    if observe is None:
        return await handler(request)
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # redirects pass through the error middleware
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        observe(route, request.method, status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BridgeError as exc:
        return _render(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = BridgeError(_http_message(request, exc))
        error.error_id = ERROR_ID_BY_STATUS.get(exc.status, "internal-error")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _render(request, error, headers)
    except Exception:
        log.exception("api.unexpected_error", method=request.method, path=request.path)
        return error_response(BridgeError("internal error"))


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no such route: {request.path}"
    if exc.status == 405:
        return f"method {request.method} is not allowed on {request.path}"
    return exc.reason


def _render(
    request: web.Request, error: BridgeError, headers: dict[str, str] | None = None
) -> web.Response:
    status = status_for(error)
    if isinstance(error, Unauthorized):
        invalid = isinstance(error, InvalidApiKey)
        headers = {"WWW-Authenticate": _REALM + (', error="invalid_token"' if invalid else "")}
    if status >= 500:
        log.warning(
            "api.error",
            code=error.error_id,
            status=status,
            method=request.method,
            path=request.path,
            message=error.message,
        )
    else:
        log.debug("api.error", code=error.error_id, status=status, path=request.path)
    return error_response(error, headers)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route needs `Authorization: Bearer <key>`, except the public ones (health,
    openapi.json)."""
    if request.path not in request.app[PUBLIC_PATHS]:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("an API key is required: Authorization: Bearer <key>")
        if not await verify_api_key(request.app[DB], key):
            raise InvalidApiKey("the API key is invalid or revoked")
    return await handler(request)
