"""A bounded, seeded fuzz of every route with a body or a query: random JSON and mutations of
valid bodies. Whatever arrives, the answer is a JSON error or a success, never a 5xx (the
issue-7 run of schemathesis found the 500s that this keeps out). A few hundred requests to an
in-process server: about a second."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.api.keys import create_api_key
from bridge.api.server import create_api_app
from bridge.directory.service import DirectoryService
from bridge.store.db import Database
from tests.unit.test_api_http import ACTIVE, FakeCalls

SEED = 20261130
ROUNDS = 25  # per route and kind of body

VALID: dict[str, dict[str, Any]] = {
    "/assistants": {
        "name": "Support",
        "first_message": "Hello",
        "llm_config": {
            "provider": "local",
            "messages": [{"role": "system", "content": "Be brief."}],
            "tools": [
                {
                    "type": "transfer_call",
                    "destinations": [
                        {"type": "number", "number": "+31612345678", "description": "desk"},
                        {"type": "sip", "sip_uri": "sip:a@pbx.example.com", "description": "b"},
                    ],
                },
                {"type": "end_call"},
            ],
        },
    },
    "/sip-trunks": {
        "name": "t",
        "host": "pbx.example.com",
        "port": 5060,
        "username": "u",
        "password": "p",
        "transport": "udp",
        "registration": False,
    },
    "/numbers": {"number": "+31201234567", "name": "main"},
    f"/calls/{ACTIVE}/control": {
        "type": "transfer",
        "destination": "+31612345678",
        "message": "One moment",
        "ring_timeout": 20,
    },
    "/destinations/test": {"destination": "sip:desk@pbx.example.com", "ring_timeout": 5},
}
STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "\uffff",
    "é" * 300,
    "x" * 5000,
    "+31612345678",
    "sip:x&Local/+1900@h",
    "[abc",
    "::1",
    "null",
    "{}",
    "%00",
    "../..",
    "${X}",
    "5060",
    "true",
    "2026-11-30T00:00:00Z",
    "0.5",
    "-1",
    "\u202e",
    "🙂",
]
NUMBERS = [0, -1, 1, 65535, 65536, 2**31, 2**63, 10**30, 0.5, -0.0, 1e308, 5060.0, True, False]
KEYS = [
    "name",
    "type",
    "host",
    "port",
    "number",
    "message",
    "destination",
    "llm_config",
    "tools",
    "destinations",
    "sip_uri",
    "password",
    "username",
    "registration",
    "mode",
    "ring_timeout",
    "number_id",
    "assistant_id",
    "transfer_trunk_id",
    "",
    "__proto__",
]


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(6 if depth < 4 else 3)
    if kind == 0:
        return rng.choice(STRINGS)
    if kind == 1:
        return rng.choice(NUMBERS)
    if kind == 2:
        return rng.choice([None, True, False, ""])
    if kind == 3:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS): _value(rng, depth + 1) for _ in range(rng.randrange(5))}


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, child in node.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            out += _paths(child, (*prefix, index))
    return out


def _mutate(rng: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(body)
    for _ in range(rng.randrange(1, 4)):
        paths = _paths(body)
        if not paths:
            body[rng.choice(KEYS)] = _value(rng)
            continue
        path = rng.choice(paths)
        parent: Any = body
        for part in path[:-1]:
            parent = parent[part]
        action = rng.randrange(3)
        if action == 0:
            parent[path[-1]] = _value(rng)
        elif action == 1 and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif isinstance(parent, dict):
            parent[rng.choice(KEYS)] = _value(rng)
    return body


class Fuzz:
    def __init__(self, client: TestClient, key: str) -> None:
        self.client, self.key = client, key
        self.sent = 0

    async def send(
        self, method: str, path: str, body: Any = None, query: str = "", raw: str | None = None
    ) -> int:
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        data = raw if raw is not None else None if body is None else json.dumps(body)
        url = f"/api/v1{path}{query}"
        async with self.client.request(method, url, data=data, headers=headers) as resp:
            text = await resp.text()
            self.sent += 1
            assert resp.status < 500, f"{method} {url} {data!r:.300} -> {resp.status} {text}"
            assert resp.content_type == "application/json" or resp.status == 204
            if resp.status >= 400:
                assert isinstance(json.loads(text)["error"]["code"], str)
            return resp.status


@pytest.fixture
async def fuzz(tmp_path: Path) -> AsyncIterator[Fuzz]:
    db = await Database.open(tmp_path / "fuzz.sqlite3")
    calls = FakeCalls()

    async def test_destination(destination: str, number_id: Any, ring_timeout: Any) -> Any:
        return {"destination": destination, "route": "-", "outcome": "answered", "duration_ms": 1}

    async def transfer_stats(since: Any) -> dict[str, Any]:
        return {"since": since}

    calls.test_destination = test_destination  # type: ignore[attr-defined]
    calls.transfer_stats = transfer_stats  # type: ignore[attr-defined]
    app = create_api_app(DirectoryService(db), calls, db, health=None, max_body_bytes=64 * 1024)
    client = TestClient(TestServer(app))
    await client.start_server()
    yield Fuzz(client, await create_api_key(db, "fuzz"))
    await client.close()
    await db.close()


async def test_no_body_or_query_makes_a_5xx(fuzz: Fuzz) -> None:
    rng = random.Random(SEED)
    created: dict[str, str] = {}
    for path, valid in VALID.items():
        status = await fuzz.send("POST", path, valid)
        assert status in (201, 202, 200), path
        for _ in range(ROUNDS):
            await fuzz.send("POST", path, _mutate(rng, valid))
            depth = rng.randrange(30, 3000)  # the 2 KB body that answered 500
            raw = json.dumps({rng.choice(KEYS): 0}).replace("0", "[" * depth + "]" * depth)
            await fuzz.send("POST", path, raw=raw)
            await fuzz.send(
                "POST",
                path,
                _value(rng, 1)
                if rng.random() < 0.2
                else {k: _value(rng, 1) for k in rng.sample(KEYS, 4)},
            )
    for collection in ("/assistants", "/sip-trunks"):
        status = await fuzz.send("POST", collection, VALID[collection])
        async with fuzz.client.get(
            f"/api/v1{collection}", headers={"Authorization": f"Bearer {fuzz.key}"}
        ) as resp:
            created[collection] = (await resp.json())["data"][0]["id"]
    for collection, obj_id in created.items():
        for _ in range(ROUNDS):
            patch = _mutate(rng, VALID[collection])
            await fuzz.send("PATCH", f"{collection}/{obj_id}", patch)
            await fuzz.send("PATCH", f"{collection}/{obj_id}", {rng.choice(KEYS): _value(rng)})
    for _ in range(ROUNDS):
        value = rng.choice([*STRINGS[:6], "active", "-5", "1e3", "999999999999"])
        await fuzz.send("GET", "/calls", query=f"?limit={value}&status={rng.choice(STRINGS)}")
        await fuzz.send("GET", "/transfers/stats", query=f"?since={rng.choice(STRINGS)}")
    assert fuzz.sent > 400
