"""Transfer edges (issue 7 section 7), written once, run on Asterisk and on FreeSWITCH.

After the bridge, the destination hangs up first: by default the caller is hung up too. A
transfer the PBX never reports on is failed by the ring guard, the caller back with the
assistant. `end_call` while the destination rings cancels the leg at once and settles the
transfer `cancelled`. A daemon restart while the destination rings: the new process stops
the old ringback, the transfer settles and the caller is back with the assistant, one call
record. Each asserts what the caller hears where it matters, and the record.
"""

from __future__ import annotations

from typing import Any

from tests.behaviour import test_pbx_behaviour as suite
from tests.behaviour.backends import Backend
from tests.behaviour.test_handback_behaviour import bridged_call
from tests.support import flows
from tests.support.daemon import Api, wait_for
from tests.support.flows import DESTINATION, DID, active_call, setup_directory

api = suite.api  # the suite's daemon per test, its calls ended afterwards


async def ringing_transfer(
    backend: Backend, api: Api, ring_timeout: float, behaviour: str = "no_answer"
) -> tuple[Any, Any, dict[str, Any]]:
    """A greeted caller, control-transferred to `behaviour`'s destination, once it rings."""
    dest = await backend.destination(behaviour)
    await setup_directory(api, suite._Trunk(dest.port), auth=False)  # type: ignore[arg-type]
    caller = await backend.caller(DID)
    call = await active_call(api)
    await caller.heard_speech(since=0)
    body = {"type": "transfer", "destination": DESTINATION, "ring_timeout": ring_timeout}
    await api.ok("POST", f"/calls/{call['id']}/control", body)
    await flows.transfer_in_state(api, call["id"], "ringing")
    await wait_for(lambda: suite._is(dest.invited()), "the INVITE at the destination", 10)
    return dest, caller, call


async def test_destination_hanging_up_after_the_bridge_hangs_up_the_caller(
    backend: Backend, api: Api
) -> None:
    dest, caller, call = await bridged_call(backend, api, "answer_then_bye")
    await dest.hang_up()
    assert await caller.wait_bye(), "the caller was left on a dead bridge"
    final = await wait_for(lambda: suite._ended(api, call["id"]), "the call to end", 15)
    assert final["end_reason"] == "destination hung up", final
    assert "transfer.destination_hung_up" in [e["type"] for e in final["events"]]

    async def nothing_left() -> bool:
        return not await backend.legs_left()

    await wait_for(nothing_left, "no leg left in the PBX", 10)


async def test_ring_guard_fails_a_transfer_the_pbx_never_reports(
    backend: Backend, api: Api
) -> None:
    """Every report of the leg is lost (dropped before the call service sees it), its ringing
    and its end too: the session's ring guard (ring timeout + margin) brings the caller back,
    and the failure is the PBX's (a local fault), not the destination's."""
    dest = await backend.destination("no_answer")
    await setup_directory(api, suite._Trunk(dest.port), auth=False)  # type: ignore[arg-type]
    caller = await backend.caller(DID)
    call = await active_call(api)
    await caller.heard_speech(since=0)
    backend.lose_leg_reports(backend.daemon)  # type: ignore[attr-defined]
    body = {"type": "transfer", "destination": DESTINATION, "ring_timeout": 1}
    await api.ok("POST", f"/calls/{call['id']}/control", body)
    done = await flows.transfer_settled(api, call["id"], timeout=25)
    settled_at = caller.mark()
    transfer = done["transfers"][-1]
    assert (transfer["state"], transfer["outcome"]) == ("failed", "failed"), transfer
    assert transfer["local_fault"] is True
    assert dest.invited()
    await wait_for(lambda: suite._is_status(api, call["id"], "active"), "the call to be active")
    await caller.heard_words(since=settled_at)  # the assistant explains ...
    await caller.no_ringback_after(settled_at)  # ... and the ringback has stopped
    assert caller.connected()


async def test_end_call_while_the_destination_rings_cancels_the_leg_at_once(
    backend: Backend, api: Api
) -> None:
    dest, caller, call = await ringing_transfer(backend, api, ring_timeout=30)
    await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
    # Cancelled now, not after the 30 s ring timeout.
    await wait_for(lambda: suite._is(dest.cancelled()), "the ringing leg to be cancelled", 5)
    assert await caller.wait_bye()
    final = await wait_for(lambda: suite._ended(api, call["id"]), "the call to end", 15)
    assert final["end_reason"] == "ended by command", final
    transfer = final["transfers"][-1]
    assert (transfer["state"], transfer["outcome"]) == ("cancelled", "cancelled"), transfer
    stats = await api.ok("GET", "/transfers/stats")
    assert (stats["by_outcome"], stats["in_progress"]) == ({"cancelled": 1}, 0), stats


async def restart(backend: Backend) -> Api:
    """The daemon stops (its callers and legs stay in the PBX) and a new process takes over
    on the same database: the suite's fixture ends what the new one holds."""
    await backend.api.close()  # type: ignore[attr-defined]
    await backend.daemon.stop()  # type: ignore[attr-defined]
    backend.daemon, backend.api = await backend.start_daemon()  # type: ignore[attr-defined]
    return backend.api  # type: ignore[attr-defined, no-any-return]


async def test_restart_while_the_destination_rings_never_leaves_endless_ringback(
    backend: Backend, api: Api
) -> None:
    """The daemon stops while the destination rings; a new process takes the call over
    while it still rings. Then the ring time runs out (the PBX ends the leg NO_ANSWER, at a
    moment the test chooses: a restart takes seconds while models load): the new process
    stops the ringback its predecessor started (by an id derived from the transfer), the
    transfer settles `no_answer`, and the caller is back with the assistant. Never on
    endless ringback, never adopted as a second call."""
    _dest, caller, call = await ringing_transfer(backend, api, ring_timeout=120)
    data = await api.ok("GET", f"/calls/{call['id']}")
    (dialing,) = [e for e in data["events"] if e["type"] == "transfer.dialing"]
    resumed = [e["type"] for e in data["events"]].count("call.resumed")
    api = await restart(backend)

    async def taken_over() -> bool:
        kinds = [e["type"] for e in (await api.ok("GET", f"/calls/{call['id']}"))["events"]]
        return kinds.count("call.resumed") > resumed

    await wait_for(taken_over, "the new process to take the call over", 15)
    assert (await api.ok("GET", f"/calls/{call['id']}"))["transfers"][-1]["state"] == "ringing"
    await backend.ring_out(dialing["leg"])
    done = await flows.transfer_settled(api, call["id"])
    settled_at = caller.mark()
    last = done["transfers"][-1]
    assert (last["state"], last["outcome"]) == ("failed", "no_answer"), last
    await wait_for(lambda: suite._is_status(api, call["id"], "active"), "the call to be active")
    await caller.heard_words(since=settled_at)  # the assistant speaks again ...
    await caller.no_ringback_after(settled_at)  # ... and the old ringback is gone
    calls = (await api.ok("GET", "/calls"))["data"]
    assert [c["id"] for c in calls] == [call["id"]]
    await api.ok("POST", f"/calls/{call['id']}/control", {"type": "end_call"})
    assert await caller.wait_bye()
