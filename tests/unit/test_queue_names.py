"""Queue names (issue 9 §1): at least 2 characters, refused by the model with a 422 naming the
field, since the dialplan's `[callbridge-queue]` (`_[A-Za-z0-9].`) would not match a shorter
one and the transfer would fail later at the PBX."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bridge.calls.destinations import parse_internal
from bridge.calls.model import TransferCommand
from bridge.directory.models import QueueDestination
from tests.unit.test_api_validation import Api, api, assert_422  # noqa: F401 (fixture)


def queue(name: str) -> dict[str, str]:
    return {"type": "queue", "queue": name, "description": "Support queue"}


@pytest.mark.parametrize("name", ["a", "7", ""])
def test_a_queue_name_shorter_than_two_characters_is_refused(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        QueueDestination.model_validate(queue(name))
    assert info.value.errors()[0]["loc"] == ("queue",)
    with pytest.raises(ValueError):
        parse_internal(f"queue:{name}")
    with pytest.raises(ValidationError):
        TransferCommand(type="transfer", destination=f"queue:{name}")


@pytest.mark.parametrize("name", ["q1", "support", "a" * 64, "7-day.queue_2"])
def test_queue_names_of_two_to_64_characters_are_taken(name: str) -> None:
    assert QueueDestination.model_validate(queue(name)).queue == name
    assert parse_internal(f"queue:{name}").queue == name


def test_the_documented_pattern_is_the_one_checked() -> None:
    schema = QueueDestination.model_json_schema()
    schema = schema["$defs"].get("QueueDestination", schema)  # a $ref since fallbacks nest it
    assert schema["properties"]["queue"]["pattern"] == r"^[A-Za-z0-9][A-Za-z0-9_.-]{1,63}$"


async def test_the_api_answers_422_naming_the_queue_field(api: Api) -> None:  # noqa: F811
    body = {
        "name": "Desk",
        "llm_config": {"tools": [{"type": "transfer_call", "destinations": [queue("a")]}]},
    }
    status, error = await api.send("POST", "/assistants", body)
    assert status == 422, error
    assert error["error"]["code"] == "invalid-input"
    assert error["error"]["field"].endswith("queue"), error
    assert "2 to 64" in error["error"]["message"], error
    # A longer name is stored.
    body["llm_config"]["tools"][0]["destinations"] = [queue("q1")]  # type: ignore[index]
    status, created = await api.send("POST", "/assistants", body)
    assert status == 201, created
