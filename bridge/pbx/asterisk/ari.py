"""A thin ARI client on aiohttp: REST requests with typed errors, and the events websocket
with reconnect and backoff.

Why our own: the published clients freeze the loop, lack reconnects or die on one transport
error (../shared/FIELD-NOTES.md). This one knows nothing of calls; the adapter does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from bridge import timing
from bridge.log import get_logger

log = get_logger(__name__)
SLOW_EVENT_MS = 50.0  # an event handled slower than this is logged (ari.slow_event)


class AriError(Exception):
    """ARI answered with an error status."""

    def __init__(self, status: int, message: str, method: str, path: str) -> None:
        super().__init__(f"ARI {method} {path} -> {status}: {message}")
        self.status = status
        self.message = message


class AriNotFound(AriError):
    """404: the channel, bridge or playback no longer exists."""


class AriConflict(AriError):
    """409/422: the object is in the wrong state (e.g. channel not in Stasis)."""


class AriUnavailable(Exception):
    """Asterisk could not be reached (refused, timed out, websocket down)."""


EventHandler = Callable[[dict[str, Any]], Awaitable[None]]
ConnectHandler = Callable[[], Awaitable[None]]


class AriClient:
    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        app: str,
        *,
        request_timeout: float = 10.0,
        reconnect_initial_delay: float = 0.5,
        reconnect_max_delay: float = 15.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.app = app
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}"}
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._initial_delay = reconnect_initial_delay
        self._max_delay = reconnect_max_delay
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._closing = False
        self.connected = asyncio.Event()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Any:
        """Call `/ari{path}`; return the decoded JSON (or None for an empty body)."""
        url = f"{self.base_url}/ari{path}"
        clean = {k: _param(v) for k, v in (params or {}).items() if v is not None}
        started = time.monotonic()
        try:
            async with self._http().request(method, url, params=clean, json=body) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise _error(resp.status, text, method, path)
                if not text:
                    return None
                return json.loads(text)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise AriUnavailable(f"ARI {method} {path}: {_describe(exc)}") from exc
        finally:
            timing.add("ari", (time.monotonic() - started) * 1000)

    async def get(self, path: str, **params: Any) -> Any:
        return await self.request("GET", path, params=params)

    async def post(self, path: str, body: dict[str, Any] | None = None, **params: Any) -> Any:
        return await self.request("POST", path, params=params, body=body)

    async def put(self, path: str, body: dict[str, Any] | None = None, **params: Any) -> Any:
        return await self.request("PUT", path, params=params, body=body)

    async def delete(self, path: str, **params: Any) -> Any:
        return await self.request("DELETE", path, params=params)

    async def run_events(
        self,
        on_event: EventHandler,
        on_connect: ConnectHandler,
        on_disconnect: ConnectHandler,
    ) -> None:
        """Keep the events websocket open until `close()`; reconnect with backoff.

        `on_connect` runs after each (re)connection, before events are read, so the adapter
        can resync; `on_disconnect` after each loss. A handler's exception is logged and the
        stream goes on: one bad event must not stop the daemon.
        """
        delay = self._initial_delay
        ws_url = self.base_url.replace("http", "ws", 1) + "/ari/events"
        while not self._closing:
            try:
                self._ws = await self._http().ws_connect(
                    ws_url,
                    params={"app": self.app, "subscribeAll": "false"},
                    heartbeat=20.0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.warning("ari.connect_failed", error=_describe(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_delay)
                continue
            self.connected.set()
            log.info("ari.connected", url=ws_url, app=self.app)
            try:
                try:
                    await on_connect()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # Half a resync is worse than none: drop this connection and start over
                    # (with backoff), so that the next one resyncs from scratch.
                    log.exception("ari.resync_failed", retry_in=delay)
                else:
                    delay = self._initial_delay
                    async for msg in self._ws:
                        if msg.type is aiohttp.WSMsgType.TEXT:
                            await self._dispatch(msg.data, on_event)
                        elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                            break
            except (aiohttp.ClientError, OSError) as exc:
                log.warning("ari.websocket_error", error=_describe(exc))
            finally:
                self.connected.clear()
                await self._ws.close()
                self._ws = None
            if not self._closing:
                log.warning("ari.disconnected", retry_in=delay)
                await _guard(on_disconnect(), "on_disconnect")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_delay)

    async def _dispatch(self, raw: str, on_event: EventHandler) -> None:
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            log.error("ari.malformed_event", data=raw[:200])
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            log.error("ari.malformed_event", data=raw[:200])
            return
        # speed (issue 7 §8): events are handled one at a time, so a slow handler delays
        # every event behind it (a caller's take guard among them): log the slow ones.
        started = time.monotonic()
        await _guard(on_event(event), f"event {event['type']}")
        spent_ms = (time.monotonic() - started) * 1000
        if spent_ms > SLOW_EVENT_MS:
            log.info("ari.slow_event", type=event["type"], ms=round(spent_ms, 1))

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()


async def _guard(awaitable: Awaitable[None], what: str) -> None:
    try:
        await awaitable
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("ari.handler_failed", handler=what)


def _describe(exc: BaseException) -> str:
    """An aiohttp error for a log line or a message: its kind and status, never its request,
    whose headers carry the ARI credentials (`repr` of a handshake error shows them)."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}: {exc.status} {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _error(status: int, text: str, method: str, path: str) -> AriError:
    try:
        message = json.loads(text).get("message", text)
    except (json.JSONDecodeError, AttributeError):
        message = text
    cls = AriNotFound if status == 404 else AriConflict if status in (409, 422) else AriError
    return cls(status, str(message)[:300], method, path)
