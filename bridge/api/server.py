"""`create_api_app`: the aiohttp application of the control API, wired from the route table."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from aiohttp import web

from bridge.agent.chat import ChatConsole
from bridge.api.chat import CHAT
from bridge.api.http import CALLS, DB, DIRECTORY, HEALTH, MAX_BODY, OPENAPI
from bridge.api.middleware import (
    PUBLIC_PATHS,
    auth_middleware,
    error_middleware,
    metrics_middleware,
)
from bridge.api.openapi import build_openapi
from bridge.api.ops import OpsContext, install_ops
from bridge.api.ports import CallControl, HealthProbe
from bridge.api.routes import ROUTES
from bridge.api.webhooks import WEBHOOKS
from bridge.directory.service import DirectoryService
from bridge.store.db import Database

MAX_BODY_BYTES = 1 << 20  # 1 MiB: an assistant with a long prompt is a few kB


def _version() -> str:
    try:
        return version("callbridge")
    except PackageNotFoundError:
        return "0.0.0"


def create_api_app(
    directory: DirectoryService,
    calls: CallControl,
    db: Database,
    *,
    health: HealthProbe | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    chat: ChatConsole | None = None,
    ops: OpsContext | None = None,
) -> web.Application:
    """The API under `/api/v1`. `db` is only used to check API keys; `health` adds facts
    (e.g. the PBX connection) to GET /api/v1/health."""
    app = web.Application(
        client_max_size=max_body_bytes,
        middlewares=[metrics_middleware, error_middleware, auth_middleware],
    )
    app[DIRECTORY] = directory
    app[CALLS] = calls
    app[DB] = db
    app[HEALTH] = health
    app[CHAT] = chat  # the text test console (None: agent disabled, chat answers 409)
    app[MAX_BODY] = max_body_bytes
    app[PUBLIC_PATHS] = frozenset(r.full_path for r in ROUTES if r.public)
    app[OPENAPI] = build_openapi(ROUTES, version=_version())
    for route in ROUTES:
        app.router.add_route(route.method, route.full_path, route.handler)
    if ops is not None:  # issue 10: /metrics, /ui, webhooks (bridge.api.ops, .webhooks)
        install_ops(app, ops)
        if ops.webhooks is not None:
            app[WEBHOOKS] = ops.webhooks
    return app
