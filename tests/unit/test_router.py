"""`CallRouter` on its own (issue 7 section 9): which session a channel's events go to."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from bridge.calls.router import CallRouter
from bridge.calls.transfer import TransferState


def _session(call_id: str, channel: str, transfer: Any = None) -> Any:
    return SimpleNamespace(call=SimpleNamespace(id=call_id, channel_id=channel), transfer=transfer)


def _transfer(state: TransferState, leg: str | None, final: bool = False) -> Any:
    return SimpleNamespace(id="t1", state=state, leg_id=leg, final=final)


def test_a_session_is_found_by_call_id_and_by_its_caller() -> None:
    router = CallRouter()
    s = _session("c1", "ch1")
    router.register(s)
    assert router.session("c1") is s and router.for_channel("ch1") is s and len(router) == 1
    router.forget(s)
    assert router.session("c1") is None and router.for_channel("ch1") is None


def test_a_placed_leg_routes_to_its_session_and_a_failed_one_does_not() -> None:
    router = CallRouter()
    ringing = _session("c1", "ch1", _transfer(TransferState.RINGING, "cbleg-a"))
    failed = _session("c2", "ch2", _transfer(TransferState.FAILED, "cbleg-b", final=True))
    router.register(ringing)
    router.register(failed)
    assert router.for_channel("cbleg-a") is ringing
    assert router.for_channel("cbleg-b") is None


def test_an_unrecorded_leg_routes_by_its_derived_id() -> None:
    """A transfer recorded before its leg (announcing): a leg our predecessor may have
    placed is `cbleg-<transfer id>`; its events must reach the session."""
    router = CallRouter()
    s = _session("c1", "ch1", _transfer(TransferState.ANNOUNCING, None))
    router.register(s)
    assert router.for_channel("cbleg-t1") is s


def test_a_bridged_leg_stays_routed_when_kept() -> None:
    router = CallRouter()
    s = _session("c1", "ch1")
    router.register(s)
    router.track_leg("cbleg-x", s)
    router.untrack_leg("cbleg-x", keep=True)
    assert router.for_channel("cbleg-x") is s
    router.untrack_leg("cbleg-x", keep=False)
    assert router.for_channel("cbleg-x") is None
    router.track_leg("cbleg-y", s)
    router.forget(s)
    assert router.by_channel == {} and router.by_id == {}
