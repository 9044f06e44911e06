"""Q.850 hangup causes (as Asterisk reports them) and SIP codes → a typed leg outcome."""

from __future__ import annotations

from bridge.pbx.ports import LegOutcome

_BY_CAUSE: dict[int, LegOutcome] = {
    17: LegOutcome.BUSY,  # user busy (486, 600)
    18: LegOutcome.NO_ANSWER,  # no user responding (408)
    19: LegOutcome.NO_ANSWER,  # no answer from user (480 after ringing, our timeout)
    21: LegOutcome.REJECTED,  # call rejected (403, 603)
    1: LegOutcome.UNREACHABLE,  # unallocated number (404)
    3: LegOutcome.UNREACHABLE,  # no route to destination
    20: LegOutcome.UNREACHABLE,  # subscriber absent (480)
    22: LegOutcome.UNREACHABLE,  # number changed (410)
    27: LegOutcome.UNREACHABLE,  # destination out of order (502)
    28: LegOutcome.UNREACHABLE,  # invalid number format (484)
    38: LegOutcome.UNREACHABLE,  # network out of order
    66: LegOutcome.UNREACHABLE,  # channel not implemented (no such endpoint)
}

_BY_SIP: dict[int, LegOutcome] = {
    486: LegOutcome.BUSY,
    600: LegOutcome.BUSY,
    408: LegOutcome.NO_ANSWER,
    480: LegOutcome.NO_ANSWER,
    487: LegOutcome.NO_ANSWER,  # our CANCEL after the ring timeout
    403: LegOutcome.REJECTED,
    603: LegOutcome.REJECTED,
    404: LegOutcome.UNREACHABLE,
    410: LegOutcome.UNREACHABLE,
    484: LegOutcome.UNREACHABLE,
}


def leg_outcome(cause: int | None, sip_code: int | None = None) -> LegOutcome:
    """The most specific outcome we can name; a SIP code wins over the Q.850 cause."""
    if sip_code is not None and sip_code in _BY_SIP:
        return _BY_SIP[sip_code]
    if cause is not None and cause in _BY_CAUSE:
        return _BY_CAUSE[cause]
    return LegOutcome.FAILED
