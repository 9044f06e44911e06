"""The toll-fraud policy (bridge.calls.policy): routing by the number's trunk, the fail-closed
default, allow-lists (global and per trunk), caps, and the rule named by every refusal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from bridge.api.errors import error_body, status_for
from bridge.calls.policy import TransferLimitReached, TransferPolicy
from bridge.config import Settings, TransferSettings
from bridge.directory.models import Assistant, AssistantIn, NumberIn, TrunkIn
from bridge.directory.service import DirectoryService
from bridge.errors import DestinationNotAllowed, InvalidInput
from bridge.pbx.ports import DialTarget
from bridge.store.db import Database

ROUTE = "PJSIP/{number}@carrier"
CONFIGURED_NUMBER = "+31612345678"
CONFIGURED_URI = "sip:support@pbx.example.com"


@pytest.fixture
async def directory(tmp_path: Path) -> Any:
    db = await Database.open(tmp_path / "cb.sqlite3")
    yield DirectoryService(db)
    await db.close()


def policy(directory: DirectoryService, **transfer: Any) -> TransferPolicy:
    transfer.setdefault("default_route", ROUTE)
    return TransferPolicy(Settings(transfer=transfer).transfer, directory)


async def assistant(directory: DirectoryService, *destinations: str) -> Assistant:
    dests = [
        {"type": "sip", "sip_uri": d, "description": "d"}
        if d.startswith("sip")
        else {"type": "number", "number": d, "description": "d"}
        for d in destinations
    ]
    tools = [{"type": "transfer_call", "destinations": dests}] if dests else []
    return await directory.create_assistant(
        AssistantIn.model_validate({"name": "a", "llm_config": {"tools": tools}})
    )


async def authorize(
    p: TransferPolicy,
    destination: str,
    *,
    number_id: str | None = None,
    assistant: Assistant | None = None,
    source: str = "api",
    transfers_in_call: int = 0,
) -> DialTarget:
    return await p.authorize(
        destination,
        number_id=number_id,
        assistant=assistant,
        source=source,
        transfers_in_call=transfers_in_call,
    )


async def refused(p: TransferPolicy, destination: str, **kwargs: Any) -> str:
    """The rule that refused `destination` (and the error is shaped for the API)."""
    with pytest.raises(DestinationNotAllowed) as info:
        await authorize(p, destination, **kwargs)
    error = info.value
    assert error.field == "destination"
    assert error.message.startswith("refused by the transfer policy")
    body = error_body(error)["error"]
    assert status_for(error) == 403 and body["code"] == "destination-not-allowed"
    assert body["details"]["rule"] == error.details["rule"]
    return str(error.details["rule"])


# --- routing --------------------------------------------------------------------------------


async def test_e164_goes_through_the_numbers_trunk_then_the_default_route(directory: Any) -> None:
    trunk = await directory.create_trunk(TrunkIn(name="t", host="pbx.example.com"))
    number = await directory.create_number(NumberIn(number="+31201234567"))
    p = policy(directory, allow_any=True)
    assert await authorize(p, "+31612345678", number_id=number.id) == DialTarget(
        number="+31612345678", route=ROUTE
    )
    await directory.patch_number(number.id, {"transfer_trunk_id": trunk.id})
    assert await authorize(p, "+31612345678", number_id=number.id) == DialTarget(
        number="+31612345678", trunk_id=trunk.id
    )
    assert await authorize(p, "sip:bob@example.com") == DialTarget(sip_uri="sip:bob@example.com")
    with pytest.raises(InvalidInput) as info:
        await authorize(policy(directory, allow_any=True, default_route=None), "+31612345678")
    assert info.value.field == "destination"
    with pytest.raises(InvalidInput):
        await authorize(p, "123")


# --- the fail-closed default ----------------------------------------------------------------


async def test_default_allows_only_the_assistants_destinations(directory: Any) -> None:
    a = await assistant(directory, CONFIGURED_NUMBER, CONFIGURED_URI)
    p = policy(directory)
    assert p.describe()["mode"] == "assistant_destinations"
    assert await authorize(p, CONFIGURED_NUMBER, assistant=a) == DialTarget(
        number=CONFIGURED_NUMBER, route=ROUTE
    )
    assert await authorize(p, "sip:support@PBX.example.com", assistant=a, source="assistant")
    for other in ("+19005550206", "+31612345679", "sip:other@pbx.example.com"):
        assert await refused(p, other, assistant=a) == "assistant.destinations"
    # A call with no assistant (or an assistant without destinations) cannot transfer at all.
    assert await refused(p, CONFIGURED_NUMBER) == "assistant.destinations"
    empty = await assistant(directory)
    assert await refused(p, CONFIGURED_NUMBER, assistant=empty) == "assistant.destinations"


async def test_destination_test_uses_the_numbers_assistant_or_any_assistant(
    directory: Any,
) -> None:
    a = await assistant(directory, CONFIGURED_NUMBER)
    await assistant(directory, "+31612345670")
    bound = await directory.create_number(NumberIn(number="+31201234567", assistant_id=a.id))
    p = policy(directory)
    await authorize(p, CONFIGURED_NUMBER, number_id=bound.id, source="test")
    assert (
        await refused(p, "+31612345670", number_id=bound.id, source="test")
        == "assistant.destinations"
    )
    await authorize(p, "+31612345670", source="test")  # configured on some assistant
    assert await refused(p, "+19005550206", source="test") == "assistant.destinations"
    # The API's control transfers are not "test": the call's assistant only.
    assert await refused(p, "+31612345670", source="api") == "assistant.destinations"


async def test_allow_any_opens_everything_and_says_so_loudly(directory: Any) -> None:
    p = policy(directory, allow_any=True)
    await authorize(p, "+19005550206")
    await authorize(p, "sip:anyone@203.0.113.7")
    assert p.describe()["mode"] == "allow_any"
    with capture_logs() as logs:
        p.log_start()
    assert logs[0]["log_level"] == "warning" and logs[0]["event"] == "transfer.policy_open"
    with capture_logs() as logs:
        policy(directory, allowed_prefixes=["+31"]).log_start()
    assert logs[0]["log_level"] == "info" and logs[0]["allowed_prefixes"] == ["+31"]


def test_allow_any_is_never_combined_with_allow_lists() -> None:
    with pytest.raises(ValidationError, match="allow_any"):
        TransferSettings(allow_any=True, allowed_prefixes=["+31"])
    with pytest.raises(ValidationError):
        TransferSettings(allowed_prefixes=["31"])  # not an E.164 prefix: would match nothing
    with pytest.raises(ValidationError):
        TransferSettings(allowed_prefixes=["+"])  # would match everything
    with pytest.raises(ValidationError):
        TransferSettings(allowed_sip_domains=["pbx.example.com:5060"])
    with pytest.raises(ValidationError):
        TransferSettings(allowed_prefix=["+31"])  # type: ignore[call-arg]  # a typo
    for route in ("PJSIP/{number}@a&Local/1@b", "PJSIP/{number}@a,30", "{number}", "PJSIP/${X}",
                  "PJSIP/{number}@{number}", "PJSIP/{numbr}@a", "PJSIP/{number}@a b"):  # fmt: skip
        with pytest.raises(ValidationError):
            TransferSettings(default_route=route)
    assert TransferSettings(default_route="Local/{number}@out/n").default_route
    assert TransferSettings(allowed_sip_domains=["PBX.Example.com"]).allowed_sip_domains == [
        "pbx.example.com"
    ]


# --- allow-lists ----------------------------------------------------------------------------


async def test_prefixes_and_domains_issue_7(directory: Any) -> None:
    p = policy(
        directory, allowed_prefixes=["+316", "+3120"], allowed_sip_domains=["pbx.example.com"]
    )
    assert p.describe()["mode"] == "allow_lists"
    await authorize(p, "+31612345678")
    await authorize(p, "+31201234567")
    await authorize(p, "sip:alice@pbx.example.com")
    await authorize(p, "sip:alice@PBX.Example.COM:5060")  # host compared case-insensitively
    for number in ("+900123456789", "+4420123456", "+3130123456"):
        assert await refused(p, number) == "transfer.allowed_prefixes"
    for uri in (
        "sip:alice@evil.example.net",
        "sip:alice@pbx.example.com.evil.example",  # exact, not a prefix
        "sip:alice@x.pbx.example.com",  # nor a suffix
        "sip:alice@evilpbx.example.com",
        "sip:pbx.example.com@evil.example.net",  # the user part is not the host
    ):
        assert await refused(p, uri) == "transfer.allowed_sip_domains", uri
    # maddr would send the INVITE elsewhere than the host the list checked.
    rule = await refused(p, "sip:+19005550204@pbx.example.com:5060;maddr=203.0.113.7")
    assert rule == "transfer.allowed_uri_params"
    assert await refused(p, "sip:a@pbx.example.com;transport=tcp") == "transfer.allowed_uri_params"


async def test_the_lists_hold_for_configured_destinations_too(directory: Any) -> None:
    """An API key can write an assistant: its destinations do not widen the lists."""
    a = await assistant(directory, "+19005550206", "sip:premium@203.0.113.7")
    p = policy(directory, allowed_prefixes=["+31"], allowed_sip_domains=["pbx.example.com"])
    assert await refused(p, "+19005550206", assistant=a) == "transfer.allowed_prefixes"
    rule = await refused(p, "sip:premium@203.0.113.7", assistant=a, source="assistant")
    assert rule == "transfer.allowed_sip_domains"


async def test_prefixes_alone_refuse_every_sip_uri(directory: Any) -> None:
    a = await assistant(directory, "sip:+19005550206@203.0.113.7")
    p = policy(directory, allowed_prefixes=["+31"])
    assert p.describe()["sip_uris"] == "refused"
    for uri in ("sip:+19005550206@203.0.113.7", "sip:+31612345678@pbx.example.com"):
        assert await refused(p, uri, assistant=a) == "transfer.allowed_sip_domains"


async def test_domains_alone_refuse_every_number(directory: Any) -> None:
    p = policy(directory, allowed_sip_domains=["pbx.example.com"])
    assert await refused(p, "+31612345678") == "transfer.allowed_prefixes"
    await authorize(p, "sip:a@pbx.example.com")


async def test_uri_parameters_pass_only_when_listed(directory: Any) -> None:
    p = policy(directory, allowed_sip_domains=["pbx.example.com"], allowed_uri_params=["transport"])
    await authorize(p, "sip:a@pbx.example.com;transport=tcp")
    await authorize(p, "sip:a@pbx.example.com;user=phone")
    rule = await refused(p, "sip:a@pbx.example.com;transport=tcp;maddr=203.0.113.7")
    assert rule == "transfer.allowed_uri_params"


@pytest.mark.parametrize(
    "uri",
    [
        "sip:x&Local/+19005550206,,,@pbx.example.com",
        "sip:x&PJSIP/+19005550206@pbx.example.com",
        "sip:a@pbx.example.com?Route=x",
    ],
)
async def test_forged_uris_that_escaped_validation_are_refused(directory: Any, uri: str) -> None:
    """A destination that skipped the API's validation (an older database, the assistant's
    path): the policy parses it again, before any list, and even with allow_any."""
    for p in (
        policy(directory),
        policy(directory, allowed_sip_domains=["pbx.example.com"]),
        policy(directory, allow_any=True),
    ):
        assert await refused(p, uri, source="assistant") == "sip_uri.grammar"


# --- per trunk ------------------------------------------------------------------------------


async def test_a_trunks_prefixes_replace_the_global_ones_for_its_numbers(directory: Any) -> None:
    trunk = await directory.create_trunk(
        TrunkIn(name="national", host="pbx.example.com", allowed_prefixes=["+3120"])
    )
    other = await directory.create_trunk(TrunkIn(name="open", host="carrier.example.com"))
    via_trunk = await directory.create_number(
        NumberIn(number="+31201234567", transfer_trunk_id=trunk.id)
    )
    via_other = await directory.create_number(
        NumberIn(number="+31201234568", transfer_trunk_id=other.id)
    )
    a = await assistant(directory, "+31612345678")
    rule = f"sip_trunks.{trunk.id}.allowed_prefixes"
    # Fail-closed default: the trunk's list grants its numbers...
    p = policy(directory)
    assert await authorize(p, "+31201111111", number_id=via_trunk.id) == DialTarget(
        number="+31201111111", trunk_id=trunk.id
    )
    # ...and limits them, even the assistant's own destinations.
    assert await refused(p, "+31612345678", number_id=via_trunk.id, assistant=a) == rule
    await authorize(p, "+31612345678", number_id=via_other.id, assistant=a)
    # With global prefixes, the trunk's list still decides for that trunk.
    p = policy(directory, allowed_prefixes=["+316"])
    assert await refused(p, "+31612345678", number_id=via_trunk.id) == rule
    await authorize(p, "+31201111111", number_id=via_trunk.id)
    await authorize(p, "+31612345678", number_id=via_other.id)
    assert await refused(p, "+31201111111", number_id=via_other.id) == "transfer.allowed_prefixes"
    # And allow_any does not lift a trunk's own list.
    p = policy(directory, allow_any=True)
    assert await refused(p, "+19005550206", number_id=via_trunk.id) == rule


def test_trunk_prefixes_are_validated() -> None:
    with pytest.raises(ValidationError):
        TrunkIn(name="t", host="h", allowed_prefixes=["31"])
    assert TrunkIn(name="t", host="h").allowed_prefixes == []


# --- caps -----------------------------------------------------------------------------------


async def test_transfers_per_call_are_capped(directory: Any) -> None:
    p = policy(directory, allow_any=True, max_per_call=2)
    await authorize(p, "+31612345678", transfers_in_call=1)
    rule = await refused(p, "+31612345678", transfers_in_call=2)
    assert rule == "transfer.max_per_call"
    assert TransferSettings().max_per_call == 3


async def test_concurrent_legs_per_trunk_are_capped(directory: Any) -> None:
    p = policy(directory, allow_any=True, max_legs_per_trunk=2)
    t1, t2 = DialTarget(number="+1", trunk_id="t1"), DialTarget(number="+2", trunk_id="t2")
    p.claim_leg(t1)
    p.claim_leg(DialTarget(number="+3", trunk_id="t1"))
    with pytest.raises(TransferLimitReached) as info:
        p.claim_leg(t1)
    assert info.value.details["rule"] == "transfer.max_legs_per_trunk"
    assert isinstance(info.value, DestinationNotAllowed)
    p.claim_leg(t2)  # another trunk has its own count
    p.release_leg(t1)
    p.claim_leg(t1)
    assert p.legs(t1) == 2
    for _ in range(3):  # releasing more than claimed never goes negative
        p.release_leg(t1)
    assert p.legs(t1) == 0
    # The default route and each SIP host count as one trunk each.
    route = DialTarget(number="+4", route=ROUTE)
    p.claim_leg(route)
    p.claim_leg(DialTarget(number="+5", route=ROUTE))
    with pytest.raises(TransferLimitReached):
        p.claim_leg(route)
    p.claim_leg(DialTarget(sip_uri="sip:a@h1"))
    p.claim_leg(DialTarget(sip_uri="sip:b@H1;user=phone"))
    with pytest.raises(TransferLimitReached):
        p.claim_leg(DialTarget(sip_uri="sip:c@h1"))
    p.claim_leg(DialTarget(sip_uri="sip:c@h2"))
    # No cap by default.
    unlimited = policy(directory, allow_any=True)
    for _ in range(50):
        unlimited.claim_leg(t1)


async def test_refusals_are_logged_with_their_rule(directory: Any) -> None:
    p = policy(directory, allowed_prefixes=["+31"])
    with capture_logs() as logs, pytest.raises(DestinationNotAllowed):
        await authorize(p, "+19005550206", source="assistant")
    assert logs[-1]["event"] == "transfer.refused"
    assert logs[-1]["rule"] == "transfer.allowed_prefixes"
    assert logs[-1]["destination"] == "+19005550206" and logs[-1]["source"] == "assistant"
