"""Destinations inside the PBX (issue 9 §1): extension, queue and dialplan targets. Their
model grammar, their address, the toll-fraud policy (only configured ones, whatever
`allow_any` says) and the dial strings both adapters build from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from bridge.calls.destinations import parse_internal
from bridge.calls.model import TransferCommand
from bridge.calls.policy import RULE_CONFIGURED, TransferPolicy
from bridge.config import Settings
from bridge.directory.models import AssistantIn, destination_address
from bridge.directory.service import DirectoryService
from bridge.errors import DestinationNotAllowed, UnsafeDialString
from bridge.llm.tools import build_destinations
from bridge.pbx.asterisk import dialing as ast
from bridge.pbx.freeswitch.gateways import dial_string as fs_dial
from bridge.pbx.ports import DialTarget
from bridge.store.db import Database

INTERNAL = [
    {"type": "extension", "extension": "1001", "description": "Alice at the desk"},
    {"type": "queue", "queue": "support", "description": "Support queue"},
    {"type": "dialplan", "context": "ringgroups", "extension": "600", "description": "Sales"},
]


@pytest.fixture
async def directory(tmp_path: Path) -> Any:
    db = await Database.open(tmp_path / "cb.sqlite3")
    yield DirectoryService(db)
    await db.close()


def assistant_in(destinations: list[dict[str, Any]]) -> AssistantIn:
    tools = [{"type": "transfer_call", "destinations": destinations}]
    return AssistantIn.model_validate({"name": "a", "llm_config": {"tools": tools}})


def test_addresses_name_each_kind_and_parse_back() -> None:
    a = assistant_in(INTERNAL)
    tool = a.llm_config.tools[0]
    addresses = [destination_address(d) for d in tool.destinations]  # type: ignore[union-attr]
    assert addresses == ["extension:1001", "queue:support", "dialplan:600@ringgroups"]
    assert [parse_internal(x) for x in addresses] == [
        DialTarget(endpoint="1001"),
        DialTarget(queue="support"),
        DialTarget(context="ringgroups", exten="600"),
    ]
    # The assistant's tool offers them by the same address.
    tools = [{"type": "transfer_call", "destinations": INTERNAL}]
    assert [d.target for d in build_destinations(tools)] == addresses
    # The seed's shapes are unchanged.
    seed = {"number": "+31612345678", "description": "Sales"}
    assert destination_address(seed) == "+31612345678"


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "extension", "extension": "1001&PJSIP/666", "description": "x"},
        {"type": "extension", "extension": "1001@trunk", "description": "x"},
        {"type": "queue", "queue": "support,60", "description": "x"},
        {"type": "dialplan", "context": "callbridge-inbound", "extension": "1", "description": "x"},
        {"type": "dialplan", "context": "from-internal", "extension": "${X}", "description": "x"},
        {"type": "dialplan", "context": "a/b", "extension": "1", "description": "x"},
    ],
)
def test_names_that_a_dial_string_would_reparse_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        assistant_in([bad])


def test_the_control_command_takes_internal_addresses() -> None:
    for address in ("extension:1001", "queue:support", "dialplan:600@ringgroups"):
        assert TransferCommand(type="transfer", destination=address).destination == address
    for bad in ("extension:10 01", "queue:", "dialplan:600", "dialplan:1@callbridge-fallback"):
        with pytest.raises(ValidationError):
            TransferCommand(type="transfer", destination=bad)


async def test_policy_allows_only_configured_internal_destinations(directory: Any) -> None:
    a = await directory.create_assistant(assistant_in(INTERNAL))
    # Neither allow_any nor an allow-list opens the PBX's inside.
    for transfer in ({"allow_any": True}, {"allowed_prefixes": ["+31"]}, {}):
        p = TransferPolicy(Settings(transfer=transfer).transfer, directory)
        kw: dict[str, Any] = {"number_id": None, "assistant": a, "source": "api"}
        target = await p.authorize("extension:1001", transfers_in_call=0, **kw)
        assert target == DialTarget(endpoint="1001")
        assert await p.authorize("dialplan:600@ringgroups", transfers_in_call=0, **kw) == (
            DialTarget(context="ringgroups", exten="600")
        )
        for other in ("extension:1002", "queue:billing", "dialplan:601@ringgroups"):
            with pytest.raises(DestinationNotAllowed) as info:
                await p.authorize(other, transfers_in_call=0, **kw)
            assert info.value.details["rule"] == RULE_CONFIGURED


def test_asterisk_dial_strings() -> None:
    assert ast.dial_string(DialTarget(endpoint="1001")) == "PJSIP/1001"
    assert ast.dial_string(DialTarget(queue="support")) == "Local/support@callbridge-queue/n"
    assert ast.dial_string(DialTarget(context="ringgroups", exten="600")) == (
        "Local/600@ringgroups/n"
    )
    assert ast.blind_variables(DialTarget(endpoint="1001"))["CALLBRIDGE_DIAL_KIND"] == "endpoint"
    assert ast.dialplan_target(DialTarget(queue="support")) == ("callbridge-queue", "support")
    for bad in (
        DialTarget(endpoint="1001&PJSIP/2"),
        DialTarget(queue="a,b"),
        DialTarget(context="callbridge-inbound", exten="1"),
        DialTarget(context="internal", exten="1)"),
    ):
        with pytest.raises(UnsafeDialString):
            ast.dial_string(bad)


def test_freeswitch_dial_strings() -> None:
    assert fs_dial(DialTarget(endpoint="1001"), "internal") == "user/1001"
    assert fs_dial(DialTarget(queue="support"), "internal") == (
        "loopback/support/callbridge-queue/XML"
    )
    assert fs_dial(DialTarget(context="ringgroups", exten="600"), "internal") == (
        "loopback/600/ringgroups/XML"
    )
    for bad in (
        DialTarget(endpoint="1001,user/2"),
        DialTarget(context="callbridge-fallback", exten="1"),
        DialTarget(context="default", exten="1|2"),
    ):
        with pytest.raises(UnsafeDialString):
            fs_dial(bad, "internal")


# --- DTMF after answer (issue 9 §4) ------------------------------------------------------------


@pytest.mark.parametrize("dtmf", ["wwww1234#", "1", "*0#", "ABCD", "W9w8", "1" * 64])
def test_a_destination_takes_dtmf(dtmf: str) -> None:
    dest = {"number": "+31612345678", "description": "Support line", "dtmf": dtmf}
    (got,) = assistant_in([dest]).llm_config.tools[0].destinations  # type: ignore[union-attr]
    assert got.dtmf == dtmf


@pytest.mark.parametrize(
    "dtmf", ["", "www", "12 34", "1,2", "E", "x", "1" * 65, "12;3", "1\n2", "p123"]
)
def test_dtmf_outside_the_grammar_is_refused(dtmf: str) -> None:
    dest = {"type": "extension", "extension": "1001", "description": "Desk", "dtmf": dtmf}
    with pytest.raises(ValidationError, match="dtmf"):
        assistant_in([dest])


def test_dtmf_duration_counts_pauses_and_digits() -> None:
    from bridge.pbx.ports import dtmf_seconds

    assert dtmf_seconds("wwww1234#") == pytest.approx(2.0 + 5 * 0.2)
    assert dtmf_seconds("W1") == pytest.approx(1.2)
