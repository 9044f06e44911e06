"""Every refusal recorded with the rule that refused it (issue 7 §1): each rule of the
toll-fraud policy, on a call (fake PBX, real SQLite store), gives a `transfer.refused` event
naming it, the `callbridge_transfers_refused_total{rule}` counter fed from the store, and a
typed error (403 with `details.rule`) for the caller of the command; the assistant gets a
typed `refused` tool result. A full trunk (`transfer.max_legs_per_trunk`) is one of them,
whether it was full when the command came or filled up during the transfer's message."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.api.errors import error_body, status_for
from bridge.calls.model import TransferCommand
from bridge.calls.policy import TransferPolicy
from bridge.errors import DestinationNotAllowed
from bridge.ops.metrics import Metrics
from bridge.pbx.ports import DialTarget, LegFailed
from tests.support.agent import FakeSession, make_agent, make_assistant, speak
from tests.support.calls import DEST, CallEnv, open_env, until
from tests.support.fake_openai import FakeOpenAI, FakeToolCall, Reply

ROUTE = "PJSIP/{number}@carrier"  # the default route of tests.support.calls


def refused_count(metrics: Metrics, source: str, rule: str) -> float:
    value = metrics.registry.get_sample_value(
        "callbridge_transfers_refused_total", {"source": source, "rule": rule}
    )
    return value or 0.0


async def env_with_metrics(tmp_path: Path, **transfer: Any) -> tuple[CallEnv, Metrics]:
    env = await open_env(tmp_path, **transfer)
    metrics = Metrics("asterisk", active=dict, connected=lambda: True)
    env.store.subscribe(metrics.on_change)
    return env, metrics


def transfer(destination: str) -> TransferCommand:
    """Built without the command's own validation: a destination the SIP URI grammar refuses
    is a 422 at the API (`TransferCommand`) before any call sees it; the policy refuses it
    again on every path that reaches it (defence in depth), recorded like the rest."""
    return TransferCommand.model_construct(type="transfer", destination=destination)


async def refused_on_call(env: CallEnv, destination: str) -> tuple[DestinationNotAllowed, Any]:
    session = await env.arrive()
    with pytest.raises(DestinationNotAllowed) as info:
        await session.command(transfer(destination))
    return info.value, session


# (transfer settings, destination, the rule named)
RULES = [
    ({}, "+31699999999", "assistant.destinations"),
    ({"allowed_prefixes": ["+44"]}, DEST, "transfer.allowed_prefixes"),
    ({"allowed_prefixes": ["+31"]}, "sip:agent@pbx.example.com", "transfer.allowed_sip_domains"),
    ({"allow_any": True}, "sip:x&Local/+19005550206@pbx.example.com", "sip_uri.grammar"),
    (
        {"allow_any": True},
        "sip:agent@pbx.example.com;maddr=203.0.113.7",
        "transfer.allowed_uri_params",
    ),
    ({}, "extension:10 01", "internal.grammar"),
    ({"max_legs_per_trunk": 1}, DEST, "transfer.max_legs_per_trunk"),
]


@pytest.mark.parametrize(("settings", "destination", "rule"), RULES)
async def test_each_rule_is_recorded_counted_and_answered_403(
    tmp_path: Path, settings: dict[str, Any], destination: str, rule: str
) -> None:
    env, metrics = await env_with_metrics(tmp_path, **settings)
    try:
        if rule == "transfer.max_legs_per_trunk":  # another transfer holds the route's leg
            env.service.policy.claim_leg(DialTarget(number="+31600000000", route=ROUTE))
        exc, session = await refused_on_call(env, destination)
        assert exc.details["rule"] == rule
        assert status_for(exc) == 403
        body = error_body(exc)["error"]
        assert (body["code"], body["field"], body["details"]["rule"]) == (
            "destination-not-allowed",
            "destination",
            rule,
        )
        data = await env.stored(session.call.id)
        refused = [e for e in data["events"] if e["type"] == "transfer.refused"]
        assert [(e["rule"], e["destination"], e["source"]) for e in refused] == [
            (rule, destination, "api")
        ]
        assert data["status"] == "active" and data["transfers"] == []
        assert env.pbx.verbs("originate") == []
        await until(lambda: refused_count(metrics, "api", rule) == 1, "counted")
    finally:
        await env.close()


async def test_transfers_per_call_cap_is_recorded(tmp_path: Path) -> None:
    env, metrics = await env_with_metrics(tmp_path, max_per_call=1)
    try:
        session = await env.arrive()
        first = await env.transfer(session)
        assert first.leg_id is not None
        await env.push(LegFailed(first.leg_id, 17, "User busy", 486))
        await env.wait_status(session.call.id, session.call.status.ACTIVE)
        await until(lambda: session.transfer is None or session.transfer.final, "settled")
        with pytest.raises(DestinationNotAllowed) as info:
            await session.command(transfer(DEST))
        assert info.value.details["rule"] == "transfer.max_per_call"
        data = await env.stored(session.call.id)
        assert [e["rule"] for e in data["events"] if e["type"] == "transfer.refused"] == [
            "transfer.max_per_call"
        ]
        assert len(data["transfers"]) == 1
        await until(lambda: refused_count(metrics, "api", "transfer.max_per_call") == 1, "counted")
    finally:
        await env.close()


class RacingPolicy(TransferPolicy):
    """Another transfer takes the route's last leg between `authorize` and the dial (as
    during the transfer's message)."""

    async def authorize(self, destination: str, **kwargs: Any) -> DialTarget:
        target = await super().authorize(destination, **kwargs)
        self.claim_leg(target)
        return target


