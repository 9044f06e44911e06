"""Hand back to the assistant (issue 9 §5), written once, run on Asterisk and on FreeSWITCH.

A control transfer bridges the caller with the destination; then the caller comes back to
the assistant by the control API's `return`, by the destination pressing the hand-back code,
or because the destination hangs up first (when the assistant is set to take the caller
back; by default the caller is hung up). Back means: the call is active, the transfer is
`returned` (how, when), the destination's leg is gone, and the caller hears the assistant.
"""

from __future__ import annotations

from typing import Any

from tests.behaviour import test_pbx_behaviour as suite
from tests.behaviour.backends import Backend
from tests.support.daemon import Api, wait_for
from tests.support.flows import DESTINATION, DID, active_call, setup_directory, transfer_settled

api = suite.api  # the suite's daemon per test, its calls ended afterwards


async def bridged_call(
    backend: Backend, api: Api, behaviour: str = "answer", **handback: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """A caller greeted, then bridged by a control transfer to `behaviour`'s destination."""
    dest = await backend.destination(behaviour)
    world = await setup_directory(api, suite._Trunk(dest.port), auth=False)  # type: ignore[arg-type]
    if handback:
        patch = {"handback": handback}
        await api.ok("PATCH", f"/assistants/{world['assistant']['id']}", patch)
    caller = await backend.caller(DID)
    call = await active_call(api)
    await caller.heard_speech(since=0)
    control = f"/calls/{call['id']}/control"
    await api.ok("POST", control, {"type": "transfer", "destination": DESTINATION})
    done = await transfer_settled(api, call["id"])
    assert done["transfers"][-1]["state"] == "bridged", done["transfers"][-1]
    await dest.assert_bridged(caller)
    return dest, caller, call


async def back_with_the_assistant(
    api: Api, caller: Any, call_id: str, since: float, by: str
) -> dict[str, Any]:
    async def back() -> dict[str, Any] | None:
        data = await api.ok("GET", f"/calls/{call_id}")
        returned = data["status"] == "active" and data["transfers"][-1]["state"] == "returned"
        return data if returned else None

    data = await wait_for(back, "the caller back with the assistant", timeout=20)
    transfer = data["transfers"][-1]
    assert transfer["returned"]["by"] == by and transfer["returned"]["at"], transfer
    kinds = [e["type"] for e in data["events"]]
    assert kinds[kinds.index("transfer.returned") + 1] == "call.resumed"
    await caller.heard_words(since=since)  # the return line, through re-attached media
    assert caller.connected()
    return data


async def test_return_command_hands_the_caller_back(backend: Backend, api: Api) -> None:
    _, caller, call = await bridged_call(backend, api)
    since = caller.mark()
    control = f"/calls/{call['id']}/control"
    reply = await api.ok("POST", control, {"type": "return", "message": "Welcome back."})
    assert reply["accepted"] == "return"
    await back_with_the_assistant(api, caller, call["id"], since, "api")
    # Not bridged any more: a second return is a 409 that says why.
    status, body = await api.request("POST", control, {"type": "return"})
    assert status == 409 and "no bridged transfer" in body["error"]["message"], body


async def test_the_destinations_code_hands_the_caller_back(backend: Backend, api: Api) -> None:
    dest, caller, call = await bridged_call(backend, api)
    since = caller.mark()
    await dest.press("##")
    data = await back_with_the_assistant(api, caller, call["id"], since, "agent_dtmf")
    assert data["transfers"][-1]["returned"]["detail"] == "##"


async def test_destination_hangup_returns_the_caller_when_enabled(
    backend: Backend, api: Api
) -> None:
    dest, caller, call = await bridged_call(
        backend, api, "answer_then_bye", return_on_destination_hangup=True
    )
    since = caller.mark()
    await dest.hang_up()
    data = await back_with_the_assistant(api, caller, call["id"], since, "destination_hangup")
    assert "transfer.destination_hung_up" in [e["type"] for e in data["events"]]
