"""Transfer decided -> originate first, records and ringback after (issue 8 section 4), and
what a restarted daemon does with a leg its predecessor left at each point of the dial
(issue 7 section 3): a leg never dialled is dialled once, a dialled leg is adopted and waited
for, a leg nobody recorded is hung up and recorded. The daemon "dies" at a fault point
(`bridge.faults`): its coroutine stops there for good, then the service is stopped and a new
one starts on the same database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge import faults
from bridge.calls.model import TransferCommand
from bridge.calls.transfer import TransferState
from bridge.calls.transferring import TransferRun
from bridge.pbx.ports import ConnectionRestored, LegAnswered, LegFacts
from tests.support.calls import DEST, CallEnv, FakePbx, open_env, until


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[CallEnv]:
    environment = await open_env(tmp_path)
    yield environment
    faults.disarm()
    await environment.close()


def _kinds(data: dict[str, Any]) -> list[str]:
    return [e["type"] for e in data["events"]]


async def _transfer_kinds(env: CallEnv, call_id: str) -> list[str]:
    return [k for k in _kinds(await env.stored(call_id)) if k.startswith("transfer.")]


async def test_the_originate_goes_before_any_record_and_the_ringback(env: CallEnv) -> None:
    session = await env.arrive()
    seen: list[list[str]] = []
    real = env.pbx.originate

    async def originate(*args: Any, **kwargs: Any) -> None:
        seen.append(await _transfer_kinds(env, session.call.id))  # what is recorded by now
        await real(*args, **kwargs)

    env.pbx.originate = originate  # type: ignore[method-assign]
    await session.command(TransferCommand(type="transfer", destination=DEST))
    assert seen == [[]]  # nothing recorded before the INVITE is asked for
    await until(lambda: "play_tone" in env.pbx.names(), "the ringback")
    names = env.pbx.names()
    assert names.index("originate") < names.index("play_tone")  # ringback after it
    assert await _transfer_kinds(env, session.call.id) == [
        "transfer.requested",
        "transfer.dialing",
    ]
    transfer = session.transfer
    assert transfer is not None and transfer.leg_id == f"cbleg-{transfer.id}"


async def _die_at(env: CallEnv, point: str, **command: Any) -> tuple[str, str, FakePbx]:
    """Start a transfer, let the daemon die at `point`, start a new one on the database.
    Returns the call id, the transfer's leg id and the new process's PBX."""
    session = await env.arrive()
    reached = faults.arm(point)
    task = asyncio.create_task(
        session.command(TransferCommand(type="transfer", destination=DEST, **command))
    )
    await asyncio.wait_for(reached.wait(), 5)
    transfer = session.transfer
    assert transfer is not None
    await env.service.stop()
    task.cancel()
    pbx = FakePbx()
    env.service = env.new_service(pbx)
    await env.service.start()
    return session.call.id, f"cbleg-{transfer.id}", pbx


async def test_the_command_is_answered_once_recorded_not_after_the_originate(
    env: CallEnv,
) -> None:
    """Issue 7 §8: the 202 does not wait for the PBX's round trip; the transfer is on record
    when it comes (a daemon that dies after it loses nothing)."""
    session = await env.arrive()
    release = asyncio.Event()
    real = env.pbx.originate

    async def slow_originate(*args: Any, **kwargs: Any) -> None:
        await release.wait()  # a PBX that takes its time to answer the originate
        await real(*args, **kwargs)

    env.pbx.originate = slow_originate  # type: ignore[method-assign]
    reply = await asyncio.wait_for(
        session.command(TransferCommand(type="transfer", destination=DEST)), 5
    )
    transfer = session.transfer
    assert transfer is not None
    assert reply == {
        "id": session.call.id,
        "accepted": "transfer",
        "transfer_id": transfer.id,
        "state": "dialing",
    }
    assert await _transfer_kinds(env, session.call.id) == [
        "transfer.requested",
        "transfer.dialing",
    ]
    assert "play_tone" not in env.pbx.names()  # the originate has not returned yet
    release.set()
    await until(lambda: "play_tone" in env.pbx.names(), "the ringback after the originate")


async def test_the_originate_request_leaves_before_the_record_starts(
    env: CallEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 8 §4: the record's commit runs during the originate's round trip, but only once
    the request is out: an HTTP client that writes it on a later turn of the loop (aiohttp,
    a request with a body, Python 3.11) is not delayed by the commit's database thread."""
    session = await env.arrive()
    order: list[str] = []
    release = asyncio.Event()
    real_originate = env.pbx.originate

    async def originate(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0)  # the request's body goes out from a task of its own
        order.append("request sent")
        await release.wait()  # the PBX's answer
        await real_originate(*args, **kwargs)

    real_save = TransferRun._save_pending

    async def save_pending(self: TransferRun, pending: Any) -> None:
        order.append("record started")
        await real_save(self, pending)

    env.pbx.originate = originate  # type: ignore[method-assign]
    monkeypatch.setattr(TransferRun, "_save_pending", save_pending)
    await asyncio.wait_for(session.command(TransferCommand(type="transfer", destination=DEST)), 5)
    assert order == ["request sent", "record started"]
    release.set()
    await until(lambda: "play_tone" in env.pbx.names(), "the ringback after the originate")


