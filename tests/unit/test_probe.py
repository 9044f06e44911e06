"""`DestinationProbe` on its own (issue 7 section 9: split out of `CallService`): a fake PBX
that records verbs, the real transfer policy and the test directory."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge.calls.policy import TransferPolicy
from bridge.calls.probe import PROBE_PREFIX, DestinationProbe
from bridge.config import Settings
from bridge.errors import DestinationNotAllowed, NotFound, PbxUnavailable
from bridge.pbx.ports import LegAnswered, LegFailed, LegRinging
from tests.support.calls import DEST, FakeDirectory, FakePbx, until


def _probe(**transfer: Any) -> tuple[DestinationProbe, FakePbx, TransferPolicy]:
    settings = Settings(transfer={"default_route": "PJSIP/{number}@carrier", **transfer})
    directory = FakeDirectory()
    policy = TransferPolicy(settings.transfer, directory)
    pbx = FakePbx()
    return DestinationProbe(pbx=pbx, policy=policy, directory=directory), pbx, policy


async def _placed(pbx: FakePbx) -> str:
    await until(lambda: pbx.verbs("originate"), "the test leg placed")
    return str(pbx.verbs("originate")[0][0])


async def test_an_answer_is_hung_up_at_once_and_reported_answered() -> None:
    probe, pbx, policy = _probe()
    task = asyncio.create_task(probe.test(DEST, None, 5))
    leg = await _placed(pbx)
    assert leg.startswith(PROBE_PREFIX) and probe.legs == {leg}
    assert not probe.deliver(LegRinging("someone-else"))  # not ours: the service routes it
    assert probe.deliver(LegRinging(leg))
    assert probe.deliver(LegAnswered(leg))
    result = await task
    assert (result["outcome"], result["sip_code"]) == ("answered", 200)
    assert result["ring_ms"] is not None
    assert pbx.verbs("hangup") == [(leg,)]
    assert probe.legs == frozenset() and not policy._legs  # the leg's claim is released


async def test_a_busy_is_classified_like_a_transfer() -> None:
    probe, pbx, _ = _probe()
    task = asyncio.create_task(probe.test(DEST, None, 5))
    leg = await _placed(pbx)
    probe.deliver(LegFailed(leg, 17, "User busy", 486))
    result = await task
    assert (result["outcome"], result["sip_code"]) == ("busy", 486)
    assert pbx.verbs("hangup") == []  # the PBX ended it


async def test_the_pbx_down_is_a_local_failure_not_the_destination() -> None:
    probe, pbx, policy = _probe()
    pbx.fail["originate"] = PbxUnavailable("ARI connection refused")
    result = await probe.test(DEST, None, 5)
    assert result["outcome"] == "failed" and result["reason"].startswith("local failure")
    assert not policy._legs


async def test_a_destination_the_policy_refuses_places_nothing() -> None:
    probe, pbx, _ = _probe(allowed_prefixes=["+44"])
    with pytest.raises(DestinationNotAllowed):
        await probe.test(DEST, None, 5)
    assert pbx.verbs("originate") == []


async def test_an_unknown_number_is_refused_with_its_field() -> None:
    probe, pbx, _ = _probe()
    with pytest.raises(NotFound) as caught:
        await probe.test(DEST, "no-such-number", 5)
    assert caught.value.field == "number_id"
    assert pbx.verbs("originate") == []


async def test_a_pbx_that_never_reports_is_timed_out_and_hung_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("bridge.calls.probe.PROBE_GUARD_S", 0.05)
    probe, pbx, _ = _probe()
    result = await probe.test(DEST, None, 0.05)
    leg = str(pbx.verbs("originate")[0][0])
    # Never rang, nothing reported: a local failure, not blamed on the destination.
    assert result["outcome"] == "failed"
    assert "reported nothing about the leg" in result["reason"]
    assert pbx.verbs("hangup") == [(leg,)]
