"""What the API refuses before it reaches the PBX or the caller: deeply nested JSON, text a TTS
cannot speak, trunks the PBX would refuse, lax types; and the OpenAPI document carrying the
same patterns the validation uses."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.api.keys import create_api_key
from bridge.api.server import create_api_app
from bridge.directory import models
from bridge.directory.service import DirectoryService
from bridge.errors import InvalidInput
from bridge.store.db import Database
from tests.unit.test_api_http import ACTIVE, FakeCalls


class Api:
    def __init__(self, client: TestClient, key: str, calls: FakeCalls) -> None:
        self.client, self.key, self.calls = client, key, calls

    async def send(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        async with self.client.request(
            method, f"/api/v1{path}", data=data, headers=headers
        ) as resp:
            text = await resp.text()
            assert resp.content_type == "application/json" or text == "", text
            return resp.status, (json.loads(text) if text else None)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    db = await Database.open(tmp_path / "api.sqlite3")
    calls = FakeCalls()
    app = create_api_app(DirectoryService(db), calls, db, health=None, max_body_bytes=64 * 1024)
    client = TestClient(TestServer(app))
    await client.start_server()
    yield Api(client, await create_api_key(db, "tests"), calls)
    await client.close()
    await db.close()


def assert_422(got: tuple[int, Any], field: str) -> None:
    status, body = got
    assert status == 422, body
    assert body["error"]["code"] == "invalid-input"
    assert body["error"]["field"] == field, body


# --- JSON nesting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/assistants"),
        ("POST", "/sip-trunks"),
        ("POST", f"/calls/{ACTIVE}/control"),
        ("POST", "/destinations/test"),
    ],
)
@pytest.mark.parametrize("depth", [1000, 30_000])
async def test_deep_json_nesting_is_a_400(api: Api, method: str, path: str, depth: int) -> None:
    raw = ('{"a":' + "[" * depth + "]" * depth + "}").encode()
    status, body = await api.send(method, path, raw=raw)
    assert status == 400, body
    assert body["error"]["code"] == "invalid-json"
    assert "nested deeper than" in body["error"]["message"]


async def test_deep_nesting_in_a_patch_is_a_400(api: Api) -> None:
    status, created = await api.send("POST", "/assistants", {"name": "a"})
    assert status == 201
    deep: Any = {}
    for _ in range(500):  # under the parser's limit, over ours: merge_patch recurses
        deep = {"x": deep}
    status, body = await api.send("PATCH", f"/assistants/{created['id']}", {"llm_config": deep})
    assert status == 400, body
    assert body["error"]["code"] == "invalid-json"


async def test_ordinary_nesting_is_accepted(api: Api) -> None:
    body = {
        "name": "a",
        "llm_config": {
            "tools": [
                {
                    "type": "transfer_call",
                    "destinations": [
                        {"type": "number", "number": "+31612345678", "description": "desk"}
                    ],
                }
            ]
        },
    }
    assert (await api.send("POST", "/assistants", body))[0] == 201


# --- text the caller must hear -----------------------------------------------------------

UNSPEAKABLE = ["hello\x00world", "\x07", "a\x1bb", "a\x85b", "\ud800", "\ue000", "\uffff", "\ufdd0"]


@pytest.mark.parametrize("text", UNSPEAKABLE)
async def test_control_text_must_be_speakable(api: Api, text: str) -> None:
    for body, field in [
        ({"type": "say", "message": text}, "message"),
        ({"type": "end_call", "message": text}, "message"),
        ({"type": "transfer", "destination": "+31612345678", "message": text}, "message"),
    ]:
        got = await api.send("POST", f"/calls/{ACTIVE}/control", body)
        assert_422(got, field)
        if text != "\ud800":  # a lone surrogate is already refused as "not a unicode string"
            assert "cannot be spoken" in got[1]["error"]["message"]
    assert api.calls.commands == []


@pytest.mark.parametrize("text", UNSPEAKABLE)
async def test_assistant_text_must_be_speakable(api: Api, text: str) -> None:
    assert_422(await api.send("POST", "/assistants", {"name": "a", "first_message": text}),
               "first_message")  # fmt: skip
    dest = {"type": "number", "number": "+31612345678", "description": "desk", "message": text}
    tools = [{"type": "transfer_call", "destinations": [dest]}]
    got = await api.send("POST", "/assistants", {"name": "a", "llm_config": {"tools": tools}})
    assert_422(got, "llm_config.tools.0.destinations.0.message")
    sip = {
        "type": "sip",
        "sip_uri": "sip:desk@pbx.example.com",
        "description": "d",
        "message": text,
    }
    tools = [{"type": "transfer_call", "destinations": [sip]}]
    got = await api.send("POST", "/assistants", {"name": "a", "llm_config": {"tools": tools}})
    assert_422(got, "llm_config.tools.0.destinations.0.message")


async def test_speakable_text_with_newlines_and_unicode_is_accepted(api: Api) -> None:
    status, _ = await api.send(
        "POST", f"/calls/{ACTIVE}/control", {"type": "say", "message": "Één moment,\n\tplease 👋"}
    )
    assert status == 202
    status, _ = await api.send("POST", "/assistants", {"name": "a", "first_message": "Grüß Gott"})
    assert status == 201


# --- trunks as the PBX parses them -------------------------------------------------------

BAD_HOSTS = [
    "[abc",
    "::1",
    "2001:db8::1",
    "[::1",
    "[1::2::3]",
    "[fe80::1%eth0]",
    "1.2.3.999",
    "256.0.0.1",
    "pbx..example.com",
    "-pbx.example.com",
    "pbx-.example.com",
    "pbx.example.com.",
    "pbx.example.com:5060",
    "sip:pbx.example.com",
    "pbx example.com",
    "pbx_1.example.com",
    "a" * 64 + ".example.com",
]
GOOD_HOSTS = ["pbx.example.com", "carrier", "10.0.0.1", "[::1]", "[2001:db8::1]",
              "[::ffff:192.0.2.1]", "sip-1.a1.example.com"]  # fmt: skip


@pytest.mark.parametrize("host", BAD_HOSTS)
async def test_trunk_hosts_the_pbx_refuses_are_422(api: Api, host: str) -> None:
    assert_422(await api.send("POST", "/sip-trunks", {"name": "t", "host": host}), "host")


@pytest.mark.parametrize("host", GOOD_HOSTS)
async def test_trunk_hosts_the_pbx_accepts_are_stored(api: Api, host: str) -> None:
    status, body = await api.send("POST", "/sip-trunks", {"name": "t", "host": host})
    assert status == 201, body
    assert body["host"] == host


@pytest.mark.parametrize(
    "username", ["a?b", "a/b", "a@b", "a b", "a;b", "a&b", "a,b", "a=b", "a$b", "a(b)", "a%zz"]
)
async def test_trunk_usernames_outside_the_sip_user_charset_are_422(
    api: Api, username: str
) -> None:
    body = {"name": "t", "host": "pbx.example.com", "username": username, "password": "p"}
    assert_422(await api.send("POST", "/sip-trunks", body), "username")


async def test_trunk_username_with_escapes_and_marks_is_stored(api: Api) -> None:
    body = {"name": "t", "host": "pbx.example.com", "username": "a.b-c_d+31%40x", "password": "p"}
    assert (await api.send("POST", "/sip-trunks", body))[0] == 201


async def test_trunk_password_with_a_nul_is_422_without_echo(api: Api) -> None:
    body = {"name": "t", "host": "pbx.example.com", "username": "u", "password": "s3cret\x00"}
    got = await api.send("POST", "/sip-trunks", body)
    assert_422(got, "password")
    assert "s3cret" not in json.dumps(got[1])


async def test_trunk_patch_is_validated_the_same_way(api: Api) -> None:
    status, trunk = await api.send("POST", "/sip-trunks", {"name": "t", "host": "pbx.example.com"})
    assert status == 201
    assert_422(await api.send("PATCH", f"/sip-trunks/{trunk['id']}", {"host": "[abc"}), "host")
    assert_422(await api.send("PATCH", f"/sip-trunks/{trunk['id']}", {"port": "5060"}), "port")


# --- strict types ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"port": "5060"}, "port"),
        ({"port": True}, "port"),
        ({"port": 5060.5}, "port"),
        ({"registration": 0}, "registration"),
        ({"registration": "true"}, "registration"),
        ({"name": 5}, "name"),
        ({"transport": 1}, "transport"),
    ],
)
async def test_trunk_types_are_strict(api: Api, body: dict[str, Any], field: str) -> None:
    assert_422(await api.send("POST", "/sip-trunks", {"name": "t", "host": "h", **body}), field)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (f"/calls/{ACTIVE}/control", {"type": "transfer", "destination": "+31612345678",
                                      "ring_timeout": "20"}, "ring_timeout"),
        (f"/calls/{ACTIVE}/control", {"type": "say", "message": 5}, "message"),
        ("/destinations/test", {"destination": "+31612345678", "ring_timeout": "20"},
         "ring_timeout"),
        ("/destinations/test", {"destination": "+31612345678", "number_id": 5}, "number_id"),
        ("/numbers", {"number": "+31201234567", "assistant_id": 5}, "assistant_id"),
        ("/assistants", {"name": "a", "llm_config": {"provider": 5}}, "llm_config.provider"),
    ],
)  # fmt: skip
async def test_request_types_are_strict(
    api: Api, path: str, body: dict[str, Any], field: str
) -> None:
    assert_422(await api.send("POST", path, body), field)


async def test_an_integral_number_is_an_integer_as_json_schema_says(api: Api) -> None:
    status, body = await api.send("POST", "/sip-trunks", {"name": "t", "host": "h", "port": 5080.0})
    assert status == 201, body
    assert body["port"] == 5080 and isinstance(body["port"], int)


async def test_integer_where_a_number_is_documented_is_accepted(api: Api) -> None:
    body = {"type": "transfer", "destination": "+31612345678", "ring_timeout": 20}
    assert (await api.send("POST", f"/calls/{ACTIVE}/control", body))[0] == 202


# --- the OpenAPI document carries the patterns ---------------------------------------------


async def _document(api: Api) -> dict[str, Any]:
    async with api.client.get("/api/v1/openapi.json") as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def test_openapi_document_carries_the_validation_patterns(api: Api) -> None:
    schemas = (await _document(api))["components"]["schemas"]
    trunk = schemas["TrunkIn"]["properties"]
    assert trunk["host"]["pattern"] == models.HOST_PATTERN
    assert schemas["TrunkPatch"]["properties"]["host"]["pattern"] == models.HOST_PATTERN
    assert trunk["username"]["anyOf"][0]["pattern"] == models.SIP_USER_PATTERN
    assert trunk["port"]["type"] == "integer"
    assert trunk["registration"]["type"] == "boolean"
    number = schemas["NumberDestination"]["properties"]["number"]
    assert number["pattern"] == models.E164.pattern
    sip = schemas["SipDestination"]["properties"]["sip_uri"]
    assert sip["pattern"] == models.SIP_URI.pattern
    say = schemas["SayCommand"]["properties"]["message"]
    assert say["pattern"] == models.SPEAKABLE_PATTERN
    first = schemas["AssistantIn"]["properties"]["first_message"]["anyOf"][0]
    assert first["pattern"] == models.SPEAKABLE_PATTERN
    destination = schemas["TransferCommand"]["properties"]["destination"]["pattern"]
    assert models.E164.pattern in destination and models.SIP_URI.pattern in destination
    assert schemas["DestinationTestRequest"]["properties"]["destination"]["pattern"] == destination


async def test_openapi_sip_uri_pattern_follows_the_grammar_constant(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SIP URI grammar is rewritten elsewhere: the document takes whatever the constant is.
    monkeypatch.setattr(models, "SIP_URI", re.compile(r"^sip:changed$"))
    from bridge.api.openapi import build_openapi
    from bridge.api.routes import ROUTES

    doc = build_openapi(ROUTES, version="t")
    sip = doc["components"]["schemas"]["SipDestination"]["properties"]["sip_uri"]
    assert sip["pattern"] == r"^sip:changed$"


def test_patterns_agree_with_the_validators() -> None:
    host = re.compile(models.HOST_PATTERN)
    for value in GOOD_HOSTS:
        assert host.match(value), value
    for value in BAD_HOSTS:
        assert not host.match(value), value
    assert re.compile(models.SPEAKABLE_PATTERN).match("Één moment 👋\n")
    for value in UNSPEAKABLE:
        if value != "\ud800":  # refused before the pattern, by the JSON string parser
            assert not re.compile(models.SPEAKABLE_PATTERN).match(value), value
    assert models.SPEAKABLE_PATTERN.isascii()  # any regex engine reads the document


# --- found by fuzzing the document (schemathesis) ------------------------------------------


async def test_a_number_destination_may_omit_its_type(api: Api) -> None:
    dest = {"number": "+31612345678", "description": "desk"}  # "type" defaults to "number"
    tools = [{"type": "transfer_call", "destinations": [dest]}]
    status, body = await api.send(
        "POST", "/assistants", {"name": "a", "llm_config": {"tools": tools}}
    )
    assert status == 201, body
    assert body["llm_config"]["tools"][0]["destinations"][0]["type"] == "number"
    dest = {"type": "fax", "number": "+31612345678", "description": "desk"}
    tools = [{"type": "transfer_call", "destinations": [dest]}]
    got = await api.send("POST", "/assistants", {"name": "a", "llm_config": {"tools": tools}})
    assert_422(got, "llm_config.tools.0.destinations.0.type")


@pytest.mark.parametrize("collection", ["assistants", "sip-trunks", "numbers"])
async def test_patch_refuses_an_unknown_key_even_when_null(api: Api, collection: str) -> None:
    create = {
        "assistants": {"name": "a"},
        "sip-trunks": {"name": "t", "host": "pbx.example.com"},
        "numbers": {"number": "+31201234567"},
    }[collection]
    status, obj = await api.send("POST", f"/{collection}", create)
    assert status == 201
    assert_422(await api.send("PATCH", f"/{collection}/{obj['id']}", {"nmae": None}), "nmae")


async def test_patch_document_offers_null_only_where_it_removes_a_field(api: Api) -> None:
    schemas = (await _document(api))["components"]["schemas"]
    name = schemas["AssistantPatch"]["properties"]["name"]
    assert name["type"] == "string" and "default" not in name  # required: not nullable
    first = schemas["AssistantPatch"]["properties"]["first_message"]
    assert {"type": "null"} in first["anyOf"]
    _, obj = await api.send("POST", "/assistants", {"name": "a"})
    assert_422(await api.send("PATCH", f"/assistants/{obj['id']}", {"name": None}), "name")


async def test_transfer_stats_since_must_be_iso_8601(api: Api) -> None:
    async def stats(since: Any) -> dict[str, Any]:
        return {"since": since}

    api.calls.transfer_stats = stats  # type: ignore[attr-defined]
    assert_422(await api.send("GET", "/transfers/stats?since=0.5"), "since")
    status, _ = await api.send("GET", "/transfers/stats?since=2026-01-31T00:00:00Z")
    assert status == 200


# --- objects stored before these checks ----------------------------------------------------


async def test_objects_stored_before_the_checks_still_load(tmp_path: Path) -> None:
    """A trunk host or a first_message stored by an earlier version, that the API now refuses,
    does not break listing them (nor the daemon's provisioning or its calls)."""
    db = await Database.open(tmp_path / "old.sqlite3")
    try:
        now = "2026-01-01T00:00:00Z"
        trunk = {"name": "t", "host": "::1", "port": 5060, "transport": "udp",
                 "username": "a/b", "password": None, "registration": False}  # fmt: skip
        assistant = {"name": "a", "first_message": "hi\x00", "llm_config": {}}
        for table, doc in (("trunks", trunk), ("assistants", assistant)):
            await db.execute(
                f"INSERT INTO {table} (id, doc, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (f"old-{table}", json.dumps(doc), now, now),
            )
        directory = DirectoryService(db)
        assert [t.host for t in await directory.list_trunks()] == ["::1"]
        assert (await directory.get_assistant("old-assistants")).first_message == "hi\x00"
        # ...while the API refuses to store them again.
        with pytest.raises(InvalidInput, match="host"):
            await directory.patch_trunk("old-trunks", {"name": "renamed"})
    finally:
        await db.close()


# --- fallback chains (issue 9 §3) ---------------------------------------------------------


async def test_fallbacks_are_validated_and_read_back_in_the_seed_shape(api: Api) -> None:
    seed = {"type": "number", "number": "+31612345678", "description": "Sales"}
    tools = [{"type": "transfer_call", "destinations": [seed]}]
    created = await api.send("POST", "/assistants", {"name": "a", "llm_config": {"tools": tools}})
    assert created[0] == 201
    # The seed's shape reads back unchanged: no `fallbacks` (nor `dtmf`) key when unset.
    assert created[1]["llm_config"]["tools"][0]["destinations"] == [{**seed, "message": None}]
    chained = {
        **seed,
        "fallbacks": [
            {"type": "extension", "extension": "1001", "description": "Alice"},
            {"number": "+3161", "description": "overflow"},
        ],
    }
    tools = [{"type": "transfer_call", "destinations": [seed, chained]}]
    got = await api.send("POST", "/assistants", {"name": "a", "llm_config": {"tools": tools}})
    assert_422(got, "llm_config.tools.0.destinations.1.fallbacks.1.number")
    nested = {**seed, "fallbacks": [{**seed, "fallbacks": [seed]}]}
    tools = [{"type": "transfer_call", "destinations": [nested]}]
    got = await api.send("POST", "/assistants", {"name": "a", "llm_config": {"tools": tools}})
    assert_422(got, "llm_config.tools.0.destinations.0.fallbacks.0")
    assert "cannot have fallbacks of its own" in got[1]["error"]["message"]
    good = {**seed, "fallbacks": [{"type": "extension", "extension": "1001", "description": "A"}]}
    tools = [{"type": "transfer_call", "destinations": [good]}]
    status, body = await api.send(
        "POST", "/assistants", {"name": "b", "llm_config": {"tools": tools}}
    )
    assert status == 201, body
    shown = body["llm_config"]["tools"][0]["destinations"][0]
    assert shown["fallbacks"] == [
        {"type": "extension", "extension": "1001", "description": "A", "message": None}
    ]


async def test_control_fallbacks_are_validated(api: Api) -> None:
    base = {"type": "transfer", "destination": "extension:1001"}
    got = await api.send("POST", f"/calls/{ACTIVE}/control", {**base, "fallbacks": ["+31", "x"]})
    assert_422(got, "fallbacks.0")
    got = await api.send(
        "POST", f"/calls/{ACTIVE}/control", {**base, "mode": "blind", "fallbacks": ["+31612345678"]}
    )
    assert_422(got, "fallbacks")
    got = await api.send("POST", f"/calls/{ACTIVE}/control", {**base, "fallbacks": []})
    assert_422(got, "fallbacks")
    assert api.calls.commands == []
    status, _ = await api.send(
        "POST",
        f"/calls/{ACTIVE}/control",
        {**base, "fallbacks": ["extension:1002", "+31612345678"]},
    )
    assert status == 202
    assert api.calls.commands[-1][1].fallbacks == ["extension:1002", "+31612345678"]


# --- warm transfer fields (issue 9 §2) -----------------------------------------------------


WARM = {"type": "transfer", "destination": "+31612345678", "mode": "warm"}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"moh_class": "x y"}, "moh_class"),
        ({"accept_timeout": 0}, "accept_timeout"),
        ({"accept_timeout": 500}, "accept_timeout"),
        ({"require_accept": "yes"}, "require_accept"),
        ({"brief": "a\x00b"}, "brief"),
        ({"mode": "lukewarm"}, "mode"),
    ],
)
async def test_warm_fields_are_checked(api: Api, extra: dict[str, Any], field: str) -> None:
    assert_422(await api.send("POST", f"/calls/{ACTIVE}/control", {**WARM, **extra}), field)


