"""Issue 10 without a PBX: the store's subscriber hook, the webhook outbox and worker, the
signature, metrics from store changes, transfer analytics, the migration, the ops API."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from bridge.api.keys import create_api_key
from bridge.api.ops import OpsContext
from bridge.api.server import create_api_app
from bridge.calls.model import Call, CallEvent, CallStatus, utcnow
from bridge.calls.store import CallStore, StoreChange
from bridge.calls.transfer import Transfer, TransferEvent
from bridge.config import WebhookSettings
from bridge.directory.service import DirectoryService
from bridge.ops.analytics import transfer_analytics
from bridge.ops.metrics import Metrics, end_reason_label
from bridge.ops.webhooks import (
    SIGNATURE_HEADER,
    WebhookService,
    WebhookWorker,
    outbox_statements,
    sign,
    verify,
)
from bridge.pbx.ports import DialTarget, LegOutcome
from bridge.store.db import MIGRATIONS, Database
from tests.support.daemon import wait_for

SECRET = "0123456789abcdef-secret"


def make_call(n: int = 1, assistant: str | None = "asst-1") -> Call:
    return Call(f"c{n}", "asterisk", f"ch{n}", CallStatus.ACTIVE, utcnow(), assistant_id=assistant)


def bridged_transfer(call: Call, ring_s: float = 2.0, label: str = "Support") -> Transfer:
    t = Transfer(
        f"t-{call.id}",
        call.id,
        "assistant",
        "+31612345678",
        DialTarget(number="+31612345678"),
        "bridge",
        20,
        label=label,
    )
    t.apply(TransferEvent.MESSAGE_DONE)
    t.apply(TransferEvent.LEG_RINGING)
    # Backdate the history: dialing `ring_s` before the answer.
    dialing_at = t.history[1][1]
    t.history[1] = (t.history[1][0], dialing_at - timedelta(seconds=ring_s))
    t.history[0] = (t.history[0][0], dialing_at - timedelta(seconds=ring_s + 1))
    t.apply(TransferEvent.LEG_ANSWERED)
    t.settle(TransferEvent.CONNECTED, LegOutcome.ANSWERED, sip_code=200)
    return t


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(tmp_path / "ops.sqlite3")
    yield database
    await database.close()


# --- the store's subscriber hook --------------------------------------------------------------


async def test_outbox_rows_commit_with_their_event_and_roll_back_with_it(db: Database) -> None:
    store = CallStore(db)
    seen: list[StoreChange] = []
    store.subscribe(seen.append, in_transaction=outbox_statements)
    hooks = WebhookService(db)
    await hooks.create("http://127.0.0.1:9/x", ["transfer.completed"], SECRET, None)
    await hooks.create("http://127.0.0.1:9/y", ["call.started"], SECRET, None)
    call = make_call()
    await store.save(call)
    transfer = bridged_transfer(call)
    await store.save_state(call, transfer, [CallEvent("transfer.completed", utcnow(), {})])
    rows = await db.fetchall("SELECT event, payload FROM webhook_deliveries")
    assert [r["event"] for r in rows] == ["transfer.completed"]  # only the subscribed hook
    payload = json.loads(rows[0]["payload"])
    assert payload["transfer"]["outcome"] == "answered" and payload["transfer"]["sip_code"] == 200
    assert payload["id"].startswith("evt_") and payload["call_id"] == call.id
    assert [c.events[0].kind for c in seen if c.events] == ["transfer.completed"]

    # A transaction that fails leaves neither the event nor its outbox row, nor a notification.
    seen.clear()
    with pytest.raises(sqlite3.IntegrityError):
        await store.save_state(
            None, None, [CallEvent("transfer.completed", utcnow(), {})], call_id="no-such-call"
        )
    assert len(await db.fetchall("SELECT id FROM webhook_deliveries")) == 1
    assert seen == []


async def test_a_failing_observer_never_fails_the_write(db: Database) -> None:
    store = CallStore(db)

    def broken(change: StoreChange) -> None:
        raise RuntimeError("observer bug")

    store.subscribe(broken)
    await store.save(make_call())
    assert await store.get("c1") is not None


# --- signature --------------------------------------------------------------------------------


def test_signature_verifies_and_rejects_tampering_and_old_timestamps() -> None:
    body = b'{"type":"transfer.completed"}'
    now = int(time.time())
    header = sign(SECRET, now, body)
    assert header.startswith(f"t={now},v1=")
    assert verify(SECRET, header, body)
    assert not verify(SECRET, header, body + b" ")
    assert not verify("another-secret-0123456", header, body)
    assert not verify(SECRET, sign(SECRET, now - 3600, body), body)  # replayed an hour later
    assert not verify(SECRET, "garbage", body)


# --- the worker -------------------------------------------------------------------------------


class Receiver:
    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.fail = 0  # answer 500 to this many requests first
        self.hang = False
        self.held = 0  # requests being held right now (hang=True)
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        if self.hang:
            self.held += 1
            try:
                await self.release.wait()
            finally:
                self.held -= 1
        body = await request.read()
        if self.fail > 0:
            self.fail -= 1
            return web.Response(status=500)
        self.got.append((dict(request.headers), body))
        return web.Response(status=200)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    server = TestServer(app)
    await server.start_server()
    yield r, str(server.make_url("/hook"))
    await server.close()


FAST = WebhookSettings(retry_initial=0.05, retry_max=0.1, timeout=0.5, max_attempts=3)


async def test_worker_delivers_in_order_with_transcript_and_retries_failures_apart(
    db: Database, receiver: tuple[Receiver, str]
) -> None:
    r, url = receiver
    store = CallStore(db)
    worker = WebhookWorker(db, FAST)
    store.subscribe(worker.on_change, in_transaction=outbox_statements)
    hook, _ = await WebhookService(db).create(url, ["*"], SECRET, None)
    worker.start()
    try:
        call = make_call()
        await store.save(call)
        await store.add_event(call.id, CallEvent("call.started", utcnow(), {"assistant_id": "a"}))
        for role, text in (("caller", "my invoice is wrong"), ("assistant", "Let me help.")):
            await store.add_event(
                call.id, CallEvent("transcript", utcnow(), {"role": role, "text": text})
            )
        await store.add_event(
            call.id,
            CallEvent(
                "transcript",
                utcnow(),
                {"role": "tool_call", "text": '{"d":1}', "tool": "transfer_call", "call_id": "tc1"},
            ),
        )
        call.status = CallStatus.ENDED
        await store.save_state(call, events=[CallEvent("call.ended", utcnow(), {"reason": "x"})])
        await wait_for(lambda: len(r.got) == 3, "three deliveries")
        types = [json.loads(b)["type"] for _, b in r.got]
        assert types == ["call.started", "assistant.tool_called", "call.ended"]  # in order
        for headers, body in r.got:
            assert verify(SECRET, headers[SIGNATURE_HEADER], body)
        ended = json.loads(r.got[2][1])
        assert [t["text"] for t in ended["transcript"]] == ["my invoice is wrong", "Let me help."]
        tool = json.loads(r.got[1][1])
        assert tool["data"] == {
            "tool": "transfer_call",
            "arguments": '{"d":1}',
            "tool_call_id": "tc1",
        }

        # The receiver fails twice: the failed event is retried on its own schedule (with
        # backoff) and logged; the one after it is not held back.
        r.fail = 2
        second = make_call(2)
        await store.save(second)
        await store.add_event(second.id, CallEvent("call.started", utcnow(), {}))
        await store.add_event(second.id, CallEvent("transfer.requested", utcnow(), {}))
        await wait_for(lambda: len(r.got) == 5, "both events of the second call")
        log = await WebhookService(db).deliveries(hook.id)
        assert all(d["status"] == "delivered" for d in log) and len(log) == 5
        # Every attempt is in the log: 5 successes and the 2 refusals, each before its retry.
        statuses = [a["status"] for d in log for a in d["log"]]
        assert sorted(statuses) == [200] * 5 + [500] * 2
        assert all(d["log"][-1]["status"] == 200 for d in log)
        assert sum(d["attempts"] for d in log) == 7  # 5 deliveries, 2 failed attempts
    finally:
        await worker.stop()


async def test_a_hanging_receiver_never_delays_the_store(
    db: Database, receiver: tuple[Receiver, str]
) -> None:
    r, url = receiver
    r.hang = True
    store = CallStore(db)
    worker = WebhookWorker(db, WebhookSettings(timeout=120, max_attempts=3))
    store.subscribe(worker.on_change, in_transaction=outbox_statements)
    await WebhookService(db).create(url, ["*"], SECRET, None)
    worker.start()
    try:
        call = make_call()
        await store.save(call)
        await store.add_event(call.id, CallEvent("call.started", utcnow(), {}))
        await wait_for(lambda: r.held > 0, "the receiver to hold a delivery")
        # The receiver holds that delivery until released: a store that waited on a
        # delivery could not commit anything more (the timeout only bounds a hung test).
        async with asyncio.timeout(60):
            for _ in range(20):
                await store.add_event(call.id, CallEvent("call.started", utcnow(), {}))
        assert r.held > 0 and not r.got, "the commits finished while the delivery was held"
        row = await db.fetchone("SELECT COUNT(*) AS n FROM webhook_deliveries")
        assert row is not None and row["n"] == 21  # every event is owed, none lost
        r.hang = False
        r.release.set()
        await wait_for(lambda: len(r.got) == 21, "all 21 deliveries once released", timeout=30)
    finally:
        await worker.stop()


# --- metrics ----------------------------------------------------------------------------------


def samples(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = m.exposition().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_metrics_from_store_changes() -> None:
    m = Metrics("asterisk", active=lambda: {"asst-1": 2}, connected=lambda: True)
    call = make_call()
    now = utcnow()
    m.on_change(
        StoreChange(call.id, events=(CallEvent("call.started", now, {"assistant_id": "asst-1"}),))
    )
    transfer = bridged_transfer(call, ring_s=2.0)
    m.on_change(StoreChange(call.id, call, transfer, (CallEvent("transfer.completed", now, {}),)))
    m.on_change(
        StoreChange(
            call.id,
            events=(
                CallEvent("transcript", now, {"role": "caller", "text": "hi", "stt_ms": 300}),
                CallEvent(
                    "transcript",
                    now,
                    {
                        "role": "assistant",
                        "text": "hi",
                        "latency_ms": {"stt": 300, "llm": 500, "say": 650},
                    },
                ),
                CallEvent("transcript", now, {"role": "tool_call", "tool": "transfer_call"}),
                CallEvent("assistant.said", now, {"text": "hi", "tts_ms": 12}),
            ),
        )
    )
    m.on_change(
        StoreChange(call.id, events=(CallEvent("call.ended", now, {"reason": "caller hung up"}),))
    )
    m.pbx_connected()
    m.pbx_connected()
    m.api_request("/api/v1/calls", "GET", 200)
    m.webhook_attempt("call.ended", "retry")
    s = samples(m)
    a = frozenset({("assistant", "asst-1")})
    assert s[("callbridge_calls_started_total", a)] == 1
    assert s[("callbridge_calls_active", a)] == 2
    assert s[("callbridge_calls_ended_total", a | {("reason", "caller_hung_up")})] == 1
    labels = frozenset(
        {
            ("source", "assistant"),
            ("destination", "Support"),
            ("mode", "bridge"),
            ("outcome", "answered"),
        }
    )
    assert s[("callbridge_transfers_total", labels)] == 1
    d = frozenset({("destination", "Support")})
    assert s[("callbridge_transfer_ring_seconds_sum", d)] == pytest.approx(2.0, abs=0.05)
    assert s[("callbridge_transfer_decided_to_bridged_seconds_count", d)] == 1
    assert s[("callbridge_turn_latency_seconds_sum", frozenset())] == pytest.approx(0.65)
    assert s[("callbridge_stt_seconds_sum", frozenset())] == pytest.approx(0.3)
    assert s[("callbridge_llm_seconds_sum", frozenset())] == pytest.approx(0.2)
    assert s[("callbridge_tts_seconds_sum", frozenset())] == pytest.approx(0.012)
    assert s[("callbridge_assistant_tool_calls_total", frozenset({("tool", "transfer_call")}))] == 1
    assert s[("callbridge_pbx_connected", frozenset({("pbx", "asterisk")}))] == 1
    assert s[("callbridge_pbx_reconnects_total", frozenset({("pbx", "asterisk")}))] == 1
    retry = frozenset({("event", "call.ended"), ("result", "retry")})
    assert s[("callbridge_webhook_attempts_total", retry)] == 1
    req = frozenset({("route", "/api/v1/calls"), ("method", "GET"), ("status", "200")})
    assert s[("callbridge_api_requests_total", req)] == 1


def test_end_reasons_are_a_small_label_set() -> None:
    assert end_reason_label("caller hung up while the destination answered") == "caller_hung_up"
    assert end_reason_label("internal error: boom 0x1234") == "internal_error"
    assert end_reason_label("something new") == "other"
    assert end_reason_label(None) == "unknown"


# --- analytics --------------------------------------------------------------------------------


async def test_analytics_per_assistant_and_destination_with_callers_reasons(
    db: Database,
) -> None:
    store = CallStore(db)
    await db.execute(
        "INSERT INTO assistants (id, doc, created_at, updated_at) VALUES (?,?,?,?)",
        ("asst-1", json.dumps({"name": "Support Assistant"}), "x", "x"),
    )
    for n, ring in ((1, 2.0), (2, 4.0), (3, 6.0)):
        call = make_call(n)
        await store.save(call)
        said = utcnow() - timedelta(seconds=10)  # the words come before the transfer
        for i, text in enumerate((f"hello {n}", f"billing {n}")):
            event = CallEvent(
                "transcript", said + timedelta(seconds=i), {"role": "caller", "text": text}
            )
            await store.add_event(call.id, event)
        await store.save_transfer(bridged_transfer(call, ring_s=ring))
    await store.save(make_call(4))  # a call with no transfer
    data = await transfer_analytics(db, None, None)
    (a,) = data["assistants"]
    assert a["id"] == "asst-1" and a["name"] == "Support Assistant"
    assert a["calls"] == 4 and a["transfers"] == 3 and a["transfer_rate"] == 0.75
    assert a["outcomes"] == {"answered": 3}
    assert a["median_ring_seconds"] == pytest.approx(4.0, abs=0.05)
    assert sorted(r["caller_said"][-1] for r in a["reasons"]) == [
        "billing 1",
        "billing 2",
        "billing 3",
    ]
    assert a["reasons"][0]["caller_said"][0].startswith("hello")
    (d,) = data["destinations"]
    assert d["id"] == "Support" and d["destination"] == "+31612345678"
    assert d["answer_rate"] == 1.0 and d["transfers"] == 3
    later = await transfer_analytics(db, utcnow() + timedelta(hours=1), None)
    assert later["destinations"] == []


# --- migration --------------------------------------------------------------------------------


async def test_migration_upgrades_an_existing_database(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    conn.execute(
        "INSERT INTO calls (id, pbx, channel_id, status, started_at) VALUES"
        " ('old', 'asterisk', 'ch', 'ended', '2026-01-01T00:00:00Z')"
    )
    conn.commit()
    conn.close()
    path.chmod(0o600)
    db = await Database.open(path)
    try:
        row = await db.fetchone("PRAGMA user_version")
        assert row is not None and row[0] == len(MIGRATIONS)
        assert await db.fetchone("SELECT id FROM calls WHERE id = 'old'") is not None
        assert await db.fetchall("SELECT * FROM webhooks") == []
    finally:
        await db.close()


# --- the API ----------------------------------------------------------------------------------


class NoCalls:
    async def list_calls(self, *a: Any) -> list[Any]:
        return []


@pytest.fixture
async def client(db: Database) -> AsyncIterator[tuple[TestClient, str, Metrics]]:
    metrics = Metrics("asterisk")
    ops = OpsContext(metrics, WebhookService(db), metrics_token="scrape-token-0123456789")
    app = create_api_app(DirectoryService(db), NoCalls(), db, ops=ops)  # type: ignore[arg-type]
    c = TestClient(TestServer(app))
    await c.start_server()
    yield c, await create_api_key(db, "t"), metrics
    await c.close()


async def test_webhook_api_keeps_the_secret_write_only(
    client: tuple[TestClient, str, Metrics],
) -> None:
    c, key, _ = client
    auth = {"Authorization": f"Bearer {key}"}
    resp = await c.post(
        "/api/v1/webhooks",
        json={"url": "http://127.0.0.1:1/h", "events": ["transfer.completed"]},
        headers=auth,
    )
    assert resp.status == 201
    created = await resp.json()
    assert created["secret"].startswith("whsec_")  # generated: shown this once
    hook = created["id"]
    got = await (await c.get(f"/api/v1/webhooks/{hook}", headers=auth)).json()
    assert "secret" not in got and got["events"] == ["transfer.completed"]
    resp = await c.post(
        "/api/v1/webhooks",
        json={"url": "http://127.0.0.1:1/h", "events": ["*"], "secret": SECRET},
        headers=auth,
    )
    assert "secret" not in await resp.json()  # given by the caller: never echoed
    resp = await c.post(
        "/api/v1/webhooks", json={"url": "ftp://x/", "events": ["call.ended"]}, headers=auth
    )
    assert resp.status == 422 and (await resp.json())["error"]["field"] == "url"
    resp = await c.post(
        "/api/v1/webhooks", json={"url": "http://x/", "events": ["nope"]}, headers=auth
    )
    assert resp.status == 422 and (await resp.json())["error"]["field"] == "events.0"
    # Replacing the secret, listing, and a refused secret never show one either.
    new_secret = "another-secret-0123456789"
    resp = await c.patch(f"/api/v1/webhooks/{hook}", json={"secret": new_secret}, headers=auth)
    assert resp.status == 200 and new_secret not in await resp.text()
    listed = await (await c.get("/api/v1/webhooks", headers=auth)).text()
    assert created["secret"] not in listed and new_secret not in listed and SECRET not in listed
    resp = await c.patch(f"/api/v1/webhooks/{hook}", json={"secret": "x" * 300}, headers=auth)
    assert resp.status == 422 and "x" * 20 not in await resp.text()
    resp = await c.patch(f"/api/v1/webhooks/{hook}", json={"enabled": False}, headers=auth)
    assert (await resp.json())["enabled"] is False
    resp = await c.get(f"/api/v1/webhooks/{hook}/deliveries", headers=auth)
    assert (await resp.json())["data"] == []
    assert (await c.delete(f"/api/v1/webhooks/{hook}", headers=auth)).status == 204
    assert (await c.get(f"/api/v1/webhooks/{hook}", headers=auth)).status == 404
    assert (await c.get("/api/v1/webhooks")).status == 401


async def test_metrics_endpoint_auth_and_request_counts(
    client: tuple[TestClient, str, Metrics],
) -> None:
    c, key, _ = client
    assert (await c.get("/metrics")).status == 401
    assert (await c.get("/metrics", headers={"Authorization": "Bearer nope"})).status == 401
    resp = await c.get("/metrics", headers={"Authorization": "Bearer scrape-token-0123456789"})
    assert resp.status == 200 and resp.content_type == "text/plain"
    # The scrape-only token opens nothing else.
    resp = await c.get(
        "/api/v1/webhooks", headers={"Authorization": "Bearer scrape-token-0123456789"}
    )
    assert resp.status == 401
    await c.get("/api/v1/calls", headers={"Authorization": f"Bearer {key}"})
    text = await (await c.get("/metrics", headers={"Authorization": f"Bearer {key}"})).text()
    assert 'callbridge_api_requests_total{method="GET",route="/api/v1/calls",status="200"}' in text
    assert 'route="/api/v1/webhooks",status="401"' in text


async def test_ui_files_are_served_without_a_key(client: tuple[TestClient, str, Metrics]) -> None:
    c, key, _ = client
    resp = await c.get("/ui/")
    assert resp.status == 200 and "callbridge" in await resp.text()
    assert (await c.get("/ui/app.js")).status == 200
    # Only the page's own files are public; anything else under /ui is never read.
    assert (await c.get("/ui/app.py")).status == 401
    auth = {"Authorization": f"Bearer {key}"}
    assert (await c.get("/ui/app.py", headers=auth)).status == 404
    assert (await c.get("/ui/%2e%2e%2fapp.py", headers=auth)).status == 404
    resp = await c.get("/ui", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/ui/"


# --- the README's receiver ----------------------------------------------------------------------


def test_the_readme_receiver_verifies_our_signature() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Operating callbridge", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.rstrip().endswith("serve_forever()")
    namespace: dict[str, Any] = {}
    exec(code.rstrip().rsplit("\n", 1)[0], namespace)  # all but the server's start
    secret = namespace["SECRET"].decode()
    body = b'{"id":"evt_1","type":"transfer.completed"}'
    now = int(time.time())
    assert namespace["verified"](sign(secret, now, body), body)
    assert not namespace["verified"](sign(secret, now, body), body + b" ")
    assert not namespace["verified"](sign(secret, now - 3600, body), body)
    assert not namespace["verified"]("", body)
    # A malformed header is refused, never an exception in the receiver.
    assert not namespace["verified"]("t=abc,v1=00", body)
    assert not namespace["verified"]("t=,v1=", body)


async def test_settled_deliveries_are_pruned_after_keep_days(db: Database) -> None:
    store = CallStore(db)
    store.subscribe(in_transaction=outbox_statements)
    await WebhookService(db).create("http://127.0.0.1:9/x", ["*"], SECRET, None)
    call = make_call()
    await store.save(call)
    for _ in range(3):
        await store.add_event(call.id, CallEvent("call.started", utcnow(), {}))
    old = "2020-01-01T00:00:00Z"
    await db.execute("UPDATE webhook_deliveries SET created_at = ? WHERE rowid <= 2", (old,))
    await db.execute("UPDATE webhook_deliveries SET status = 'delivered' WHERE rowid = 1")
    await db.execute("UPDATE webhook_deliveries SET status = 'failed' WHERE rowid = 3")
    assert await WebhookWorker(db, WebhookSettings(keep_days=1)).prune() == 1
    rows = await db.fetchall("SELECT status FROM webhook_deliveries ORDER BY rowid")
    # An old pending delivery is kept (still owed); a recent failed one is kept (the log).
    assert [r["status"] for r in rows] == ["pending", "failed"]


# --- trunk states -------------------------------------------------------------------------------


class FakeTrunk:
    def __init__(self, trunk_id: str) -> None:
        self.id = trunk_id

    def public_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": f"trunk {self.id}"}


async def test_trunk_states_from_what_the_pbx_has() -> None:
    from bridge.ops.trunks import trunk_states

    async def present() -> set[str]:
        return {"a"}

    async def broken() -> set[str]:
        raise RuntimeError("ARI 500")

    trunks = [FakeTrunk("a"), FakeTrunk("b")]
    up = await trunk_states(trunks, True, present)
    assert [t["pbx_state"] for t in up["data"]] == ["provisioned", "missing"]
    down = await trunk_states(trunks, False, present)
    assert down["pbx_connected"] is False
    assert [t["pbx_state"] for t in down["data"]] == ["unknown", "unknown"]
    failing = await trunk_states(trunks, True, broken)
    assert failing["error"] == "ARI 500" and failing["data"][0]["pbx_state"] == "unknown"


async def test_stop_lets_an_attempt_in_flight_finish_and_record_it(db: Database) -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", slow)
    server = TestServer(app)
    await server.start_server()
    try:
        store = CallStore(db)
        worker = WebhookWorker(db, WebhookSettings(timeout=5))
        store.subscribe(worker.on_change, in_transaction=outbox_statements)
        await WebhookService(db).create(str(server.make_url("/hook")), ["*"], SECRET, None)
        worker.start()
        call = make_call()
        await store.save(call)
        await store.add_event(call.id, CallEvent("call.started", utcnow(), {}))
        await asyncio.wait_for(arrived.wait(), 5)
        stopping = asyncio.create_task(worker.stop())  # the receiver is still answering
        await wait_for(lambda: worker._stopping, "the worker to stop scheduling")
        assert not stopping.done()  # it waits for the attempt in flight
        release.set()
        await asyncio.wait_for(stopping, 5)
        row = await db.fetchone("SELECT status, attempts FROM webhook_deliveries")
        # Recorded as delivered: the next run will not send it again.
        assert row is not None and (row["status"], row["attempts"]) == ("delivered", 1)
    finally:
        await server.close()


# --- review fixes -------------------------------------------------------------------------------


async def test_loopback_scrapes_need_no_key_unless_relayed_by_a_proxy(db: Database) -> None:
    """allow_loopback trusts the peer address; behind a reverse proxy on the same host every
    outside request comes from 127.0.0.1, so a relayed request (proxy headers) needs a key."""
    ops = OpsContext(Metrics("asterisk"), None, metrics_allow_loopback=True)
    app = create_api_app(DirectoryService(db), NoCalls(), db, ops=ops)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as c:
        assert (await c.get("/metrics")).status == 200  # the test client is a loopback peer
        for header in ("Forwarded", "X-Forwarded-For", "X-Real-IP"):
            resp = await c.get("/metrics", headers={header: "203.0.113.7"})
            assert resp.status == 401, header
        # DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1.
        for host in ("evil.example", "evil.example:8080"):
            assert (await c.get("/metrics", headers={"Host": host})).status == 401, host
        for host in ("localhost:9100", "127.0.0.1", "[::1]:8080"):
            assert (await c.get("/metrics", headers={"Host": host})).status == 200, host


async def test_webhook_patch_stores_the_validated_values(
    client: tuple[TestClient, str, Metrics],
) -> None:
    c, key, _ = client
    auth = {"Authorization": f"Bearer {key}"}
    resp = await c.post(
        "/api/v1/webhooks", json={"url": "http://127.0.0.1:1/h", "events": ["*"]}, headers=auth
    )
    hook = (await resp.json())["id"]
    resp = await c.patch(f"/api/v1/webhooks/{hook}", json={"enabled": "false"}, headers=auth)
    assert resp.status == 200 and (await resp.json())["enabled"] is False
    got = await (await c.get(f"/api/v1/webhooks/{hook}", headers=auth)).json()
    assert got["enabled"] is False


async def test_a_redirecting_receiver_is_a_failed_attempt_not_followed(db: Database) -> None:
    """A 307 would make the client re-send the signed body to another URL (any host): the
    worker records the 3xx as a failure instead of following it."""
    elsewhere: list[bytes] = []

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/elsewhere")

    async def other(request: web.Request) -> web.Response:
        elsewhere.append(await request.read())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", moved)
    app.router.add_route("*", "/elsewhere", other)
    server = TestServer(app)
    await server.start_server()
    store = CallStore(db)
    worker = WebhookWorker(db, WebhookSettings(retry_initial=60, timeout=2, max_attempts=3))
    store.subscribe(worker.on_change, in_transaction=outbox_statements)
    hook, _ = await WebhookService(db).create(str(server.make_url("/hook")), ["*"], SECRET, None)
    worker.start()
    try:
        call = make_call()
        await store.save(call)
        await store.add_event(call.id, CallEvent("call.started", utcnow(), {}))

        async def attempted() -> bool:
            return bool((await WebhookService(db).deliveries(hook.id))[0]["attempts"])

        await wait_for(attempted, "the first attempt")
        (delivery,) = await WebhookService(db).deliveries(hook.id)
        assert delivery["status"] == "pending" and delivery["last_status"] == 307
        assert delivery["last_error"] == "HTTP 307"
        assert elsewhere == []
    finally:
        await worker.stop()
        await server.close()


@pytest.mark.parametrize("url", ["http://h:99999/x", "http://h:0/x", "https://h:port/x"])
async def test_a_webhook_url_with_a_bad_port_is_422_naming_url(
    client: tuple[TestClient, str, Metrics], url: str
) -> None:
    c, key, _ = client
    auth = {"Authorization": f"Bearer {key}"}
    resp = await c.post("/api/v1/webhooks", json={"url": url, "events": ["*"]}, headers=auth)
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["field"] == "url" and "port" in error["message"]


def test_metric_labels_stay_bounded_whatever_is_dialled_or_called() -> None:
    """API transfers to any number and tools the model invents must not each make a new
    time series: only configured destination names and known tools are label values."""
    m = Metrics("asterisk")
    now = utcnow()
    for n in range(50):
        call = make_call(n)
        t = Transfer(
            f"t{n}", call.id, "api", f"+3161234{n:04d}", DialTarget(number=f"+3161234{n:04d}"),
            "bridge", 20,
        )  # fmt: skip
        m.on_change(StoreChange(call.id, call, t, (CallEvent("transfer.requested", now, {}),)))
        tool = {"role": "tool_call", "tool": f"made_up_{n}"}
        m.on_change(StoreChange(call.id, events=(CallEvent("transcript", now, tool),)))
    s = samples(m)
    requested = {k[1] for k in s if k[0] == "callbridge_transfers_requested_total"}
    assert requested == {
        frozenset({("source", "api"), ("destination", "other"), ("mode", "bridge")})
    }
    tools = {k[1] for k in s if k[0] == "callbridge_assistant_tool_calls_total"}
    assert tools == {frozenset({("tool", "other")})}
    assert s[("callbridge_assistant_tool_calls_total", frozenset({("tool", "other")}))] == 50


async def test_analytics_range_is_utc_whatever_the_offset_and_must_be_ordered(
    db: Database, client: tuple[TestClient, str, Metrics]
) -> None:
    """Times are stored in UTC and compared as text: a bound with another offset, or without
    microseconds, must still select by the instant it names."""
    c, key, _ = client
    auth = {"Authorization": f"Bearer {key}"}
    store = CallStore(db)
    call = make_call()
    await store.save(call)
    transfer = bridged_transfer(call)
    await store.save_transfer(transfer)
    at = transfer.created_at

    async def count(since: datetime, until: datetime | None = None) -> int:
        params = {"since": since.isoformat()}
        if until is not None:
            params["until"] = until.isoformat()
        resp = await c.get("/api/v1/analytics/transfers", params=params, headers=auth)
        assert resp.status == 200, await resp.text()
        return sum(a["transfers"] for a in (await resp.json())["assistants"])

    plus5 = timezone(timedelta(hours=5))
    assert await count((at - timedelta(minutes=30)).astimezone(plus5)) == 1
    assert await count((at + timedelta(minutes=30)).astimezone(plus5)) == 0
    # A bound on the whole second before the transfer (no microseconds) includes it.
    assert await count(at.replace(microsecond=0), at + timedelta(seconds=1)) == 1
    resp = await c.get(
        "/api/v1/analytics/transfers",
        params={"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
        headers=auth,
    )
    assert resp.status == 422
    assert (await resp.json())["error"]["field"] == "until"
    for edge in ("9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"):  # beyond UTC's years
        resp = await c.get("/api/v1/analytics/transfers", params={"since": edge}, headers=auth)
        assert resp.status == 422
        assert (await resp.json())["error"]["field"] == "since"


async def test_a_disabled_webhook_holds_what_it_owes_until_enabled_again(
    db: Database, receiver: tuple[Receiver, str]
) -> None:
    """Disabling a webhook (a broken or compromised receiver) stops its pending deliveries
    too, not only new ones; they are sent once it is enabled again."""
    r, url = receiver
    store = CallStore(db)
    worker = WebhookWorker(db, FAST)
    store.subscribe(in_transaction=outbox_statements)
    service = WebhookService(db, on_change=worker.kick)
    hook, _ = await service.create(url, ["*"], SECRET, None)
    call = make_call()
    await store.save(call)
    await store.add_event(call.id, CallEvent("call.started", utcnow(), {}))  # pending, due
    await service.update(hook.id, {"enabled": False})
    # The worker is not started: nothing but these calls runs, and with no HTTP session an
    # attempt would fail loudly.
    assert await worker._schedule() == 5.0 and worker._drains == {}
    await worker._drain(hook.id)
    (owed,) = await service.deliveries(hook.id)
    assert owed["status"] == "pending" and owed["attempts"] == 0
    worker.start()
    try:
        await service.update(hook.id, {"enabled": True})
        await wait_for(lambda: len(r.got) == 1, "the owed delivery after enabling")
        assert json.loads(r.got[0][1])["id"] == owed["event_id"]
    finally:
        await worker.stop()


@pytest.mark.parametrize("key", ["url", "events", "secret", "enabled"])
async def test_removing_a_required_webhook_field_is_422_naming_it(
    client: tuple[TestClient, str, Metrics], key: str
) -> None:
    c, api_key, _ = client
    auth = {"Authorization": f"Bearer {api_key}"}
    resp = await c.post(
        "/api/v1/webhooks", json={"url": "http://127.0.0.1:1/h", "events": ["*"]}, headers=auth
    )
    hook = (await resp.json())["id"]
    resp = await c.patch(f"/api/v1/webhooks/{hook}", json={key: None}, headers=auth)
    assert resp.status == 422
    assert (await resp.json())["error"]["field"] == key
