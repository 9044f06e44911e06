"""/api/v1/webhooks: subscriptions (URL, events, write-only secret) and their delivery log."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from bridge.api.http import json_object, query, respond
from bridge.directory.service import validate
from bridge.errors import InvalidInput, NotFound
from bridge.ops.webhooks import WEBHOOK_EVENTS, WebhookService

if TYPE_CHECKING:
    from bridge.api.routes import Route

EventName = Literal[
    "*",
    "call.started",
    "call.ended",
    "transfer.requested",
    "transfer.completed",
    "transfer.failed",
    "transfer.cancelled",
    "transfer.handed_off",
    "assistant.tool_called",
    "transfer.returned",  # hand back (issue 9 §5)
    "transfer.attempts_ended",
]
assert set(EventName.__args__) == {"*", *WEBHOOK_EVENTS}  # type: ignore[attr-defined]


def _check_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    try:
        parts.port  # noqa: B018 - raises on a port out of range or not a number
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None
    if parts.port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials (the signature authenticates us)")
    return value


class WebhookIn(BaseModel):
    """A subscription. `secret` signs every delivery; it is write-only: give one (16+
    characters) or get a generated one in the creation response, once."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2000)
    events: list[EventName] = Field(min_length=1)
    secret: str | None = Field(None, min_length=16, max_length=200)
    description: str | None = Field(None, max_length=200)
    enabled: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value)


class WebhookPatch(BaseModel):
    """Change a subscription (JSON merge patch; `secret` replaces the secret)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, max_length=2000)
    events: list[EventName] | None = Field(None, min_length=1)
    secret: str | None = Field(None, min_length=16, max_length=200)
    description: str | None = Field(None, max_length=200)
    enabled: bool | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return value if value is None else _check_url(value)


class WebhookOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    url: str
    events: list[str]
    description: str | None
    enabled: bool
    created_at: str
    updated_at: str
    secret: str | None = Field(
        None, description="Only in the creation response, and only when generated"
    )


class DeliveriesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["pending", "delivered", "failed"] | None = None
    limit: int = Field(100, ge=1, le=500)


class DeliveryOut(BaseModel):
    """One event for one webhook: its status, attempts and their log (newest 20), the body."""

    model_config = ConfigDict(extra="allow")

    id: str
    webhook_id: str
    event_id: str
    event: str
    status: str
    attempts: int
    log: list[dict[str, Any]]
    payload: dict[str, Any]


WEBHOOKS = web.AppKey("webhooks", WebhookService)


def _service(request: web.Request) -> WebhookService:
    service = request.app.get(WEBHOOKS)
    if service is None:
        raise NotFound("webhooks are disabled ([webhooks] enabled = false)")
    return service


async def create(request: web.Request) -> web.Response:
    body = validate(WebhookIn, await json_object(request))
    hook, generated = await _service(request).create(
        body.url, list(body.events), body.secret, body.description, body.enabled
    )
    data = hook.public_dict()
    if generated is not None:
        data["secret"] = generated
    return respond(data, status=201, headers={"Location": f"{request.path}/{hook.id}"})


async def list_all(request: web.Request) -> web.Response:
    return respond({"data": [h.public_dict() for h in await _service(request).list_all()]})


async def get_one(request: web.Request) -> web.Response:
    return respond((await _service(request).get(request.match_info["id"])).public_dict())


async def patch(request: web.Request) -> web.Response:
    raw = await json_object(request)
    for key in ("url", "events", "secret", "enabled"):
        if key in raw and raw[key] is None:
            raise InvalidInput(f"{key}: cannot be removed (null); give a value", field=key)
    # The validated values, not the raw ones: {"enabled": "false"} is False, not a truthy string.
    changes = validate(WebhookPatch, raw).model_dump(exclude_unset=True)
    hook = await _service(request).update(request.match_info["id"], changes)
    return respond(hook.public_dict())


async def delete(request: web.Request) -> web.Response:
    await _service(request).delete(request.match_info["id"])
    return web.Response(status=204)


async def deliveries(request: web.Request) -> web.Response:
    q: DeliveriesQuery = query(request, DeliveriesQuery)
    rows = await _service(request).deliveries(request.match_info["id"], q.status, q.limit)
    return respond({"data": rows})


async def retry(request: web.Request) -> web.Response:
    row = await _service(request).retry(request.match_info["id"], request.match_info["delivery_id"])
    return respond(row, status=202)


def webhook_routes() -> list[Route]:
    from bridge.api.routes import Route

    one = "/webhooks/{id}"
    common: dict[str, Any] = {"tag": "webhooks"}
    return [
        Route("POST", "/webhooks", create, "create_webhook", "Subscribe a URL to call events",
              status=201, request=WebhookIn, response=WebhookOut, **common),
        Route("GET", "/webhooks", list_all, "list_webhooks", "List webhooks",
              response=WebhookOut, many=True, **common),
        Route("GET", one, get_one, "get_webhook", "Get a webhook", response=WebhookOut,
              **common),
        Route("PATCH", one, patch, "update_webhook", "Update a webhook (JSON merge patch)",
              request=WebhookPatch, response=WebhookOut, **common),
        Route("DELETE", one, delete, "delete_webhook", "Delete a webhook and its log",
              status=204, **common),
        Route("GET", f"{one}/deliveries", deliveries, "list_webhook_deliveries",
              "The delivery log of a webhook, newest first", response=DeliveryOut, many=True,
              query=DeliveriesQuery, **common),
        Route("POST", f"{one}/deliveries/{{delivery_id}}/retry", retry,
              "retry_webhook_delivery", "Send an undelivered event again now",
              status=202, response=DeliveryOut, **common),
    ]  # fmt: skip
