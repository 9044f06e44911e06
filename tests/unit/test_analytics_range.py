"""GET /analytics/transfers without `since` covers the last 30 days (as the ops page asks),
not all time: each request reads every transfer in its range. A real SQLite store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp.test_utils import TestClient

from bridge.calls.store import CallStore
from bridge.ops.metrics import Metrics
from bridge.store.db import Database
from tests.unit.test_ops import bridged_transfer, client, db, make_call  # noqa: F401 (fixtures)


async def _transfers(c: TestClient, key: str, **params: str) -> tuple[int, dict[str, Any]]:
    resp = await c.get(
        "/api/v1/analytics/transfers", params=params, headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    return sum(a["transfers"] for a in body["assistants"]), body


async def test_the_default_range_is_the_last_30_days(
    db: Database,  # noqa: F811
    client: tuple[TestClient, str, Metrics],  # noqa: F811
) -> None:
    c, key, _ = client
    store = CallStore(db)
    now = datetime.now(UTC)
    for n, age in ((1, timedelta(days=1)), (2, timedelta(days=29)), (3, timedelta(days=31))):
        call = make_call(n)
        call.started_at = now - age
        await store.save(call)
        transfer = bridged_transfer(call)
        transfer.created_at = now - age
        await store.save_transfer(transfer)
    count, body = await _transfers(c, key)
    assert count == 2  # the one 31 days old is out
    since = datetime.fromisoformat(body["since"].replace("Z", "+00:00"))
    assert abs(now - since - timedelta(days=30)) < timedelta(minutes=5)
    assert body["until"] is None
    # All time is asked for; `until` alone gives the 30 days before it.
    assert (await _transfers(c, key, since="1970-01-01T00:00:00Z"))[0] == 3
    until = (now - timedelta(days=2)).isoformat()
    assert (await _transfers(c, key, until=until))[0] == 2  # 29 and 31 days old, not 1