async def test_a_warm_transfer_command_is_accepted(api: Api) -> None:
    body = {**WARM, "brief": "Invoice 42.", "require_accept": True, "accept_timeout": 10}
    assert (await api.send("POST", f"/calls/{ACTIVE}/control", body))[0] == 202


async def test_a_warm_destination_reads_back_and_the_seeds_shape_stays(api: Api) -> None:
    warm = {
        "number": "+31612345678",
        "description": "Billing",
        "transfer_mode": "warm",
        "brief": "Billing question.",
        "require_accept": True,
        "moh_class": "jazz",
    }
    seed = {"number": "+31687654321", "description": "Support"}
    body = {
        "name": "a",
        "llm_config": {"tools": [{"type": "transfer_call", "destinations": [warm, seed]}]},
    }
    status, made = await api.send("POST", "/assistants", body)
    assert status == 201, made
    warm_back, seed_back = made["llm_config"]["tools"][0]["destinations"]
    assert {k: warm_back[k] for k in warm} == warm
    assert "transfer_mode" not in seed_back and "brief" not in seed_back
    bad = {**body, "llm_config": {"tools": [{"type": "transfer_call", "destinations": [
        {**warm, "moh_class": "../etc"}]}]}}  # fmt: skip
    field = "llm_config.tools.0.destinations.0.moh_class"  # a number: no type tag
    assert_422(await api.send("POST", "/assistants", bad), field)
