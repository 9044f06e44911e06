"""Webhooks: subscriptions, an outbox written with the call event, and a delivery worker.

Persisted before sent: `outbox_statements` is a `CallStore` in-transaction subscriber, so a
delivery row exists exactly when its call event does (one commit). The worker sends what is
due, signs each attempt, retries with exponential backoff and keeps a log per delivery. It
runs in its own tasks with a timeout per attempt: a slow or dead receiver never delays a call
(the call's only cost is one INSERT ... SELECT in a transaction it makes anyway).

Delivery is at least once (a daemon that dies between the receiver's 2xx and its own record
sends again): every payload carries a stable event `id` for the receiver to de-duplicate.
Events of one webhook are sent oldest first, one at a time; a failed one is retried on its own
schedule and does not hold back the later ones (so a retried event can arrive after newer
ones: order by `created_at` if it matters).

A disabled webhook gets no new events and sends none of those it still owes (they wait,
and go out when it is enabled again).

Signature: `Callbridge-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import aiohttp

from bridge.calls.model import _iso
from bridge.calls.store import Statement, StoreChange
from bridge.config import WebhookSettings
from bridge.errors import NotFound
from bridge.log import get_logger
from bridge.store.db import Database

log = get_logger(__name__)

# What a subscription can ask for ("*" = all of them).
WEBHOOK_EVENTS = (
    "call.started",
    "call.ended",
    "transfer.requested",
    "transfer.completed",
    "transfer.failed",
    "transfer.cancelled",
    "transfer.handed_off",
    "assistant.tool_called",
    "transfer.returned",  # hand back (issue 9 §5): the caller is back with the assistant
    # fallback chains (issue 9 §3): every attempt failed, the caller is back with the assistant
    "transfer.attempts_ended",
)
SIGNATURE_HEADER = "Callbridge-Signature"
SECRET_PREFIX = "whsec_"


def utcnow() -> datetime:
    return datetime.now(UTC)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `Callbridge-Signature` header value for one attempt."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, *, tolerance: float = 300) -> bool:
    """What a receiver does (see README): recompute, compare in constant time, check age."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        ts = int(parts["t"])
    except (KeyError, ValueError):
        return False
    expected = sign(secret, ts, body).split("v1=", 1)[1]
    fresh = abs(time.time() - ts) <= tolerance
    return fresh and hmac.compare_digest(expected, parts.get("v1", ""))


# --- events: from the store's change to webhook payloads ---------------------------------------