async def test_a_trunk_filled_during_the_message_is_a_recorded_refusal(tmp_path: Path) -> None:
    env, metrics = await env_with_metrics(tmp_path, max_legs_per_trunk=1)
    try:
        env.service.policy = RacingPolicy(env.settings.transfer, env.directory)
        session = await env.arrive()
        reply = await session.command(transfer(DEST))
        assert reply["accepted"] == "transfer"
        data = await env.wait_status(session.call.id, session.call.status.ACTIVE)
        t = data["transfers"][-1]
        assert (t["state"], t["outcome"], t["local_fault"]) == ("failed", "failed", True)
        assert "transfer.max_legs_per_trunk" in t["reason"]
        refused = [e for e in data["events"] if e["type"] == "transfer.refused"]
        assert [(e["rule"], e["transfer_id"], e["source"]) for e in refused] == [
            ("transfer.max_legs_per_trunk", t["id"], "api")
        ]
        assert env.pbx.verbs("originate") == []  # nothing dialled
        await until(
            lambda: refused_count(metrics, "api", "transfer.max_legs_per_trunk") == 1, "counted"
        )
        # Back with the assistant, which is told the typed result.
        await until(lambda: env.conversations[-1].log[-1][0] == "result", "result told")
    finally:
        await env.close()


async def test_a_destination_test_over_the_cap_is_refused_and_counted(tmp_path: Path) -> None:
    env, metrics = await env_with_metrics(tmp_path, max_legs_per_trunk=1)
    try:
        env.service.probe.on_refused = metrics.destination_test_refused
        env.service.policy.claim_leg(DialTarget(number="+31600000000", route=ROUTE))
        with pytest.raises(DestinationNotAllowed) as info:
            await env.service.test_destination(DEST, None, 5)
        assert info.value.details["rule"] == "transfer.max_legs_per_trunk"
        assert env.pbx.verbs("originate") == []
        assert refused_count(metrics, "test", "transfer.max_legs_per_trunk") == 1
    finally:
        await env.close()


# --- the assistant: a typed tool result -----------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


async def test_the_assistant_gets_a_refused_tool_result_with_the_rule(fake: FakeOpenAI) -> None:
    from bridge.llm.openai_compat import OpenAICompatLlm
    from tests.support.agent import ScriptedStt

    session = FakeSession(make_assistant(first_message=None))
    session.command_error = DestinationNotAllowed(
        "refused by the transfer policy (transfer.max_legs_per_trunk): 1 legs already up",
        field="destination",
        rule="transfer.max_legs_per_trunk",
    )
    fake.script(
        Reply(tool_calls=[FakeToolCall("transfer_call", {"destination": "sales_team"})]),
        Reply(text="All our lines are busy. Can I take a message?"),
    )
    llm = OpenAICompatLlm(base_url=fake.base_url, model="gpt-test", api_key="test-key")
    agent = make_agent(session, llm, ScriptedStt("sales please"))  # type: ignore[arg-type]
    try:
        await agent.start(resumed=False)
        await speak(agent)
        await until(lambda: len(fake.requests) == 2, "the model asked again")
        result = json.loads(fake.requests[1]["messages"][-1]["content"])
        assert result["transferred"] is False
        assert (result["outcome"], result["rule"]) == ("refused", "transfer.max_legs_per_trunk")
    finally:
        await agent.close()
        await llm.aclose()
