"""The text test console over HTTP: `POST /api/v1/assistants/{id}/chat` on a real aiohttp
server and SQLite file, the offline router (MiniLM) as the assistant's provider."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.agent.chat import ChatConsole
from bridge.agent.providers import LlmProviders
from bridge.api.keys import create_api_key
from bridge.api.server import create_api_app
from bridge.config import Settings
from bridge.directory.service import DirectoryService
from bridge.store.db import Database
from tests.unit.test_api_directory import SEED_TOOLS_PATCH, Api, StubCalls, assert_error

ASSISTANT: dict[str, Any] = {
    "name": "Acme",
    "first_message": "Welcome to Acme, how can I help you?",
    "llm_config": {
        "provider": "local",
        "tools": [*SEED_TOOLS_PATCH["llm_config"]["tools"], {"type": "end_call"}],
    },
    "knowledge": [
        {"question": "What are your opening hours?", "answer": "We are open 9 to 5."},
    ],
}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    db = await Database.open(tmp_path / "api.sqlite3")
    directory = DirectoryService(db)
    llms = LlmProviders(Settings())
    console = ChatConsole(directory.get_assistant, llms.llm_for, Settings().agent)
    app = create_api_app(directory, StubCalls(), db, chat=console)
    client = TestClient(TestServer(app))
    await client.start_server()
    yield Api(client, await create_api_key(db, "tests"))
    await client.close()
    await db.close()


async def _assistant(api: Api) -> str:
    status, body, _ = await api.call("POST", "/assistants", ASSISTANT)
    assert status == 201, body
    return str(body["id"])


async def test_a_conversation_answers_then_reports_a_transfer_without_dialling(api: Api) -> None:
    aid = await _assistant(api)
    status, first, _ = await api.call(
        "POST", f"/assistants/{aid}/chat", {"message": "What are your opening hours?"}
    )
    assert status == 200, first
    assert first["replies"] == ["Welcome to Acme, how can I help you?", "We are open 9 to 5."]
    assert first["actions"] == [] and first["ended"] is False and first["llm_error"] is None
    cid = first["conversation_id"]

    status, second, _ = await api.call(
        "POST",
        f"/assistants/{aid}/chat",
        {"message": "I'd like to talk to someone in billing", "conversation_id": cid},
    )
    assert status == 200, second
    assert second["conversation_id"] == cid
    assert second["actions"] == [
        {
            "type": "transfer",
            "destination": "+31698765432",
            "description": "Billing department - for invoice and payment questions",
            "message": "I'm transferring you to the billing department.",
        }
    ]
    assert second["replies"] == ["I'm transferring you to the billing department."]
    assert second["ended"] is True

    status, body, _ = await api.call(
        "POST", f"/assistants/{aid}/chat", {"message": "hello?", "conversation_id": cid}
    )
    assert_error(status, body, 409, "conflict", "conversation_id")


async def test_goodbye_reports_end_call(api: Api) -> None:
    aid = await _assistant(api)
    status, body, _ = await api.call("POST", f"/assistants/{aid}/chat", {"message": "bye"})
    assert status == 200, body
    assert body["actions"] == [{"type": "end_call"}] and body["ended"] is True


async def test_unknown_conversation_and_assistant_are_404_naming_the_field(api: Api) -> None:
    aid = await _assistant(api)
    status, body, _ = await api.call(
        "POST", f"/assistants/{aid}/chat", {"message": "hi", "conversation_id": "conv_nope"}
    )
    assert_error(status, body, 404, "not-found", "conversation_id")
    status, body, _ = await api.call("POST", "/assistants/nope/chat", {"message": "hi"})
    assert status == 404 and body["error"]["code"] == "not-found", body


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "message"),
        ({"message": ""}, "message"),
        ({"message": 3}, "message"),
        ({"message": "x" * 2001}, "message"),
        ({"message": "hi", "conversation_id": 5}, "conversation_id"),
        ({"message": "hi", "extra": 1}, "extra"),
    ],
)
async def test_bad_input_is_422_naming_the_field(api: Api, payload: Any, field: str) -> None:
    aid = await _assistant(api)
    status, body, _ = await api.call("POST", f"/assistants/{aid}/chat", payload)
    assert_error(status, body, 422, "invalid-input", field)


async def test_not_json_is_400_and_no_key_is_401(api: Api) -> None:
    aid = await _assistant(api)
    status, body, _ = await api.call(
        "POST",
        f"/assistants/{aid}/chat",
        data=b"{nope",
        headers={"Content-Type": "application/json"},
    )
    assert_error(status, body, 400, "invalid-json")
    async with api.client.post(f"/api/v1/assistants/{aid}/chat", json={"message": "hi"}) as r:
        assert r.status == 401


async def test_the_chat_route_is_in_the_openapi_document(api: Api) -> None:
    _, doc, _ = await api.call("GET", "/openapi.json")
    op = doc["paths"]["/api/v1/assistants/{id}/chat"]["post"]
    assert set(op["responses"]) >= {"200", "401", "404", "409", "422"}
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ChatRequest"
    )
    assert "knowledge" in doc["components"]["schemas"]["AssistantIn"]["properties"]


async def test_knowledge_is_validated(api: Api) -> None:
    bad = {**ASSISTANT, "knowledge": [{"question": "Hours?"}]}
    status, body, _ = await api.call("POST", "/assistants", bad)
    assert_error(status, body, 422, "invalid-input", "knowledge.0.answer")
