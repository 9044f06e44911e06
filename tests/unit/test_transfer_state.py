"""Every state × event of the transfer table: the legal ones move, the rest raise."""

from __future__ import annotations

import itertools

import pytest

from bridge.calls.transfer import (
    FINAL_STATES,
    TRANSITIONS,
    IllegalTransition,
    Transfer,
    TransferEvent,
    TransferState,
    transfer_from_doc,
    transfer_to_doc,
)
from bridge.pbx.ports import DialTarget, LegOutcome


def make(state: TransferState = TransferState.ANNOUNCING) -> Transfer:
    t = Transfer(
        id="t1",
        call_id="c1",
        source="api",
        destination="+31612345678",
        target=DialTarget(number="+31612345678", trunk_id="trunk"),
        mode="bridge",
        ring_timeout=30,
    )
    t.state = state
    return t


@pytest.mark.parametrize(("state", "event"), list(itertools.product(TransferState, TransferEvent)))
def test_table_is_total_and_explicit(state: TransferState, event: TransferEvent) -> None:
    t = make(state)
    expected = TRANSITIONS.get((state, event))
    if expected is None:
        with pytest.raises(IllegalTransition):
            t.apply(event)
        assert t.state is state  # an illegal event changes nothing
    else:
        assert t.apply(event) is expected
        assert t.history[-1][0] is expected


def test_final_states_have_no_way_out() -> None:
    for state, event in TRANSITIONS:
        if (state, event) == (TransferState.BRIDGED, TransferEvent.RETURNED):
            continue  # hand back (issue 9 §5): the one way out of a bridge, to a final state
        assert state not in FINAL_STATES


def test_a_bridged_transfer_handed_back_is_returned_and_round_trips() -> None:
    t = make(TransferState.BRIDGED)
    t.outcome = LegOutcome.ANSWERED
    assert t.apply(TransferEvent.RETURNED) is TransferState.RETURNED and t.final
    t.returned_by, t.returned_detail, t.returned_at = "agent_dtmf", "##", t.updated_at
    t.reason = "the destination handed the caller back (DTMF ##)"
    assert t.result().caller_back and not t.result().transferred
    assert t.result_for_assistant() == {
        "transferred": False,
        "outcome": "returned",
        "returned_by": "agent_dtmf",
        "cause": "the destination handed the caller back (DTMF ##)",
    }
    back = transfer_from_doc(transfer_to_doc(t))
    assert back.public_dict() == t.public_dict()
    assert back.public_dict()["returned"]["detail"] == "##"
    for event in TransferEvent:  # nothing leaves RETURNED
        with pytest.raises(IllegalTransition):
            back.apply(event)


def test_happy_path_and_typed_outcome() -> None:
    t = make()
    for event in (
        TransferEvent.MESSAGE_DONE,
        TransferEvent.LEG_RINGING,
        TransferEvent.LEG_ANSWERED,
    ):
        t.apply(event)
    t.settle(TransferEvent.CONNECTED, LegOutcome.ANSWERED)
    assert t.state is TransferState.BRIDGED and t.final
    assert [s for s, _ in t.history] == [
        TransferState.ANNOUNCING,
        TransferState.DIALING,
        TransferState.RINGING,
        TransferState.ANSWERED,
        TransferState.BRIDGED,
    ]
    assert t.result_for_assistant() == {
        "transferred": True,
        "outcome": "answered",
        "sip_code": None,
        "cause": None,
    }


def test_busy_is_recorded_with_cause_and_sip_code() -> None:
    t = make(TransferState.RINGING)
    t.settle(
        TransferEvent.LEG_FAILED, LegOutcome.BUSY, cause=17, cause_text="User busy", sip_code=486
    )
    data = t.public_dict()
    assert (data["state"], data["outcome"], data["cause"], data["sip_code"]) == (
        "failed",
        "busy",
        17,
        486,
    )
    assert t.result_for_assistant()["transferred"] is False


def test_round_trip_through_storage_document() -> None:
    t = make()
    t.leg_id = "cbleg-1"
    t.apply(TransferEvent.MESSAGE_DONE)
    again = transfer_from_doc(transfer_to_doc(t))
    assert again.public_dict() == t.public_dict()
    assert again.leg_id == "cbleg-1" and again.target == t.target