def webhook_events(change: StoreChange) -> list[tuple[str, dict[str, Any]]]:
    """The webhook events in a store change: (type, payload without id)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for event in change.events:
        kind, data = event.kind, dict(event.data)
        if kind == "transcript":
            if data.get("role") != "tool_call":
                continue
            kind = "assistant.tool_called"
            data = {
                "tool": data.get("tool"),
                "arguments": data.get("text"),
                "tool_call_id": data.get("call_id"),
            }
        if kind not in WEBHOOK_EVENTS:
            continue
        payload: dict[str, Any] = {
            "type": kind,
            "created_at": _iso(event.at),
            "call_id": change.call_id,
            "data": data,
        }
        if change.call is not None:
            payload["call"] = change.call.public_dict()
        if change.transfer is not None and kind.startswith("transfer."):
            t = change.transfer.public_dict()
            t.pop("history", None)
            payload["transfer"] = t
        out.append((kind, payload))
    return out


def outbox_statements(change: StoreChange) -> list[Statement]:
    """`CallStore` in-transaction subscriber: one delivery row per matching enabled webhook,
    chosen by SQL inside the transaction (no webhook read races the commit)."""
    statements: list[Statement] = []
    now = _iso(utcnow())
    for kind, payload in webhook_events(change):
        event_id = f"evt_{uuid.uuid4().hex}"
        payload = {"id": event_id, **payload}
        statements.append(
            (
                "INSERT INTO webhook_deliveries (id, webhook_id, event_id, event, call_id,"
                " payload, status, attempts, next_attempt_at, log, created_at)"
                " SELECT 'dlv_' || lower(hex(randomblob(16))), w.id, ?, ?, ?, ?, 'pending', 0,"
                " ?, '[]', ? FROM webhooks w WHERE w.enabled = 1 AND EXISTS"
                " (SELECT 1 FROM json_each(w.events) WHERE value IN (?, '*'))",
                (event_id, kind, change.call_id, json.dumps(payload), now, now, kind),
            )
        )
    return statements


# --- subscriptions -------------------------------------------------------------------------------


@dataclass
class Webhook:
    id: str
    url: str
    events: list[str]
    description: str | None
    enabled: bool
    created_at: str
    updated_at: str

    def public_dict(self) -> dict[str, Any]:
        # The secret is write-only: never in a response (shown once at creation).
        return {
            "id": self.id,
            "url": self.url,
            "events": self.events,
            "description": self.description,
            "enabled": self.enabled,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


_HOOK_COLUMNS = "id, url, events, description, enabled, created_at, updated_at"


def _row_to_hook(row: Any) -> Webhook:
    return Webhook(
        id=row["id"],
        url=row["url"],
        events=json.loads(row["events"]),
        description=row["description"],
        enabled=bool(row["enabled"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _delivery_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "webhook_id": row["webhook_id"],
        "event_id": row["event_id"],
        "event": row["event"],
        "call_id": row["call_id"],
        "status": row["status"],
        "attempts": row["attempts"],
        "next_attempt_at": row["next_attempt_at"] if row["status"] == "pending" else None,
        "last_status": row["last_status"],
        "last_error": row["last_error"],
        "log": json.loads(row["log"]),
        "created_at": row["created_at"],
        "delivered_at": row["delivered_at"],
        "payload": json.loads(row["payload"]),
    }


class WebhookService:
    """CRUD of subscriptions and reads of the delivery log (the API's side)."""

    def __init__(self, db: Database, on_change: Any = None) -> None:
        self.db = db
        self.on_change = on_change  # wakes the worker (new subscription, retry)

    async def create(
        self,
        url: str,
        events: list[str],
        secret: str | None,
        description: str | None,
        enabled: bool = True,
    ) -> tuple[Webhook, str | None]:
        """The new webhook, and its secret if we generated it (shown this once)."""
        generated = None
        if secret is None:
            secret = generated = SECRET_PREFIX + secrets.token_urlsafe(32)
        now = _iso(utcnow())
        hook_id = f"wh_{uuid.uuid4().hex[:20]}"
        await self.db.execute(
            "INSERT INTO webhooks (id, url, events, secret, description, enabled, created_at,"
            " updated_at) VALUES (?,?,?,?,?,?,?,?)",
            (hook_id, url, json.dumps(events), secret, description, int(enabled), now, now),
        )
        return await self.get(hook_id), generated

    async def get(self, hook_id: str) -> Webhook:
        row = await self.db.fetchone(
            f"SELECT {_HOOK_COLUMNS} FROM webhooks WHERE id = ?", (hook_id,)
        )
        if row is None:
            raise NotFound(f"no webhook {hook_id}", field="id")
        return _row_to_hook(row)

    async def list_all(self) -> list[Webhook]:
        rows = await self.db.fetchall(f"SELECT {_HOOK_COLUMNS} FROM webhooks ORDER BY created_at")
        return [_row_to_hook(r) for r in rows]

    async def update(self, hook_id: str, changes: dict[str, Any]) -> Webhook:
        await self.get(hook_id)
        columns = {
            "url": "url",
            "events": "events",
            "secret": "secret",
            "description": "description",
            "enabled": "enabled",
        }
        sets, params = [], []
        for key, value in changes.items():
            if key not in columns:
                continue
            if key == "events":
                value = json.dumps(value)
            elif key == "enabled":
                value = int(bool(value))
            sets.append(f"{columns[key]} = ?")
            params.append(value)
        sets.append("updated_at = ?")
        params.append(_iso(utcnow()))
        await self.db.execute(
            f"UPDATE webhooks SET {', '.join(sets)} WHERE id = ?", (*params, hook_id)
        )
        if self.on_change is not None:
            self.on_change()  # enabled again, or a new URL: what is owed goes out now
        return await self.get(hook_id)

    async def delete(self, hook_id: str) -> None:
        await self.get(hook_id)
        await self.db.transaction(
            [
                ("DELETE FROM webhook_deliveries WHERE webhook_id = ?", (hook_id,)),
                ("DELETE FROM webhooks WHERE id = ?", (hook_id,)),
            ]
        )

    async def deliveries(
        self, hook_id: str, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        await self.get(hook_id)
        sql = "SELECT * FROM webhook_deliveries WHERE webhook_id = ?"
        params: tuple[Any, ...] = (hook_id,)
        if status is not None:
            sql += " AND status = ?"
            params += (status,)
        rows = await self.db.fetchall(
            sql + " ORDER BY created_at DESC, rowid DESC LIMIT ?", (*params, limit)
        )
        return [_delivery_dict(r) for r in rows]

    async def retry(self, hook_id: str, delivery_id: str) -> dict[str, Any]:
        """Send a failed (or pending) delivery again now."""
        count = await self.db.execute(
            "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = ?"
            " WHERE id = ? AND webhook_id = ? AND status != 'delivered'",
            (_iso(utcnow()), delivery_id, hook_id),
        )
        if not count:
            raise NotFound(f"no undelivered delivery {delivery_id}", field="delivery_id")
        if self.on_change is not None:
            self.on_change()
        row = await self.db.fetchone(
            "SELECT * FROM webhook_deliveries WHERE id = ?", (delivery_id,)
        )
        return _delivery_dict(row)


# --- the worker ----------------------------------------------------------------------------------


class WebhookWorker:
    """Sends due deliveries: one task per webhook (in order), at most `concurrency` at once."""

    def __init__(
        self,
        db: Database,
        settings: WebhookSettings,
        on_attempt: Callable[[str, str], None] | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.on_attempt = on_attempt  # (event, "delivered" | "retry" | "gave_up"): metrics
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._drains: dict[str, asyncio.Task[None]] = {}
        self._limit = asyncio.Semaphore(settings.concurrency)
        self._http: aiohttp.ClientSession | None = None
        self._stopping = False

    def start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout)
        )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="webhooks")

    def kick(self) -> None:
        self._wake.set()

    def on_change(self, change: StoreChange) -> None:
        """`CallStore` after-commit subscriber: a committed event may have deliveries."""
        if webhook_events(change):
            self._wake.set()

    async def stop(self, grace: float = 2.0) -> None:
        """Stop scheduling; let attempts in flight finish for up to `grace` seconds (one cut
        short may have reached the receiver and is sent again by the next run: at least
        once), then cancel. Undelivered rows stay in the outbox."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        drains = list(self._drains.values())
        if drains:
            await asyncio.wait(drains, timeout=grace)
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    async def prune(self) -> int:
        """Forget settled deliveries older than `keep_days` (the log must not grow forever)."""
        before = _iso(utcnow() - timedelta(days=self.settings.keep_days))
        return await self.db.execute(
            "DELETE FROM webhook_deliveries WHERE status != 'pending' AND created_at < ?",
            (before,),
        )

    async def _run(self) -> None:
        pruned_at = 0.0
        while True:
            self._wake.clear()
            wait = 5.0
            try:
                if time.monotonic() - pruned_at > 3600:
                    pruned_at = time.monotonic()
                    await self.prune()
                wait = await self._schedule()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhooks.schedule_failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, wait))
            except TimeoutError:
                pass

    async def _schedule(self) -> float:
        """Start a drain for each webhook with a due delivery; return how long until the
        next one is due."""
        rows = await self.db.fetchall(
            "SELECT d.webhook_id, MIN(d.next_attempt_at) AS due FROM webhook_deliveries d"
            " JOIN webhooks w ON w.id = d.webhook_id"
            " WHERE d.status = 'pending' AND w.enabled = 1 GROUP BY d.webhook_id"
        )
        now = utcnow()
        wait = 5.0
        for row in rows:
            due = datetime.fromisoformat(row["due"])
            hook = row["webhook_id"]
            if due <= now:
                if hook not in self._drains:
                    task = asyncio.get_running_loop().create_task(self._drain(hook))
                    self._drains[hook] = task
                    task.add_done_callback(partial(self._drain_done, hook))
            else:
                wait = min(wait, (due - now).total_seconds())
        return wait

    def _drain_done(self, hook: str, task: asyncio.Task[None]) -> None:
        self._drains.pop(hook, None)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            # e.g. the database is locked: the scheduler's next tick tries again (no tight loop)
            log.error("webhooks.drain_failed", webhook=hook, error=repr(error))
            return
        self._wake.set()  # what arrived meanwhile, or the next retry, is scheduled again

    async def _drain(self, hook_id: str) -> None:
        """Send a webhook's due deliveries one at a time, oldest first (so a healthy receiver
        gets them in order). A failure ends the pass: the receiver looks unwell, and the
        failed delivery waits for its own retry time without holding back the others."""
        while not self._stopping:
            row = await self.db.fetchone(
                "SELECT d.*, w.url, w.secret FROM webhook_deliveries d JOIN webhooks w"
                " ON w.id = d.webhook_id WHERE d.webhook_id = ? AND d.status = 'pending'"
                " AND w.enabled = 1"
                " AND d.next_attempt_at <= ? ORDER BY d.created_at, d.rowid LIMIT 1",
                (hook_id, _iso(utcnow())),
            )
            if row is None:
                return
            async with self._limit:
                if not await self._attempt(row):
                    return

    async def _attempt(self, row: Any) -> bool:
        payload = json.loads(row["payload"])
        if payload.get("type") == "call.ended" and "transcript" not in payload:
            # The transcript is complete once the call has ended: attached at the first
            # attempt and frozen in the row (every attempt sends the same body).
            payload["transcript"] = await self._transcript(row["call_id"])
            await self.db.execute(
                "UPDATE webhook_deliveries SET payload = ? WHERE id = ?",
                (json.dumps(payload), row["id"]),
            )
        body = json.dumps(payload, separators=(",", ":")).encode()
        ts = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "callbridge-webhooks",
            SIGNATURE_HEADER: sign(row["secret"], ts, body),
            "Callbridge-Event": row["event"],
            "Callbridge-Event-Id": row["event_id"],
            "Callbridge-Delivery-Id": row["id"],
        }
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        assert self._http is not None
        try:
            # Redirects are not followed: a 307/308 would send the signed body to wherever
            # the Location points (another host), a 301-303 would turn it into a GET. A 3xx
            # is a failed attempt the log shows; subscribe the final URL.
            async with self._http.post(
                row["url"], data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                await resp.read()
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, timeout, DNS...: all a failed attempt
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        attempts = int(row["attempts"]) + 1
        now = utcnow()
        entry = {
            "at": _iso(now),
            "status": status,
            "error": error,
            "ms": round((time.monotonic() - started) * 1000),
        }
        log_list = [*json.loads(row["log"])[-19:], entry]  # the last 20 attempts
        if error is None:
            await self.db.execute(
                "UPDATE webhook_deliveries SET status = 'delivered', attempts = ?,"
                " last_status = ?, last_error = NULL, log = ?, delivered_at = ? WHERE id = ?",
                (attempts, status, json.dumps(log_list), _iso(now), row["id"]),
            )
            if self.on_attempt is not None:
                self.on_attempt(row["event"], "delivered")
            log.info("webhook.delivered", delivery=row["id"], kind=row["event"], attempts=attempts)
            return True
        s = self.settings
        give_up = attempts >= s.max_attempts
        delay = min(s.retry_initial * 2 ** (attempts - 1), s.retry_max)
        await self.db.execute(
            "UPDATE webhook_deliveries SET status = ?, attempts = ?, last_status = ?,"
            " last_error = ?, log = ?, next_attempt_at = ? WHERE id = ?",
            (
                "failed" if give_up else "pending",
                attempts,
                status,
                error,
                json.dumps(log_list),
                _iso(now + timedelta(seconds=delay)),
                row["id"],
            ),
        )
        if self.on_attempt is not None:
            self.on_attempt(row["event"], "gave_up" if give_up else "retry")
        log.warning(
            "webhook.attempt_failed",
            delivery=row["id"],
            kind=row["event"],
            attempts=attempts,
            error=error,
            gave_up=give_up,
        )
        return False

    async def _transcript(self, call_id: str | None) -> list[dict[str, Any]]:
        if call_id is None:
            return []
        rows = await self.db.fetchall(
            "SELECT at, data FROM call_events WHERE call_id = ? AND kind = 'transcript'"
            " ORDER BY seq",
            (call_id,),
        )
        out = []
        for r in rows:
            data = json.loads(r["data"])
            if data.get("role") in ("caller", "assistant"):
                out.append({"at": r["at"], "role": data["role"], "text": data.get("text")})
        return out
