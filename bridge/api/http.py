"""Thin handlers: parse the request, validate it with a model, call a service, return a dict.

Nothing here decides anything about assistants, trunks or calls; errors raised below are
rendered by the error middleware.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from enum import Enum
from functools import partial
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter

from bridge.api.errors import InvalidBody, InvalidJson, PayloadTooLarge, UnsupportedMediaType
from bridge.api.ports import CallControl, HealthProbe
from bridge.api.schemas import (
    CallsQuery,
    ControlRequest,
    DestinationTestRequest,
    TransferStatsQuery,
)
from bridge.calls.model import ControlCommand
from bridge.directory.service import DirectoryService, validate
from bridge.store.db import Database

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DIRECTORY = web.AppKey("directory", DirectoryService)
CALLS = web.AppKey("calls", CallControl)
DB = web.AppKey("db", Database)
HEALTH: web.AppKey[HealthProbe | None] = web.AppKey("health")
MAX_BODY = web.AppKey("max_body", int)
OPENAPI = web.AppKey("openapi", dict)

# application/merge-patch+json is what RFC 7396 names for PATCH; plain JSON works as well.
JSON_TYPES = frozenset({"application/json", "application/merge-patch+json"})


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


_dumps = partial(json.dumps, default=_default)


def respond(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; 415, 413, 400 otherwise."""
    if request.content_type not in JSON_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.content_type}"
        )
    limit = request.app[MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes", limit=limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes", limit=limit) from None
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: ~1,000 levels of `[[[[…` (a 2 KB body) exhaust the parser's stack.
        if isinstance(exc, RecursionError):
            raise InvalidJson(f"request body is nested deeper than {MAX_DEPTH} levels") from None
        raise InvalidJson(f"request body is not valid JSON: {exc}") from None
    if _too_deep(data):
        raise InvalidJson(f"request body is nested deeper than {MAX_DEPTH} levels")
    if not isinstance(data, dict):
        raise InvalidBody("request body must be a JSON object")
    return data


# The deepest document any request model has is ~6 levels (assistant → llm_config → tools →
# destinations → …); the merge patch and the validators recurse, so a deep body must stop
# here, not in a RecursionError (a 500).
MAX_DEPTH = 32


def _too_deep(data: Any) -> bool:
    """Whether `data` nests lists/objects deeper than MAX_DEPTH (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if not isinstance(node, list):
            continue
        if depth > MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in node)
    return False


def query(request: web.Request, model: type[BaseModel]) -> Any:
    """Query parameters validated by `model` (a repeated parameter keeps its last value)."""
    return validate(model, {key: request.query.getall(key)[-1] for key in request.query})


# --- directory: one set of handlers for the three collections ---------------------------------


def collection_handlers(
    model_in: type[BaseModel],
    create: Callable[[DirectoryService, Any], Awaitable[Any]],
    get: Callable[[DirectoryService, str], Awaitable[Any]],
    list_all: Callable[[DirectoryService], Awaitable[list[Any]]],
    patch: Callable[[DirectoryService, str, dict[str, Any]], Awaitable[Any]],
    delete: Callable[[DirectoryService, str], Awaitable[None]],
) -> dict[str, Handler]:
    """create/list/get/patch/delete handlers for one collection of the directory."""

    async def create_handler(request: web.Request) -> web.Response:
        data = validate(model_in, await json_object(request))
        obj = await create(request.app[DIRECTORY], data)
        location = f"{request.path.rstrip('/')}/{obj.id}"
        return respond(obj.public_dict(), status=201, headers={"Location": location})

    async def list_handler(request: web.Request) -> web.Response:
        objs = await list_all(request.app[DIRECTORY])
        return respond({"data": [o.public_dict() for o in objs]})

    async def get_handler(request: web.Request) -> web.Response:
        obj = await get(request.app[DIRECTORY], request.match_info["id"])
        return respond(obj.public_dict())

    async def patch_handler(request: web.Request) -> web.Response:
        body = await json_object(request)
        obj = await patch(request.app[DIRECTORY], request.match_info["id"], body)
        return respond(obj.public_dict())

    async def delete_handler(request: web.Request) -> web.Response:
        await delete(request.app[DIRECTORY], request.match_info["id"])
        return web.Response(status=204)

    return {
        "create": create_handler,
        "list": list_handler,
        "get": get_handler,
        "patch": patch_handler,
        "delete": delete_handler,
    }


# --- calls ------------------------------------------------------------------------------------


async def list_calls(request: web.Request) -> web.Response:
    q: CallsQuery = query(request, CallsQuery)
    calls = await request.app[CALLS].list_calls(q.status, q.limit)
    return respond({"data": calls})


async def get_call(request: web.Request) -> web.Response:
    return respond(await request.app[CALLS].get_call(request.match_info["id"]))


_CONTROL_COMMAND: TypeAdapter[ControlCommand] = TypeAdapter(ControlCommand)


async def control_call(request: web.Request) -> web.Response:
    body = await json_object(request)
    validate(ControlRequest, body)  # the API's stricter rules, with their 422s
    command = validate(_CONTROL_COMMAND, body)  # the call domain's own command
    accepted = await request.app[CALLS].control(request.match_info["id"], command)
    return respond(accepted, status=202)


async def test_destination(request: web.Request) -> web.Response:
    body = validate(DestinationTestRequest, await json_object(request))
    result = await request.app[CALLS].test_destination(
        body.destination, body.number_id, body.ring_timeout
    )
    return respond(result)


async def transfer_stats(request: web.Request) -> web.Response:
    q: TransferStatsQuery = query(request, TransferStatsQuery)
    return respond(await request.app[CALLS].transfer_stats(q.since))


# --- service ----------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    """The HTTP side is up; the probe adds what it knows (e.g. the PBX connection)."""
    body: dict[str, Any] = {"status": "ok"}
    probe = request.app[HEALTH]
    if probe is not None:
        extra = probe()
        extra = await extra if inspect.isawaitable(extra) else extra
        body.update({k: v for k, v in extra.items() if k != "status"})
    return respond(body)


async def openapi(request: web.Request) -> web.Response:
    return respond(request.app[OPENAPI])