async def test_died_after_the_originate_with_nothing_recorded(env: CallEnv) -> None:
    call_id, leg, pbx = await _die_at(env, "before_record")
    assert await _transfer_kinds(env, call_id) == []  # the predecessor recorded nothing
    transfer_id = leg.removeprefix("cbleg-")
    facts = LegFacts(leg, call_id=call_id, transfer_id=transfer_id)
    await env.push(
        ConnectionRestored("", callers=(env.arrival(),), legs=((leg, False),), leg_facts=(facts,))
    )
    # The leg nobody recorded is hung up and the attempt recorded; the caller stays with
    # the assistant, which listens again.
    await until(lambda: (leg,) in pbx.verbs("hangup"), "the unrecorded leg hung up")
    kinds = await until(lambda: _has(env, call_id, "transfer.abandoned"), "the attempt recorded")
    assert "transfer.requested" not in kinds
    await until(lambda: ("ch1",) in pbx.verbs("attach_media"), "media attached again")
    assert pbx.verbs("originate") == []  # never dialled twice
    assert (await env.stored(call_id))["status"] == "active"
    # The caller, who never heard the transfer start, is told it did not happen.
    failure = env.settings.transfer.failure_message
    await until(lambda: failure in env.tts.texts, "the caller told")


async def _has(env: CallEnv, call_id: str, kind: str) -> list[str] | None:
    kinds = _kinds(await env.stored(call_id))
    return kinds if kind in kinds else None


async def test_an_announced_transfer_whose_leg_was_never_dialled_is_dialled_once(
    env: CallEnv,
) -> None:
    # With a message the request is recorded first (the announcement plays meanwhile); the
    # daemon dies with the leg created in the PBX but not dialled (a PBX that creates and
    # dials in two steps; both adapters now do it in one) and its dial not recorded.
    call_id, leg, pbx = await _die_at(env, "before_record", message="One moment.")
    assert await _transfer_kinds(env, call_id) == ["transfer.requested"]
    facts = LegFacts(leg, call_id=call_id, transfer_id=leg[6:], dialled=False)
    await env.push(
        ConnectionRestored("", callers=(env.arrival(),), legs=((leg, False),), leg_facts=(facts,))
    )
    await until(lambda: pbx.verbs("originate"), "the leg dialled")
    assert [v[0] for v in pbx.verbs("originate")] == [leg]  # that leg, once
    await until(lambda: pbx.verbs("play_tone"), "ringback")
    await env.push(LegAnswered(leg))
    data = await env.wait_status(call_id, env_status("transferred"))
    assert data["transfers"][-1]["state"] == "bridged"
    assert pbx.verbs("hangup") == []
    assert len(pbx.verbs("originate")) == 1


async def test_an_announced_transfer_whose_leg_was_dialled_is_adopted(env: CallEnv) -> None:
    call_id, leg, pbx = await _die_at(env, "before_record", message="One moment.")
    facts = LegFacts(leg, call_id=call_id, transfer_id=leg[6:], dialled=True)
    await env.push(
        ConnectionRestored("", callers=(env.arrival(),), legs=((leg, False),), leg_facts=(facts,))
    )
    await until(lambda: pbx.verbs("play_tone"), "ringback for the adopted leg")
    session = env.service.session(call_id)
    assert session is not None and session.transfer is not None
    assert session.transfer.state is TransferState.DIALING
    assert pbx.verbs("originate") == [] and pbx.verbs("hangup") == []
    await env.push(LegAnswered(leg))
    data = await env.wait_status(call_id, env_status("transferred"))
    assert data["transfers"][-1]["state"] == "bridged"
    assert "transfer.dialing" in _kinds(data)


async def test_died_before_the_originate_the_next_daemon_dials(env: CallEnv) -> None:
    call_id, leg, pbx = await _die_at(env, "before_originate", message="One moment.")
    await env.push(ConnectionRestored("", callers=(env.arrival(),), legs=()))
    await until(lambda: pbx.verbs("originate"), "the leg dialled")
    assert [v[0] for v in pbx.verbs("originate")] == [leg]
    await env.push(LegAnswered(leg))
    data = await env.wait_status(call_id, env_status("transferred"))
    assert data["transfers"][-1]["state"] == "bridged"


async def test_a_dialling_transfer_with_an_undialled_leg_dials_it(env: CallEnv) -> None:
    """A record that says dialing with the leg still undialled (e.g. an Asterisk marker
    written by an older version) is dialled, not waited for."""
    session = await env.arrive()
    transfer = await env.transfer(session)
    leg = transfer.leg_id
    assert leg is not None
    await env.service.stop()
    pbx = FakePbx()
    env.service = env.new_service(pbx)
    await env.service.start()
    facts = LegFacts(leg, call_id=session.call.id, transfer_id=transfer.id, dialled=False)
    await env.push(
        ConnectionRestored("", callers=(env.arrival(),), legs=((leg, False),), leg_facts=(facts,))
    )
    await until(lambda: pbx.verbs("originate"), "the leg dialled")
    assert [v[0] for v in pbx.verbs("originate")] == [leg]


def env_status(name: str) -> Any:
    from bridge.calls.model import CallStatus

    return CallStatus(name)
