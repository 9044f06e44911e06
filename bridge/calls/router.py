"""Which call session a PBX event goes to (split out of `CallService`, issue 7 section 9).

A session is found by its call id (the API) or by any channel it owns: its caller, and the
leg of its transfer while that leg matters (placed, ringing, bridged). Events for channels
nobody owns are the service's to handle (destination tests, orphan legs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge.calls.transfer import TransferState
from bridge.calls.transferring import leg_for

if TYPE_CHECKING:
    from bridge.calls.session import CallSession


class CallRouter:
    def __init__(self) -> None:
        self.by_id: dict[str, CallSession] = {}
        self.by_channel: dict[str, CallSession] = {}

    def session(self, call_id: str) -> CallSession | None:
        return self.by_id.get(call_id)

    def for_channel(self, channel_id: str) -> CallSession | None:
        return self.by_channel.get(channel_id)

    def sessions(self) -> list[CallSession]:
        return list(self.by_id.values())

    def __len__(self) -> int:
        return len(self.by_id)

    def register(self, session: CallSession) -> None:
        """Route the session's caller, and its transfer's leg if the transfer still needs
        it (a leg not recorded yet has its derived id: our predecessor may have placed it)."""
        self.by_id[session.call.id] = session
        self.by_channel[session.call.channel_id] = session
        transfer = session.transfer
        if (
            transfer is not None
            and transfer.leg_id
            and transfer.state not in (TransferState.FAILED, TransferState.RETURNED)
        ):
            self.by_channel[transfer.leg_id] = session
        elif transfer is not None and not transfer.final:
            self.by_channel[leg_for(transfer)] = session

    def track_leg(self, leg_id: str, session: CallSession) -> None:
        self.by_channel[leg_id] = session

    def untrack_leg(self, leg_id: str, *, keep: bool) -> None:
        """Stop routing a leg's events, unless it stays bridged (its hangup still matters)."""
        if not keep:
            self.by_channel.pop(leg_id, None)

    def forget(self, session: CallSession) -> None:
        self.by_id.pop(session.call.id, None)
        for key in [k for k, v in self.by_channel.items() if v is session]:
            del self.by_channel[key]
