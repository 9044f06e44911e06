"""Hand back (issue 9 §5): after a bridged transfer, the caller comes back to the assistant.

Three triggers, one path:
- the destination (the human) presses the assistant's hand-back code on its phone (`##` by
  default, `handback.dtmf`); only the leg's digits count, never the caller's;
- the control API's `{"type": "return"}`;
- the destination hangs up first and the assistant takes the caller back
  (`handback.return_on_destination_hangup`; off by default: the caller is hung up).

The leg is hung up and the caller taken out of the bridge (`PbxAdapter.unbridge`), the
transfer moves BRIDGED → RETURNED with how, by whom and when, the call goes back to ACTIVE
(`transfer.returned` and `call.resumed`, one commit), then the host's `transfer_done`, the
same path a failed transfer takes (contract 2), attaches media, says the return line and hands
the conversation the typed result: it resumes with its history and listens again.

Blind transfers leave callbridge (the PBX has the caller), so they cannot be handed back.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from bridge.calls.context import outcome_fields
from bridge.calls.model import CallEvent, CallStatus, utcnow
from bridge.calls.transfer import TransferEvent, TransferState
from bridge.directory.models import Handback
from bridge.errors import BridgeError, Conflict
from bridge.pbx.ports import ChannelGone

if TYPE_CHECKING:
    from bridge.calls.transfer import Transfer
    from bridge.calls.transferring import TransferRun
    from bridge.directory.models import Assistant

BY_AGENT_DTMF = "agent_dtmf"
BY_API = "api"
BY_DESTINATION_HANGUP = "destination_hangup"

# Digits of the code further apart than this start the code again (a person presses `##` in
# well under a second; an IVR-like stray digit minutes earlier must not half-arm it).
CODE_GAP_S = 3.0


def settings_for(assistant: Assistant | None) -> Handback:
    """The assistant's hand-back settings (the defaults when it has none, or no assistant)."""
    configured = assistant.handback if assistant is not None else None
    return configured if configured is not None else Handback()


class CodeListener:
    """Recognises the hand-back code in the digits the destination's leg sends."""

    def __init__(self, code: str | None) -> None:
        self.code = code or ""
        self._digits = ""
        self._last = 0.0

    def feed(self, digit: str, now: float | None = None) -> bool:
        """One digit from the leg; True when it completes the code (then it starts over)."""
        if not self.code or len(digit) != 1:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last > CODE_GAP_S:
            self._digits = ""
        self._last = now
        self._digits = (self._digits + digit)[-len(self.code) :]
        if self._digits == self.code:
            self._digits = ""
            return True
        return False


def check_returnable(run: TransferRun | None, status: CallStatus) -> TransferRun:
    """The run to hand back, or a 409 that says why there is none."""
    if run is None or status is CallStatus.ACTIVE:
        raise Conflict(
            "cannot return the caller: the call is with the assistant (no bridged transfer)",
            field="type",
        )
    state = run.transfer.state
    if status is CallStatus.TRANSFERRING or state is not TransferState.BRIDGED:
        raise Conflict(
            f"cannot return the caller: the transfer is {state.value}, not bridged"
            " (only a bridged transfer can be handed back)",
            field="type",
        )
    return run


def return_line(transfer: Transfer, assistant: Assistant | None) -> str:
    """What the caller hears once back: the command's message, else the assistant's."""
    return transfer.returned_message or settings_for(assistant).message


async def hand_back(
    run: TransferRun, *, by: str, detail: str | None, reason: str, message: str | None = None
) -> bool:
    """Take the caller back from a bridged transfer (see the module). True when the caller
    is back with the assistant; False when the caller had left (the call ended). A PBX that
    refuses leaves the caller where it was, records `transfer.return_failed` and raises."""
    transfer, host, deps = run.transfer, run.host, run.deps
    leg = transfer.leg_id
    assert transfer.state is TransferState.BRIDGED and leg is not None
    host.log.info("transfer.returning", transfer_id=transfer.id, by=by)
    try:
        await deps.pbx.unbridge(host.call.channel_id, leg)
    except ChannelGone:
        await host.end("caller hung up")
        return False
    except BridgeError as exc:
        await host.record("transfer.return_failed", transfer_id=transfer.id, by=by, error=str(exc))
        raise
    deps.untrack_leg(leg, False)
    transfer.apply(TransferEvent.RETURNED)
    transfer.reason = reason
    transfer.returned_by, transfer.returned_detail = by, detail
    transfer.returned_at = transfer.updated_at
    transfer.returned_message = message
    run.release_claim()
    host.call.status = CallStatus.ACTIVE
    now = utcnow()
    returned = {"transfer_id": transfer.id, "by": by, "detail": detail, "reason": reason}
    resumed = {"status": "active", "reason": "returned", "transfer_id": transfer.id}
    await host.save(
        transfer,
        call=True,
        events=[
            CallEvent("transfer.returned", now, returned),
            CallEvent("call.resumed", now, resumed),
        ],
    )
    await host.quietly(
        "record_outcome",
        deps.pbx.record_outcome(
            host.call.channel_id, outcome_fields(transfer) | {"outcome": "returned"}
        ),
    )
    await host.transfer_done(transfer)
    return True
