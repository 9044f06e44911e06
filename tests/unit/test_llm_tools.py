"""Tool schemas built from an assistant's config, and the model's calls parsed into intents."""

from __future__ import annotations

import json

import pytest

from bridge.directory.models import LlmConfig
from bridge.llm.base import ToolCall
from bridge.llm.tools import (
    EndCallIntent,
    ToolError,
    Toolset,
    TransferIntent,
    build_destinations,
    slug,
)

SEED_TOOLS = [
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
            },
            {
                "type": "sip",
                "sip_uri": "sip:billing@pbx.example.com",
                "description": "Billing department - for invoice and payment questions",
            },
        ],
    },
    {"type": "end_call"},
]


@pytest.fixture
def toolset() -> Toolset:
    return Toolset.from_assistant_tools(LlmConfig(tools=SEED_TOOLS).tools)  # type: ignore[arg-type]


def call(name: str, args: object) -> ToolCall:
    return ToolCall("call_1", name, args if isinstance(args, str) else json.dumps(args))


def test_slug_takes_the_head_of_the_description() -> None:
    assert slug("Sales team - for pricing and quotes") == "sales_team"
    assert slug("Human support assistant for complex issues") == "human_support_assistant_for"
    assert slug("Billing: invoices") == "billing"
    assert slug("¿?") == "destination"


def test_keys_are_unique_and_stable() -> None:
    tools = [
        {
            "type": "transfer_call",
            "destinations": [
                {"type": "number", "number": "+31600000001", "description": "Sales"},
                {"type": "number", "number": "+31600000002", "description": "Sales"},
            ],
        }
    ]
    keys = [d.key for d in build_destinations(tools)]
    assert keys == ["sales", "sales_2"]
    assert keys == [d.key for d in build_destinations(tools)]


def test_transfer_schema_is_an_enum_without_numbers(toolset: Toolset) -> None:
    specs = {s.name: s.to_openai() for s in toolset.specs}
    assert set(specs) == {"transfer_call", "end_call"}
    fn = specs["transfer_call"]["function"]
    dest = fn["parameters"]["properties"]["destination"]
    assert dest["enum"] == ["sales_team", "technical_support", "billing_department"]
    assert "Technical support - for product issues" in dest["description"]
    assert fn["parameters"]["required"] == ["destination"]
    text = json.dumps(specs)
    assert "+3161" not in text and "sip:" not in text  # the model never sees a target
    assert "choices" not in text
    end = specs["end_call"]["function"]["parameters"]
    assert end["required"] == [] and "reason" in end["properties"]


def test_parse_transfer_uses_the_configured_message(toolset: Toolset) -> None:
    intent = toolset.parse(call("transfer_call", {"destination": "sales_team", "message": "x"}))
    assert isinstance(intent, TransferIntent)
    assert intent.destination.target == "+31612345678"
    assert intent.preface == "I'm transferring you to our sales team, one moment please."
    assert intent.call_id == "call_1"
    own = toolset.parse(
        call("transfer_call", {"destination": "billing_department", "message": "Hold on."})
    )
    assert isinstance(own, TransferIntent)
    assert own.destination.type == "sip" and own.preface == "Hold on."
    bare = toolset.parse(call("transfer_call", {"destination": "technical_support"}))
    assert isinstance(bare, TransferIntent) and bare.preface is None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"destination": "+31900123456"}, "not a destination"),
        ({"destination": "sales"}, "sales_team, technical_support, billing_department"),
        ({}, "needs a destination"),
        ("{not json", "not valid JSON"),
        ("[1]", "JSON object"),
    ],
)
def test_bad_transfer_calls_raise_tool_errors_for_the_model(
    toolset: Toolset, args: object, needle: str
) -> None:
    with pytest.raises(ToolError, match=needle.replace("+", r"\+")):
        toolset.parse(call("transfer_call", args))


def test_end_call_and_unknown_function(toolset: Toolset) -> None:
    intent = toolset.parse(call("end_call", {"reason": "caller said bye"}))
    assert intent == EndCallIntent("caller said bye", "call_1")
    assert toolset.parse(call("end_call", "")) == EndCallIntent(None, "call_1")
    with pytest.raises(ToolError, match="no function named 'dial'"):
        toolset.parse(call("dial", {"number": "+1900"}))


def test_no_tools_configured() -> None:
    empty = Toolset.from_assistant_tools([])
    assert empty.specs == []
    with pytest.raises(ToolError, match="Available: none"):
        empty.parse(call("end_call", {}))
