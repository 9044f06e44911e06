"""The directory over HTTP: the seed's curl examples, validation errors, secrets, persistence.

A real aiohttp server (aiohttp.test_utils) on a real SQLite file; calls are a stub here
(test_api_http.py covers the calls routes).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from bridge.api.keys import create_api_key
from bridge.api.server import create_api_app
from bridge.directory.service import DirectoryService
from bridge.errors import NotFound
from bridge.store.db import Database

# The seed's "Example: Complete Transfer Setup", verbatim.
SEED_ASSISTANT: dict[str, Any] = {
    "name": "Support Assistant",
    "first_message": "Welcome to Acme support, how can I help you?",
    "llm_config": {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [
            {
                "role": "system",
                "content": "You are a support agent for Acme. Help customers with questions about"
                " products and services. Transfer only if:\n1. The customer explicitly asks for a"
                " human\n2. You cannot answer a question after 2 attempts\n3. There is a complaint"
                " that requires escalation",
            }
        ],
        "tools": [
            {
                "type": "transfer_call",
                "destinations": [
                    {
                        "type": "number",
                        "number": "+31612345678",
                        "description": "Human support assistant for complex issues or when"
                        " customer explicitly requests a human",
                        "message": "I'm transferring you to one of my colleagues, one moment"
                        " please.",
                    }
                ],
            },
            {"type": "end_call"},
        ],
    },
}
# The seed's "Step 1: Add Transfer Tool" PATCH body, verbatim.
SEED_TOOLS_PATCH: dict[str, Any] = {
    "llm_config": {
        "tools": [
            {
                "type": "transfer_call",
                "destinations": [
                    {
                        "type": "number",
                        "number": "+31612345678",
                        "description": "Sales team - for pricing and quotes",
                        "message": "I'm transferring you to our sales team, one moment please.",
                    },
                    {
                        "type": "number",
                        "number": "+31687654321",
                        "description": "Technical support - for product issues and troubleshooting",
                        "message": "I'm transferring you to technical support.",
                    },
                    {
                        "type": "number",
                        "number": "+31698765432",
                        "description": "Billing department - for invoice and payment questions",
                        "message": "I'm transferring you to the billing department.",
                    },
                ],
            }
        ]
    }
}
# The seed's "Step 1: Create SIP Trunk", verbatim.
SEED_TRUNK: dict[str, Any] = {
    "name": "Office PBX",
    "host": "pbx.example.com",
    "port": 5060,
    "username": "hms-sovereign",
    "password": "secure-password",
}


class StubCalls:
    async def list_calls(self, status: Any, limit: int) -> list[dict[str, Any]]:
        return []

    async def get_call(self, call_id: str) -> dict[str, Any]:
        raise NotFound(f"call {call_id} not found")

    async def control(self, call_id: str, command: Any) -> dict[str, Any]:
        raise NotFound(f"call {call_id} not found")


class Api:
    def __init__(self, client: TestClient, key: str) -> None:
        self.client = client
        self.key = key

    async def call(
        self, method: str, path: str, body: Any = None, **kwargs: Any
    ) -> tuple[int, Any, str]:
        headers = {"Authorization": f"Bearer {self.key}", **kwargs.pop("headers", {})}
        if body is not None:
            kwargs["json"] = body
        async with self.client.request(method, f"/api/v1{path}", headers=headers, **kwargs) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text else None), text


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    db = await Database.open(tmp_path / "api.sqlite3")
    app = create_api_app(DirectoryService(db), StubCalls(), db)
    client = TestClient(TestServer(app))
    await client.start_server()
    yield Api(client, await create_api_key(db, "tests"))
    await client.close()
    await db.close()


def assert_error(status: int, body: Any, want_status: int, code: str, field: Any = None) -> None:
    assert status == want_status, body
    assert body["error"]["code"] == code, body
    if field is not None:
        assert body["error"].get("field") == field, body


# --- the seed's examples ---------------------------------------------------------------------


async def test_seed_complete_assistant_then_patch_tools_keeps_the_rest(api: Api) -> None:
    status, created, _ = await api.call("POST", "/assistants", SEED_ASSISTANT)
    assert status == 201
    assert created["llm_config"] == SEED_ASSISTANT["llm_config"] | {
        "tools": [
            {
                **SEED_ASSISTANT["llm_config"]["tools"][0],
                "destinations": [SEED_ASSISTANT["llm_config"]["tools"][0]["destinations"][0]],
            },
            {"type": "end_call"},
        ]
    }
    assert created["name"] == "Support Assistant" and created["id"]
    assert created["created_at"].endswith("Z")

    status, patched, _ = await api.call("PATCH", f"/assistants/{created['id']}", SEED_TOOLS_PATCH)
    assert status == 200, patched
    assert patched["name"] == created["name"]
    assert patched["first_message"] == created["first_message"]
    assert patched["llm_config"]["messages"] == created["llm_config"]["messages"]
    assert patched["llm_config"]["provider"] == "openai"
    assert patched["llm_config"]["model"] == "gpt-4o-mini"
    assert patched["llm_config"]["tools"] == SEED_TOOLS_PATCH["llm_config"]["tools"]

    status, got, _ = await api.call("GET", f"/assistants/{created['id']}")
    assert status == 200 and got == patched
    status, listed, _ = await api.call("GET", "/assistants")
    assert status == 200 and listed == {"data": [patched]}


async def test_seed_step2_system_prompt_patch(api: Api) -> None:
    _, a, _ = await api.call("POST", "/assistants", SEED_ASSISTANT)
    prompt = {"messages": [{"role": "system", "content": "You are a customer service agent."}]}
    status, b, _ = await api.call("PATCH", f"/assistants/{a['id']}", {"llm_config": prompt})
    assert status == 200
    assert b["llm_config"]["messages"] == prompt["messages"]
    assert b["llm_config"]["tools"] == a["llm_config"]["tools"]


async def test_seed_trunk_and_number_assignment(api: Api) -> None:
    status, trunk, text = await api.call("POST", "/sip-trunks", SEED_TRUNK)
    assert status == 201
    assert trunk["has_password"] is True and "password" not in trunk
    assert "secure-password" not in text
    assert {k: trunk[k] for k in ("name", "host", "port", "username")} == {
        k: SEED_TRUNK[k] for k in ("name", "host", "port", "username")
    }
    status, number, _ = await api.call("POST", "/numbers", {"number": "+31201234567"})
    assert status == 201
    status, number, _ = await api.call(
        "PATCH", f"/numbers/{number['id']}", {"transfer_trunk_id": trunk["id"]}
    )
    assert status == 200 and number["transfer_trunk_id"] == trunk["id"]

    status, body, _ = await api.call("DELETE", f"/sip-trunks/{trunk['id']}")
    assert_error(status, body, 409, "conflict")
    assert body["error"]["details"]["numbers"] == [{"id": number["id"], "number": "+31201234567"}]


async def test_password_never_returned_nor_logged(api: Api) -> None:
    with capture_logs() as logs:
        _, trunk, t1 = await api.call("POST", "/sip-trunks", SEED_TRUNK)
        _, _, t2 = await api.call("GET", f"/sip-trunks/{trunk['id']}")
        _, _, t3 = await api.call("GET", "/sip-trunks")
        _, patched, t4 = await api.call("PATCH", f"/sip-trunks/{trunk['id']}", {"port": 5070})
        # a rejected body that contains the password must not echo it either
        _, _, t5 = await api.call("POST", "/sip-trunks", {**SEED_TRUNK, "port": 0})
        _, _, t6 = await api.call("PATCH", f"/sip-trunks/{trunk['id']}", {"password": 5})
    for text in (t1, t2, t3, t4, t5, t6):
        assert "secure-password" not in text
    assert "secure-password" not in repr(logs)
    assert patched["port"] == 5070 and patched["has_password"] is True


async def test_crud_status_codes(api: Api) -> None:
    _, a, _ = await api.call("POST", "/assistants", {"name": "Minimal"})
    assert a["llm_config"] == {"provider": "local", "model": None, "messages": [], "tools": []}
    status, body, text = await api.call("DELETE", f"/assistants/{a['id']}")
    assert status == 204 and text == ""
    status, body, _ = await api.call("GET", f"/assistants/{a['id']}")
    assert_error(status, body, 404, "not-found")
    status, body, _ = await api.call("PATCH", f"/assistants/{a['id']}", {"name": "x"})
    assert_error(status, body, 404, "not-found")
    status, body, _ = await api.call("DELETE", f"/numbers/{a['id']}")
    assert_error(status, body, 404, "not-found")


async def test_number_references_and_duplicates(api: Api) -> None:
    status, body, _ = await api.call(
        "POST", "/numbers", {"number": "+31201234567", "assistant_id": "x"}
    )
    assert_error(status, body, 422, "invalid-input", "assistant_id")
    _, n, _ = await api.call("POST", "/numbers", {"number": "+31201234567"})
    status, body, _ = await api.call("PATCH", f"/numbers/{n['id']}", {"transfer_trunk_id": "x"})
    assert_error(status, body, 422, "invalid-input", "transfer_trunk_id")
    status, body, _ = await api.call("POST", "/numbers", {"number": "+31201234567"})
    assert_error(status, body, 409, "conflict", "number")


# --- validation errors -------------------------------------------------------------------------


def _with_destination(dest: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "A",
        "llm_config": {"tools": [{"type": "transfer_call", "destinations": [dest]}]},
    }


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/assistants",
            _with_destination({"type": "number", "number": "0612345678", "description": "x"}),
            "llm_config.tools.0.destinations.0.number",
        ),
        (
            "/assistants",
            _with_destination({"type": "sip", "sip_uri": "sip:bad uri@x", "description": "x"}),
            "llm_config.tools.0.destinations.0.sip_uri",
        ),
        (
            "/assistants",
            _with_destination({"type": "number", "number": "+31612345678"}),
            "llm_config.tools.0.destinations.0.description",
        ),
        (
            "/assistants",
            _with_destination({"type": "fax", "number": "+31612345678", "description": "x"}),
            "llm_config.tools.0.destinations.0.type",
        ),
        ("/assistants", {"name": "A", "llm_config": {"tools": [{"type": "x"}]}},
         "llm_config.tools.0.type"),
        ("/assistants", {"name": "A", "colour": "red"}, "colour"),
        ("/assistants", {"name": "A", "llm_config": {"temperature": 1}}, "llm_config.temperature"),
        ("/assistants", {"name": 123}, "name"),
        ("/assistants", {"first_message": "hi"}, "name"),
        ("/assistants", {"name": ""}, "name"),
        ("/sip-trunks", {**SEED_TRUNK, "port": 0}, "port"),
        ("/sip-trunks", {**SEED_TRUNK, "port": 70000}, "port"),
        ("/sip-trunks", {**SEED_TRUNK, "port": "abc"}, "port"),
        ("/sip-trunks", {**SEED_TRUNK, "host": "sip://pbx.example.com"}, "host"),
        ("/sip-trunks", {**SEED_TRUNK, "transport": "sctp"}, "transport"),
        ("/sip-trunks", {"name": "no host"}, "host"),
        ("/numbers", {"number": "+31 20 123"}, "number"),
        ("/numbers", {}, "number"),
    ],
)  # fmt: skip
async def test_post_validation_errors(api: Api, path: str, body: Any, field: str) -> None:
    status, err, text = await api.call("POST", path, body)
    assert_error(status, err, 422, "invalid-input", field)
    assert err["error"]["message"].startswith(field)
    assert err["error"]["details"][0]["field"] == field
    assert all({"field", "message", "type"} == set(d) for d in err["error"]["details"])
    assert '"input"' not in text


async def test_patch_validation_errors(api: Api) -> None:
    _, a, _ = await api.call("POST", "/assistants", SEED_ASSISTANT)
    status, err, _ = await api.call("PATCH", f"/assistants/{a['id']}", {"id": "other"})
    assert_error(status, err, 422, "invalid-input", "id")
    dest = {"type": "number", "number": "+3161", "description": "x"}
    patch = {"llm_config": {"tools": [{"type": "transfer_call", "destinations": [dest]}]}}
    status, err, _ = await api.call("PATCH", f"/assistants/{a['id']}", patch)
    assert_error(status, err, 422, "invalid-input", "llm_config.tools.0.destinations.0.number")
    _, t, _ = await api.call("POST", "/sip-trunks", SEED_TRUNK)
    status, err, _ = await api.call("PATCH", f"/sip-trunks/{t['id']}", {"port": 70000})
    assert_error(status, err, 422, "invalid-input", "port")
    status, err, _ = await api.call("PATCH", f"/sip-trunks/{t['id']}", {"name": None})
    assert_error(status, err, 422, "invalid-input", "name")


async def test_merge_patch_content_type_is_accepted(api: Api) -> None:
    _, a, _ = await api.call("POST", "/assistants", SEED_ASSISTANT)
    status, b, _ = await api.call(
        "PATCH",
        f"/assistants/{a['id']}",
        data=json.dumps({"first_message": None}),
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert status == 200 and b["first_message"] is None


# --- persistence -------------------------------------------------------------------------------


async def test_objects_survive_reopening_the_database(tmp_path: Path) -> None:
    path = tmp_path / "persist.sqlite3"
    created: dict[str, Any] = {}
    for round_ in (1, 2):
        db = await Database.open(path)
        client = TestClient(TestServer(create_api_app(DirectoryService(db), StubCalls(), db)))
        await client.start_server()
        if round_ == 1:
            created["key"] = await create_api_key(db, "persist")
        api = Api(client, created["key"])
        try:
            if round_ == 1:
                _, created["a"], _ = await api.call("POST", "/assistants", SEED_ASSISTANT)
                _, created["t"], _ = await api.call("POST", "/sip-trunks", SEED_TRUNK)
                body = {"number": "+31201234567", "assistant_id": created["a"]["id"]}
                _, created["n"], _ = await api.call("POST", "/numbers", body)
            else:
                for kind, path_ in (("a", "assistants"), ("t", "sip-trunks"), ("n", "numbers")):
                    status, got, _ = await api.call("GET", f"/{path_}/{created[kind]['id']}")
                    assert status == 200 and got == created[kind]
        finally:
            await client.close()
            await db.close()
