"""Hand back (issue 9 §5) through the session: a fake PBX that records verbs, a real SQLite
store. After a bridged transfer the caller comes back to the assistant by the destination's
DTMF code, the control API's `return`, or (when the assistant says so) the destination
hanging up; the transfer is RETURNED with how/when, the call ACTIVE again with media, and the
conversation told."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.calls.handback import CodeListener
from bridge.calls.model import CallStatus, ReturnCommand, SayCommand
from bridge.calls.session import CallSession
from bridge.calls.transfer import Transfer, TransferState
from bridge.directory.models import Handback
from bridge.errors import Conflict, PbxCommandFailed
from bridge.pbx.ports import (
    ChannelHungUp,
    ConnectionRestored,
    DtmfReceived,
    LegAnswered,
    LegRinging,
)
from tests.support.calls import CallEnv, FakePbx, RecordingConversation, open_env, until
from tests.unit.test_session import kinds


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[CallEnv]:
    env = await open_env(tmp_path, max_per_call=3)
    try:
        yield env
    finally:
        await env.close()


def configure(env: CallEnv, **handback: Any) -> None:
    assistant = env.directory.assistant
    env.directory.assistant = assistant.model_copy(update={"handback": Handback(**handback)})


async def bridged(env: CallEnv) -> tuple[CallSession, Transfer, str]:
    session = await env.arrive()
    transfer = await env.transfer(session)
    leg = transfer.leg_id
    assert leg is not None
    await env.push(LegAnswered(leg))
    await env.wait_status(session.call.id, CallStatus.TRANSFERRED)
    return session, transfer, leg


async def returned(env: CallEnv, session: CallSession) -> dict[str, Any]:
    """The call once back with the assistant: active, media attached, conversation told."""
    await env.wait_status(session.call.id, CallStatus.ACTIVE)
    conversation = env.conversations[-1]
    await until(lambda: conversation.log[-1][:2] == ("result", TransferState.RETURNED), "told")
    return await env.stored(session.call.id)


def assert_returned(
    env: CallEnv, data: dict[str, Any], session: CallSession, leg: str, by: str
) -> dict[str, Any]:
    t = data["transfers"][-1]
    assert t["state"] == "returned" and t["outcome"] == "answered"
    assert [h["state"] for h in t["history"]][-2:] == ["bridged", "returned"]
    assert t["returned"]["by"] == by and t["returned"]["at"] is not None
    names = kinds(data)
    assert names.index("transfer.returned") < names.index("call.resumed")
    resumed = [e for e in data["events"] if e["type"] == "call.resumed"][-1]
    assert resumed["reason"] == "returned" and resumed["transfer_id"] == t["id"]
    # The leg left (hung up with the caller out of the bridge), then the media came back.
    assert env.pbx.verbs("unbridge") == [("ch1", leg)]
    assert env.pbx.verbs("attach_media") == [("ch1",), ("ch1",)]
    assert env.pbx.names().index("unbridge") < len(env.pbx.names()) - 1
    assert session.media is not None
    conversation = env.conversations[-1]
    assert isinstance(conversation, RecordingConversation)
    assert conversation.log[-1] == ("result", TransferState.RETURNED, CallStatus.ACTIVE, True)
    outcome = env.pbx.verbs("record_outcome")[-1][1]
    assert outcome["outcome"] == "returned"
    return t


# --- the control API ------------------------------------------------------------------------


async def test_return_command_brings_the_caller_back_and_says_the_line(env: CallEnv) -> None:
    session, _, leg = await bridged(env)
    reply = await session.command(ReturnCommand(type="return", message="Welcome back."))
    assert reply["accepted"] == "return"
    data = await returned(env, session)
    t = assert_returned(env, data, session, leg, "api")
    assert t["returned"]["detail"] == "api" and t["returned"]["message"] == "Welcome back."
    await until(lambda: "Welcome back." in env.tts.texts, "the return line said")
    # Its leg no longer routes to the call (its hangup must not touch the caller).
    assert leg not in env.service.routes


async def test_return_without_message_says_the_assistants_line(env: CallEnv) -> None:
    configure(env, message="Back with the assistant. Anything else?")
    session, _, _ = await bridged(env)
    await session.command(ReturnCommand(type="return"))
    await returned(env, session)
    await until(lambda: "Back with the assistant. Anything else?" in env.tts.texts, "line")


async def test_return_while_not_bridged_is_a_clear_409(env: CallEnv) -> None:
    session = await env.arrive()
    with pytest.raises(Conflict) as active:
        await session.command(ReturnCommand(type="return"))
    assert "no bridged transfer" in active.value.message
    transfer = await env.transfer(session)
    assert transfer.leg_id is not None
    await env.push(LegRinging(transfer.leg_id))
    with pytest.raises(Conflict) as ringing:
        await session.command(ReturnCommand(type="return"))
    assert "not bridged" in ringing.value.message and ringing.value.field == "type"
    assert env.pbx.verbs("unbridge") == []


async def test_a_pbx_refusal_leaves_the_caller_bridged_and_is_recorded(env: CallEnv) -> None:
    session, _, _ = await bridged(env)
    env.pbx.fail["unbridge"] = [PbxCommandFailed("no such bridge")]
    with pytest.raises(PbxCommandFailed):
        await session.command(ReturnCommand(type="return"))
    data = await env.stored(session.call.id)
    assert data["status"] == "transferred" and data["transfers"][-1]["state"] == "bridged"
    assert "transfer.return_failed" in kinds(data)


async def test_a_second_transfer_after_a_return_works(env: CallEnv) -> None:
    session, _, _ = await bridged(env)
    await session.command(ReturnCommand(type="return"))
    await returned(env, session)
    second = await env.transfer(session)
    assert second.leg_id is not None
    await env.push(LegAnswered(second.leg_id))
    data = await env.wait_status(session.call.id, CallStatus.TRANSFERRED)
    assert [t["state"] for t in data["transfers"]] == ["returned", "bridged"]
    assert session.transfers_in_call == 2  # a returned transfer counts against max_per_call


# --- the destination's DTMF -----------------------------------------------------------------


async def test_the_destinations_code_hands_the_caller_back(env: CallEnv) -> None:
    session, _, leg = await bridged(env)
    await env.push(DtmfReceived(leg, "#"))
    await env.push(DtmfReceived(leg, "#"))
    data = await returned(env, session)
    t = assert_returned(env, data, session, leg, "agent_dtmf")
    assert t["returned"]["detail"] == "##"
    assert "the destination handed the caller back (DTMF ##)" == t["reason"]


async def test_the_callers_digits_never_hand_back(env: CallEnv) -> None:
    session, _, leg = await bridged(env)
    for digit in "##":
        await env.push(DtmfReceived("ch1", digit))  # the caller's channel
    await env.push(DtmfReceived(leg, "#"))  # one of the agent's: not the code yet
    with pytest.raises(Conflict):  # answered after the digits: they were handled by then
        await session.command(SayCommand(type="say", message="hello"))
    data = await env.stored(session.call.id)
    assert data["status"] == "transferred" and env.pbx.verbs("unbridge") == []


async def test_a_configured_code_replaces_the_default(env: CallEnv) -> None:
    configure(env, dtmf="*9")
    session, _, leg = await bridged(env)
    for digit in "##*9":
        await env.push(DtmfReceived(leg, digit))
    data = await returned(env, session)
    assert data["transfers"][-1]["returned"]["detail"] == "*9"
    assert env.pbx.verbs("unbridge") == [("ch1", leg)]


def test_code_listener_matches_the_code_and_forgets_slow_digits() -> None:
    listener = CodeListener("##")
    assert not listener.feed("#", now=0.0)
    assert listener.feed("#", now=0.5)
    assert not listener.feed("#", now=1.0)
    assert not listener.feed("#", now=10.0)  # too long after the previous digit
    assert listener.feed("#", now=10.4)
    assert not CodeListener(None).feed("#", now=0.0)


# --- the destination hangs up first ---------------------------------------------------------


async def test_destination_hangup_returns_the_caller_when_enabled(env: CallEnv) -> None:
    configure(env, return_on_destination_hangup=True)
    session, _, leg = await bridged(env)
    await env.push(ChannelHungUp(leg, 16, "Normal Clearing"))
    data = await returned(env, session)
    assert_returned(env, data, session, leg, "destination_hangup")
    assert "transfer.destination_hung_up" in kinds(data)
    assert ("ch1",) not in env.pbx.verbs("hangup")
    await until(lambda: "Is there anything else I can help you with?" in env.tts.texts, "line")


async def test_destination_hangup_hangs_the_caller_up_by_default(env: CallEnv) -> None:
    session, _, leg = await bridged(env)
    await env.push(ChannelHungUp(leg, 16, "Normal Clearing"))
    data = await env.wait_status(session.call.id, CallStatus.ENDED)
    assert data["end_reason"] == "destination hung up"
    assert env.pbx.verbs("unbridge") == []


# --- a daemon restart while bridged ---------------------------------------------------------


async def test_hand_back_works_for_a_call_adopted_after_a_restart(env: CallEnv) -> None:
    session, transfer, leg = await bridged(env)
    call_id = session.call.id
    await env.service.stop()  # the daemon stops; caller and destination stay bridged
    pbx = FakePbx()
    env.service = env.new_service(pbx)
    env.pbx = pbx
    await env.service.start()
    await env.push(ConnectionRestored("", callers=(env.arrival(),), legs=((leg, True),)))
    await until(lambda: env.service.session(call_id) is not None, "adopted")
    adopted = env.service.session(call_id)
    assert adopted is not None and env.service.routes.get(leg) is adopted
    for digit in "##":
        await env.push(DtmfReceived(leg, digit))
    data = await env.wait_status(call_id, CallStatus.ACTIVE)
    conversation = await until(
        lambda: next((c for c in env.conversations if ("start", True) in c.log), None),
        "the conversation resumed in the new process",
    )
    await until(lambda: conversation.log[-1][:2] == ("result", TransferState.RETURNED), "told")
    assert data["transfers"][-1]["id"] == transfer.id
    assert pbx.verbs("unbridge") == [("ch1", leg)] and pbx.verbs("attach_media") == [("ch1",)]
    stored = await env.stored(call_id)
    assert stored["transfers"][-1]["state"] == "returned"
