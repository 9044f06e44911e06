"""DirectoryService on a real SQLite file: CRUD, merge patch, references, hooks, persistence."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from bridge.directory.models import AssistantIn, NumberIn, Trunk, TrunkIn
from bridge.directory.service import DirectoryService, field_path, merge_patch
from bridge.errors import Conflict, InvalidInput, NotFound
from bridge.store.db import Database

SEED_ASSISTANT: dict[str, Any] = {
    "name": "Support Assistant",
    "first_message": "Welcome to Acme support, how can I help you?",
    "llm_config": {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "You are a support agent for Acme."}],
        "tools": [
            {
                "type": "transfer_call",
                "destinations": [
                    {
                        "type": "number",
                        "number": "+31612345678",
                        "description": "Human support",
                        "message": "I'm transferring you to one of my colleagues.",
                    }
                ],
            },
            {"type": "end_call"},
        ],
    },
}
TRUNK: dict[str, Any] = {
    "name": "Office PBX",
    "host": "pbx.example.com",
    "port": 5060,
    "username": "hms-sovereign",
    "password": "secure-password",
}


class Hooks:
    def __init__(self, fail: bool = False) -> None:
        self.saved: list[Trunk] = []
        self.deleted: list[str] = []
        self.fail = fail

    async def on_saved(self, trunk: Trunk) -> None:
        self.saved.append(trunk)
        if self.fail:
            raise RuntimeError("PBX down")

    async def on_deleted(self, trunk_id: str) -> None:
        self.deleted.append(trunk_id)
        if self.fail:
            raise RuntimeError("PBX down")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(tmp_path / "dir.sqlite3")
    yield database
    await database.close()


@pytest.fixture
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture
def svc(db: Database, hooks: Hooks) -> DirectoryService:
    return DirectoryService(db, on_trunk_saved=hooks.on_saved, on_trunk_deleted=hooks.on_deleted)


async def test_assistant_crud(svc: DirectoryService) -> None:
    a = await svc.create_assistant(AssistantIn.model_validate(SEED_ASSISTANT))
    assert uuid.UUID(a.id).version == 4
    assert a.created_at.tzinfo is not None and a.created_at.utcoffset() == UTC.utcoffset(None)
    assert (await svc.get_assistant(a.id)).public_dict() == a.public_dict()
    assert [x.id for x in await svc.list_assistants()] == [a.id]
    await svc.delete_assistant(a.id)
    with pytest.raises(NotFound):
        await svc.get_assistant(a.id)
    with pytest.raises(NotFound):
        await svc.delete_assistant(a.id)


async def test_patch_assistant_deep_merges_and_replaces_lists(svc: DirectoryService) -> None:
    a = await svc.create_assistant(AssistantIn.model_validate(SEED_ASSISTANT))
    tools = [{"type": "end_call"}]
    b = await svc.patch_assistant(a.id, {"llm_config": {"tools": tools}})
    assert b.name == "Support Assistant"
    assert b.first_message == SEED_ASSISTANT["first_message"]
    assert b.llm_config.provider == "openai" and b.llm_config.model == "gpt-4o-mini"
    assert len(b.llm_config.messages) == 1
    assert [t.type for t in b.llm_config.tools] == ["end_call"]
    assert b.created_at == a.created_at and b.updated_at > a.updated_at


async def test_patch_null_clears_optional_and_restores_default(svc: DirectoryService) -> None:
    a = await svc.create_assistant(AssistantIn.model_validate(SEED_ASSISTANT))
    b = await svc.patch_assistant(a.id, {"first_message": None, "llm_config": {"model": None}})
    assert b.first_message is None and b.llm_config.model is None
    assert b.llm_config.provider == "openai"
    with pytest.raises(InvalidInput) as exc:
        await svc.patch_assistant(a.id, {"name": None})
    assert exc.value.field == "name"


async def test_patch_validation_error_names_the_json_path(svc: DirectoryService) -> None:
    a = await svc.create_assistant(AssistantIn.model_validate(SEED_ASSISTANT))
    dest = {"type": "number", "number": "0612", "description": "x"}
    bad = {"type": "transfer_call", "destinations": [dest]}
    with pytest.raises(InvalidInput) as exc:
        await svc.patch_assistant(a.id, {"llm_config": {"tools": [bad]}})
    assert exc.value.field == "llm_config.tools.0.destinations.0.number"
    # nothing was written
    assert (await svc.get_assistant(a.id)).public_dict() == a.public_dict()


async def test_trunk_patch_keeps_password_and_hooks_run(
    svc: DirectoryService, hooks: Hooks
) -> None:
    t = await svc.create_trunk(TrunkIn.model_validate(TRUNK))
    assert hooks.saved[-1].id == t.id
    assert t.public_dict()["has_password"] is True and "password" not in t.public_dict()
    t2 = await svc.patch_trunk(t.id, {"port": 5070})
    assert t2.port == 5070
    secret = await svc.get_trunk_secret(t.id)
    assert secret.password is not None
    assert secret.password.get_secret_value() == "secure-password"
    assert len(hooks.saved) == 2
    t3 = await svc.patch_trunk(t.id, {"password": None})
    assert t3.password is None and t3.public_dict()["has_password"] is False
    await svc.delete_trunk(t.id)
    assert hooks.deleted == [t.id]


async def test_hook_failure_never_fails_the_request(db: Database) -> None:
    hooks = Hooks(fail=True)
    svc = DirectoryService(db, hooks.on_saved, hooks.on_deleted)
    t = await svc.create_trunk(TrunkIn.model_validate(TRUNK))
    await svc.delete_trunk(t.id)
    assert len(hooks.saved) == 1 and hooks.deleted == [t.id]


async def test_number_references_are_checked(svc: DirectoryService) -> None:
    with pytest.raises(InvalidInput) as exc:
        await svc.create_number(NumberIn(number="+31201234567", assistant_id="nope"))
    assert exc.value.field == "assistant_id"
    with pytest.raises(InvalidInput) as exc:
        await svc.create_number(NumberIn(number="+31201234567", transfer_trunk_id="nope"))
    assert exc.value.field == "transfer_trunk_id"

    a = await svc.create_assistant(AssistantIn.model_validate(SEED_ASSISTANT))
    t = await svc.create_trunk(TrunkIn.model_validate(TRUNK))
    n = await svc.create_number(NumberIn(number="+31201234567", assistant_id=a.id))
    n = await svc.patch_number(n.id, {"transfer_trunk_id": t.id})
    assert n.transfer_trunk_id == t.id and n.assistant_id == a.id

    with pytest.raises(Conflict) as conflict:
        await svc.delete_trunk(t.id)
    assert conflict.value.details["numbers"] == [{"id": n.id, "number": "+31201234567"}]
    with pytest.raises(Conflict):
        await svc.delete_assistant(a.id)
    with pytest.raises(Conflict) as dup:
        await svc.create_number(NumberIn(number="+31201234567"))
    assert dup.value.field == "number"

    await svc.patch_number(n.id, {"transfer_trunk_id": None, "assistant_id": None})
    await svc.delete_trunk(t.id)
    await svc.delete_assistant(a.id)


async def test_patch_number_to_its_own_number_is_not_a_conflict(svc: DirectoryService) -> None:
    n = await svc.create_number(NumberIn(number="+31201234567"))
    assert (await svc.patch_number(n.id, {"number": "+31201234567", "name": "x"})).name == "x"


async def test_find_number_with_and_without_plus(svc: DirectoryService) -> None:
    plus = await svc.create_number(NumberIn(number="+31201234567"))
    bare = await svc.create_number(NumberIn(number="1000"))
    assert (await svc.find_number("+31201234567")).id == plus.id  # type: ignore[union-attr]
    assert (await svc.find_number("31201234567")).id == plus.id  # type: ignore[union-attr]
    assert (await svc.find_number("+1000")).id == bare.id  # type: ignore[union-attr]
    assert await svc.find_number("999") is None
    assert await svc.find_number("") is None
    # an exact match wins over the other spelling
    exact = await svc.create_number(NumberIn(number="31201234567"))
    assert (await svc.find_number("31201234567")).id == exact.id  # type: ignore[union-attr]


async def test_everything_survives_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "persist.sqlite3"
    db = await Database.open(path)
    svc = DirectoryService(db)
    a = await svc.create_assistant(AssistantIn.model_validate(SEED_ASSISTANT))
    t = await svc.create_trunk(TrunkIn.model_validate(TRUNK))
    n = await svc.create_number(
        NumberIn(number="+31201234567", assistant_id=a.id, transfer_trunk_id=t.id)
    )
    await db.close()

    db = await Database.open(path)
    svc = DirectoryService(db)
    assert (await svc.get_assistant(a.id)).public_dict() == a.public_dict()
    assert (await svc.get_number(n.id)).public_dict() == n.public_dict()
    trunk = await svc.get_trunk_secret(t.id)
    assert trunk.password is not None
    assert trunk.password.get_secret_value() == "secure-password"
    await db.close()


def test_merge_patch_is_rfc7396() -> None:
    target = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert merge_patch(target, {"a": {"c": [3]}, "d": None, "e": {"f": None}}) == {
        "a": {"b": 1, "c": [3]},
        "e": {},
    }
    assert target == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # not mutated


def test_field_path_drops_union_tags() -> None:
    data = {"tools": [{"type": "transfer_call", "destinations": [{"type": "number"}]}]}
    loc = ("tools", 0, "transfer_call", "destinations", 0, "number", "description")
    assert field_path(loc, data) == "tools.0.destinations.0.description"
    data2 = {"tools": [{"type": "x", "destinations": [{"type": "number", "number": "1"}]}]}
    loc2 = ("tools", 0, "x", "destinations", 0, "number", "number")
    assert field_path(loc2, data2) == "tools.0.destinations.0.number"


async def test_reads_by_id_come_from_memory_until_a_write(svc: DirectoryService) -> None:
    """Issue 8 §4: a transfer's policy check reads its number and trunk without a database
    job; every write through the service (a PATCH during a call counts) is seen at once."""
    t = await svc.create_trunk(TrunkIn.model_validate(TRUNK))
    n = await svc.create_number(NumberIn(number="+31201234567"))
    assert (await svc.get_number(n.id)).transfer_trunk_id is None
    reads = 0
    real = svc._store.get

    async def counted(*args: Any) -> Any:
        nonlocal reads
        reads += 1
        return await real(*args)

    svc._store.get = counted  # type: ignore[method-assign]
    assert (await svc.get_number(n.id)).number == "+31201234567"
    assert (await svc.get_trunk(t.id)).name == "Office PBX"
    assert reads == 1  # the number from memory; the trunk read once
    await svc.patch_number(n.id, {"transfer_trunk_id": t.id})
    assert (await svc.get_number(n.id)).transfer_trunk_id == t.id
    await svc.patch_number(n.id, {"transfer_trunk_id": None})
    await svc.delete_trunk(t.id)
    with pytest.raises(NotFound):
        await svc.get_trunk(t.id)
