"""Operators' routes (issue 10): GET /metrics, the /ui page, transfer analytics.

`install_ops` adds what lives outside /api/v1 (the scrape endpoint and the page's files) and
the request counter; `ops_routes` are the /api/v1 routes (in the route table, hence in the
OpenAPI document).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from bridge.api.errors import InvalidApiKey, Unauthorized
from bridge.api.http import DB, query, respond
from bridge.api.keys import verify_api_key
from bridge.api.middleware import PUBLIC_PATHS, REQUEST_OBSERVER
from bridge.ops.analytics import transfer_analytics
from bridge.ops.metrics import CONTENT_TYPE_LATEST, Metrics
from bridge.ops.webhooks import WebhookService

if TYPE_CHECKING:
    from bridge.api.routes import Route

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
UI_FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
}


@dataclass
class OpsContext:
    metrics: Metrics | None
    webhooks: WebhookService | None
    metrics_token: str | None = None
    metrics_allow_loopback: bool = False
    trunk_states: Callable[[], Awaitable[dict[str, Any]]] | None = None


OPS = web.AppKey("ops", OpsContext)


# --- /metrics --------------------------------------------------------------------------------


# Set by a reverse proxy: the peer is the proxy, not the client (a proxy on the same host
# would otherwise make every outside scraper look like a loopback one).
_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP", "X-Forwarded-Host")


def _loopback_address(value: str) -> bool:
    if value.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(value.strip("[]")).is_loopback
    except ValueError:
        return False


def _loopback(request: web.Request) -> bool:
    """A loopback peer that is not a proxy relaying someone else, asking for a loopback
    Host: a web page whose name was rebound to 127.0.0.1 (DNS rebinding) sends its own name
    as Host, and must not read the metrics through the visitor's browser."""
    if any(h in request.headers for h in _PROXY_HEADERS):
        return False
    host = request.headers.get("Host", "")
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or "]:" in host else host
    return _loopback_address(request.remote or "") and _loopback_address(name)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format. Any API key, the scrape-only token, or (if allowed) a loopback
    peer without a key."""
    ops = request.app[OPS]
    if ops.metrics is None:
        raise web.HTTPNotFound()
    if not (ops.metrics_allow_loopback and _loopback(request)):
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("an API key or the metrics token is required")
        token = ops.metrics_token
        by_token = token is not None and hmac.compare_digest(key.encode(), token.encode())
        if not by_token and not await verify_api_key(request.app[DB], key):
            raise InvalidApiKey("the key is neither an API key nor the metrics token")
    body = ops.metrics.exposition()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


# --- /ui -------------------------------------------------------------------------------------


async def ui_file(request: web.Request) -> web.StreamResponse:
    """The page and its two files (no build step; the page asks for the key and keeps it in
    sessionStorage; every data request is the API's, with that key as bearer)."""
    name = request.match_info.get("name") or "index.html"
    if name not in UI_FILES:
        raise web.HTTPNotFound()
    return web.Response(
        body=(UI_DIR / name).read_bytes(),
        content_type=UI_FILES[name],
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:;"
            " style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
        },
    )


async def ui_redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


def install_ops(app: web.Application, ops: OpsContext) -> None:
    """Add /metrics, /ui and the request counter to the API application."""
    app[OPS] = ops
    if ops.metrics is not None:
        app[REQUEST_OBSERVER] = ops.metrics.api_request
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ui", ui_redirect)
    app.router.add_get("/ui/", ui_file)
    app.router.add_get("/ui/{name}", ui_file)
    public = {"/metrics", "/ui", "/ui/", *(f"/ui/{n}" for n in UI_FILES)}
    app[PUBLIC_PATHS] = app[PUBLIC_PATHS] | frozenset(public)


# --- analytics -------------------------------------------------------------------------------

_ISO = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}")


# With no `since`, the analytics cover the 30 days up to `until` (or now), as the ops page
# does: each request reads every transfer in its range, so "all time" must be asked for.
DEFAULT_ANALYTICS_RANGE = timedelta(days=30)


class AnalyticsQuery(BaseModel):
    """Query of GET /analytics/transfers: a time range (ISO 8601; default the last 30 days),
    and optionally one assistant."""

    model_config = ConfigDict(extra="forbid")

    since: datetime | None = None
    until: datetime | None = None
    assistant_id: str | None = None

    @field_validator("since", "until", mode="before")
    @classmethod
    def _iso_8601(cls, value: Any) -> Any:
        if isinstance(value, str) and not _ISO.match(value):
            raise ValueError("must be an ISO 8601 date-time such as 2026-01-31T00:00:00Z")
        return value

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        # Stored times are UTC; a time without an offset is taken as UTC.
        if value is None:
            return None
        try:
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        except OverflowError:  # 0001-01-01T00:00:00+05:00 is before year 1 in UTC
            raise ValueError("is out of range") from None

    @field_validator("until")
    @classmethod
    def _after_since(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        since = info.data.get("since")
        if value is not None and since is not None and value <= since:
            raise ValueError("must be later than since")
        return value


class TransferAnalytics(BaseModel):
    """Per assistant (`assistants`) and per destination (`destinations`): `transfers`
    (settled), `in_progress`, `outcomes` (outcome -> count), `answer_rate`,
    `median_ring_seconds` (leg placed -> answered or failed), and `reasons`: the newest
    transfers with the caller's last utterances before each (`caller_said`). Assistants also
    have `calls` and `transfer_rate` (share of their calls bridged to a human)."""

    model_config = ConfigDict(extra="allow")

    since: str | None
    until: str | None
    assistants: list[dict[str, Any]]
    destinations: list[dict[str, Any]]


async def analytics(request: web.Request) -> web.Response:
    q: AnalyticsQuery = query(request, AnalyticsQuery)
    since = q.since or (q.until or datetime.now(UTC)) - DEFAULT_ANALYTICS_RANGE
    return respond(await transfer_analytics(request.app[DB], since, q.until, q.assistant_id))


class TrunkStates(BaseModel):
    """Each trunk (as GET /sip-trunks) with `pbx_state`: `provisioned` (its objects exist on
    the PBX now), `missing` (the reconciler is bringing it back) or `unknown` (PBX down)."""

    model_config = ConfigDict(extra="allow")

    pbx_connected: bool
    error: str | None
    data: list[dict[str, Any]]


async def trunks(request: web.Request) -> web.Response:
    source = request.app[OPS].trunk_states
    if source is None:
        raise web.HTTPNotFound()
    return respond(await source())


def ops_routes() -> list[Route]:
    from bridge.api.routes import Route

    return [
        Route("GET", "/analytics/transfers", analytics, "transfer_analytics",
              "Transfer analytics per assistant and destination, with callers' reasons",
              "ops", response=TransferAnalytics, query=AnalyticsQuery),
        Route("GET", "/ops/trunks", trunks, "trunk_states",
              "Trunks with their state on the PBX (provisioned, missing, unknown)", "ops",
              response=TrunkStates),
    ]  # fmt: skip
