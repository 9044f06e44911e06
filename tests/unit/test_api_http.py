"""The HTTP layer: API keys and auth, error shapes, the calls routes, health and OpenAPI.

CallControl is a small in-test implementation of the Protocol; the real call service is covered
by the integration tests on a real Asterisk.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.api.errors import STATUS_BY_ERROR_ID
from bridge.api.keys import create_api_key, list_api_keys, revoke_api_key, verify_api_key
from bridge.api.ports import CallControl
from bridge.api.routes import ROUTES
from bridge.api.server import create_api_app
from bridge.calls.model import (
    CallStatus,
    ControlCommand,
    EndCallCommand,
    SayCommand,
    TransferCommand,
)
from bridge.directory.service import DirectoryService
from bridge.errors import BridgeError, Conflict, DestinationNotAllowed, NotFound, PbxUnavailable
from bridge.store.db import Database

ACTIVE = "11111111-1111-4111-8111-111111111111"
ENDED = "22222222-2222-4222-8222-222222222222"


def _call(call_id: str, status: str) -> dict[str, Any]:
    return {"id": call_id, "status": status, "pbx": "asterisk", "number": "+31201234567"}


class FakeCalls:
    """Implements CallControl with two calls; records the commands it accepts."""

    def __init__(self) -> None:
        self.calls = {ACTIVE: _call(ACTIVE, "active"), ENDED: _call(ENDED, "ended")}
        self.commands: list[tuple[str, ControlCommand]] = []
        self.list_args: list[tuple[CallStatus | None, int]] = []
        self.pbx_up = True

    async def list_calls(self, status: CallStatus | None, limit: int) -> list[dict[str, Any]]:
        self.list_args.append((status, limit))
        calls = [c for c in self.calls.values() if status is None or c["status"] == status]
        return calls[:limit]

    async def get_call(self, call_id: str) -> dict[str, Any]:
        if call_id == "explode":
            raise RuntimeError("boom: Traceback secret-internal-detail")
        if call_id not in self.calls:
            raise NotFound(f"call {call_id} not found")
        return {**self.calls[call_id], "events": [{"type": "answered"}], "transfers": []}

    async def control(self, call_id: str, command: ControlCommand) -> dict[str, Any]:
        if call_id not in self.calls:
            raise NotFound(f"call {call_id} not found")
        if self.calls[call_id]["status"] == "ended":
            raise Conflict("the call has ended")
        if not self.pbx_up:
            raise PbxUnavailable("the PBX connection is down")
        if isinstance(command, TransferCommand) and command.destination == "+31600000000":
            raise DestinationNotAllowed("not an allowed destination", field="destination")
        self.commands.append((call_id, command))
        result = {"id": call_id, "accepted": command.type}
        if isinstance(command, TransferCommand):
            result["transfer_id"] = "33333333-3333-4333-8333-333333333333"
        return result


class Harness:
    def __init__(self, client: TestClient, db: Database, calls: FakeCalls, key: str) -> None:
        self.client, self.db, self.calls, self.key = client, db, calls, key

    async def call(
        self, method: str, path: str, body: Any = None, *, auth: str | None = "key", **kw: Any
    ) -> tuple[int, Any, Any]:
        headers = dict(kw.pop("headers", {}))
        if auth == "key":
            headers["Authorization"] = f"Bearer {self.key}"
        elif auth is not None:
            headers["Authorization"] = auth
        if body is not None:
            kw["json"] = body
        async with self.client.request(method, path, headers=headers, **kw) as resp:
            text = await resp.text()
            assert text == "" or resp.content_type == "application/json", text
            return resp.status, (json.loads(text) if text else None), resp


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    db = await Database.open(tmp_path / "http.sqlite3")
    calls = FakeCalls()

    async def probe() -> dict[str, Any]:
        return {"pbx": "asterisk", "pbx_connected": calls.pbx_up, "status": "ignored"}

    app = create_api_app(DirectoryService(db), calls, db, health=probe, max_body_bytes=64 * 1024)
    client = TestClient(TestServer(app))
    await client.start_server()
    yield Harness(client, db, calls, await create_api_key(db, "tests"))
    await client.close()
    await db.close()


def assert_error(got: tuple[int, Any, Any], status: int, code: str, field: Any = None) -> None:
    assert got[0] == status, got[1]
    assert got[1]["error"]["code"] == code, got[1]
    assert isinstance(got[1]["error"]["message"], str)
    if field is not None:
        assert got[1]["error"].get("field") == field, got[1]


# --- keys and auth ---------------------------------------------------------------------------


async def test_api_keys_are_hashed_listed_and_revocable(h: Harness) -> None:
    key = await create_api_key(h.db, "cli")
    assert key.startswith("cb_") and len(key) >= 40
    assert await verify_api_key(h.db, key)
    assert not await verify_api_key(h.db, key + "x")
    assert not await verify_api_key(h.db, "not-a-key")
    rows = await h.db.fetchall("SELECT * FROM api_keys")
    assert all(key not in json.dumps(dict(r)) for r in rows)  # only the digest is stored
    listed = await list_api_keys(h.db)
    assert {r["name"] for r in listed} == {"tests", "cli"}
    assert all(set(r) == {"id", "name", "created_at", "revoked_at"} for r in listed)
    cli_id = next(r["id"] for r in listed if r["name"] == "cli")
    assert await revoke_api_key(h.db, cli_id)
    assert not await revoke_api_key(h.db, cli_id)
    assert not await verify_api_key(h.db, key)
    # revoke by the key itself
    other = await create_api_key(h.db, "other")
    assert await revoke_api_key(h.db, other)
    assert not await verify_api_key(h.db, other)


@pytest.mark.parametrize(
    ("auth", "invalid_token"),
    [(None, False), ("Bearer", False), ("Basic dXNlcjpwYXNz", False), ("Bearer cb_wrong", True)],
)
async def test_auth_rejected(h: Harness, auth: str | None, invalid_token: bool) -> None:
    got = await h.call("GET", "/api/v1/assistants", auth=auth)
    assert_error(got, 401, "unauthorized")
    challenge = got[2].headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer")
    assert ('error="invalid_token"' in challenge) is invalid_token


async def test_a_key_seen_valid_is_checked_from_memory_until_any_revocation(
    h: Harness, tmp_path: Path
) -> None:
    """Issue 8 §4: a request does not queue on the database thread for its key; a key the
    CLI revokes (another process, its own connection) is refused by the running daemon at
    once."""
    key = await create_api_key(h.db, "cached")
    assert (await h.call("GET", "/api/v1/sip-trunks", auth=f"Bearer {key}"))[0] == 200
    reads = 0
    real = h.db.fetchone

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await real(*args, **kwargs)

    h.db.fetchone = counted  # type: ignore[method-assign]
    assert (await h.call("GET", "/api/v1/sip-trunks", auth=f"Bearer {key}"))[0] == 200
    assert reads == 0  # from memory
    cli = await Database.open(tmp_path / "http.sqlite3")  # `callbridge api-key revoke`
    try:
        assert await revoke_api_key(cli, key)
    finally:
        await cli.close()
    got = await h.call("GET", "/api/v1/sip-trunks", auth=f"Bearer {key}")
    assert_error(got, 401, "unauthorized")
    assert reads == 1  # the cache was emptied: the database said no


async def test_auth_good_then_revoked(h: Harness) -> None:
    key = await create_api_key(h.db, "short-lived")
    assert (await h.call("GET", "/api/v1/sip-trunks", auth=f"Bearer {key}"))[0] == 200
    assert (await h.call("GET", "/api/v1/sip-trunks", auth=f"bearer {key}"))[0] == 200
    await revoke_api_key(h.db, key)
    assert_error(
        await h.call("GET", "/api/v1/sip-trunks", auth=f"Bearer {key}"), 401, "unauthorized"
    )


async def test_unknown_route_needs_auth_first(h: Harness) -> None:
    assert_error(await h.call("GET", "/api/v1/nope", auth=None), 401, "unauthorized")


async def test_health_and_openapi_are_public(h: Harness) -> None:
    status, body, _ = await h.call("GET", "/api/v1/health", auth=None)
    assert status == 200
    assert body == {"status": "ok", "pbx": "asterisk", "pbx_connected": True}
    status, doc, _ = await h.call("GET", "/api/v1/openapi.json", auth=None)
    assert status == 200 and doc["openapi"].startswith("3.1")


# --- generic error shapes ------------------------------------------------------------------------


async def test_unknown_route_and_wrong_method_are_json(h: Harness) -> None:
    assert_error(await h.call("GET", "/api/v1/nope"), 404, "not-found")
    assert_error(await h.call("GET", "/elsewhere"), 404, "not-found")
    got = await h.call("DELETE", "/api/v1/assistants")
    assert_error(got, 405, "method-not-allowed")
    assert set(got[2].headers["Allow"].split(",")) == {"GET", "POST"}
    assert_error(await h.call("PUT", "/api/v1/calls/x/control"), 405, "method-not-allowed")


async def test_body_errors(h: Harness) -> None:
    json_ct = {"Content-Type": "application/json"}
    got = await h.call("POST", "/api/v1/assistants", data=b"{not json", headers=json_ct)
    assert_error(got, 400, "invalid-json")
    got = await h.call("POST", "/api/v1/assistants", data=b"NaN", headers=json_ct)
    assert_error(got, 400, "invalid-json")
    got = await h.call("POST", "/api/v1/assistants", data=b"\xff\xfe", headers=json_ct)
    assert_error(got, 400, "invalid-json")
    assert_error(await h.call("POST", "/api/v1/assistants", [1, 2]), 400, "invalid-body")
    assert_error(await h.call("POST", "/api/v1/assistants", "text"), 400, "invalid-body")
    got = await h.call(
        "POST", "/api/v1/assistants", data=b'{"name": "x"}', headers={"Content-Type": "text/plain"}
    )
    assert_error(got, 415, "unsupported-media-type")
    got = await h.call("POST", f"/api/v1/calls/{ACTIVE}/control", data=b"")
    assert_error(got, 415, "unsupported-media-type")
    huge = {"name": "x", "first_message": "a" * (70 * 1024)}
    assert_error(await h.call("POST", "/api/v1/assistants", huge), 413, "payload-too-large")


async def test_huge_chunked_body_is_413(h: Harness) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "'
        for _ in range(100):
            yield b"a" * 1024
        yield b'"}'

    got = await h.call(
        "POST", "/api/v1/assistants", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_error(got, 413, "payload-too-large")


async def test_unexpected_exception_is_500_without_trace(h: Harness) -> None:
    got = await h.call("GET", "/api/v1/calls/explode")
    assert_error(got, 500, "internal-error")
    assert "boom" not in json.dumps(got[1]) and "Traceback" not in json.dumps(got[1])


def _subclasses(cls: type[BridgeError]) -> list[type[BridgeError]]:
    return [cls, *(s for sub in cls.__subclasses__() for s in _subclasses(sub))]


def test_status_table_covers_every_domain_error() -> None:
    # A new error_id without a status would be answered as a 500: catch it here.
    for cls in _subclasses(BridgeError):
        assert cls.error_id in STATUS_BY_ERROR_ID, cls
    assert STATUS_BY_ERROR_ID["destination-not-allowed"] == 403


# --- calls ------------------------------------------------------------------------------------


async def test_list_calls_with_filters(h: Harness) -> None:
    status, body, _ = await h.call("GET", "/api/v1/calls")
    assert status == 200 and len(body["data"]) == 2
    assert h.calls.list_args[-1] == (None, 100)
    status, body, _ = await h.call("GET", "/api/v1/calls?status=ended&limit=500")
    assert status == 200 and [c["id"] for c in body["data"]] == [ENDED]
    assert h.calls.list_args[-1] == (CallStatus.ENDED, 500)


@pytest.mark.parametrize(
    ("query", "field"),
    [("status=ringing", "status"), ("limit=0", "limit"), ("limit=501", "limit"),
     ("limit=abc", "limit"), ("staus=active", "staus")],
)  # fmt: skip
async def test_list_calls_bad_query(h: Harness, query: str, field: str) -> None:
    assert_error(await h.call("GET", f"/api/v1/calls?{query}"), 422, "invalid-input", field)


async def test_get_call(h: Harness) -> None:
    status, body, _ = await h.call("GET", f"/api/v1/calls/{ACTIVE}")
    assert status == 200 and body["events"] and body["transfers"] == []
    assert_error(await h.call("GET", "/api/v1/calls/unknown"), 404, "not-found")


async def test_seed_control_transfer(h: Harness) -> None:
    body = {
        "type": "transfer",
        "destination": "+31612345678",
        "message": "One moment, I'm transferring you to a colleague.",
    }
    status, resp, _ = await h.call("POST", f"/api/v1/calls/{ACTIVE}/control", body)
    assert status == 202
    assert resp == {
        "id": ACTIVE,
        "accepted": "transfer",
        "transfer_id": "33333333-3333-4333-8333-333333333333",
    }
    call_id, command = h.calls.commands[-1]
    assert call_id == ACTIVE and isinstance(command, TransferCommand)
    assert command.destination == "+31612345678" and command.message == body["message"]


async def test_control_other_commands_and_sip_destination(h: Harness) -> None:
    url = f"/api/v1/calls/{ACTIVE}/control"
    assert (await h.call("POST", url, {"type": "say", "message": "hello"}))[0] == 202
    assert (await h.call("POST", url, {"type": "end_call"}))[0] == 202
    sip = {"type": "transfer", "destination": "sip:alice@pbx.example.com:5070"}
    assert (await h.call("POST", url, sip))[0] == 202
    kinds = [type(c) for _, c in h.calls.commands]
    assert kinds == [SayCommand, EndCallCommand, TransferCommand]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "transfer", "destination": "0612345678"}, "destination"),
        ({"type": "transfer", "destination": "sip:bad uri@x"}, "destination"),
        ({"type": "transfer"}, "destination"),
        ({"type": "transfer", "destination": "+31612345678", "extra": 1}, "extra"),
        ({"type": "transfer", "destination": "+31612345678", "ring_timeout": 0}, "ring_timeout"),
        ({"type": "hold"}, "type"),
        ({"destination": "+31612345678"}, "type"),
        ({"type": "say"}, "message"),
        ({"type": "say", "message": 5}, "message"),
    ],
)
async def test_control_validation_errors(h: Harness, body: Any, field: str) -> None:
    got = await h.call("POST", f"/api/v1/calls/{ACTIVE}/control", body)
    assert_error(got, 422, "invalid-input", field)
    assert h.calls.commands == []


async def test_control_domain_errors(h: Harness) -> None:
    transfer = {"type": "transfer", "destination": "+31612345678"}
    assert_error(await h.call("POST", "/api/v1/calls/nope/control", transfer), 404, "not-found")
    assert_error(await h.call("POST", f"/api/v1/calls/{ENDED}/control", transfer), 409, "conflict")
    forbidden = {"type": "transfer", "destination": "+31600000000"}
    got = await h.call("POST", f"/api/v1/calls/{ACTIVE}/control", forbidden)
    assert_error(got, 403, "destination-not-allowed", "destination")
    h.calls.pbx_up = False
    got = await h.call("POST", f"/api/v1/calls/{ACTIVE}/control", transfer)
    assert_error(got, 503, "pbx-unavailable")
    assert (await h.call("GET", "/api/v1/health", auth=None))[1]["pbx_connected"] is False


# --- OpenAPI -----------------------------------------------------------------------------------


async def test_openapi_document(h: Harness) -> None:
    _, doc, _ = await h.call("GET", "/api/v1/openapi.json", auth=None)
    schemas = doc["components"]["schemas"]
    for route in ROUTES:
        op = doc["paths"][route.full_path][route.method.lower()]
        assert str(route.status) in op["responses"]
        if route.request is not None:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in schemas
        assert ("security" in op) is route.public
    for name in ("AssistantIn", "AssistantPatch", "TrunkIn", "NumberIn", "ControlRequest",
                 "TransferCommand", "SipTrunk", "ErrorResponse", "CallDetail"):  # fmt: skip
        assert name in schemas, name
    assert "password" not in schemas["SipTrunk"]["properties"]
    assert schemas["TrunkIn"]["properties"]["password"]["anyOf"][0]["writeOnly"] is True
    params = doc["paths"]["/api/v1/calls"]["get"]["parameters"]
    assert {p["name"] for p in params} == {"status", "limit"}
    # every $ref resolves
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(doc)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_fake_satisfies_the_protocol() -> None:
    calls: CallControl = FakeCalls()
    assert calls is not None
