"""Q.850 hangup causes as Asterisk reports them.

The adapter reports raw facts (`LegFailed` with the Q.850 cause, the SIP code and whether the
failure is our own); classification into outcomes belongs to `bridge.calls`. What stays here:
which causes, with no SIP response behind them, mean that our own PBX failed the leg.
"""

from __future__ import annotations

from bridge.pbx.ports import LegFailed, LegOutcome

# Causes Asterisk sets itself when it cannot place a leg at all (no SIP response from anyone):
# 66 channel/technology not implemented (no such endpoint), 47 resource unavailable,
# 58 bearer capability not available (no common codec), 81 invalid call reference.
LOCAL_CAUSES = frozenset({47, 58, 66, 81})

_BY_CAUSE: dict[int, LegOutcome] = {
    17: LegOutcome.BUSY,
    18: LegOutcome.NO_ANSWER,
    19: LegOutcome.NO_ANSWER,
    21: LegOutcome.REJECTED,
    1: LegOutcome.UNREACHABLE,
    3: LegOutcome.UNREACHABLE,
    20: LegOutcome.UNREACHABLE,
    22: LegOutcome.UNREACHABLE,
    27: LegOutcome.UNREACHABLE,
    28: LegOutcome.UNREACHABLE,
    38: LegOutcome.UNREACHABLE,
}

_BY_SIP: dict[int, LegOutcome] = {
    486: LegOutcome.BUSY,
    600: LegOutcome.BUSY,
    408: LegOutcome.NO_ANSWER,
    480: LegOutcome.NO_ANSWER,
    487: LegOutcome.NO_ANSWER,
    403: LegOutcome.REJECTED,
    603: LegOutcome.DECLINED,
    404: LegOutcome.UNREACHABLE,
    410: LegOutcome.UNREACHABLE,
    484: LegOutcome.UNREACHABLE,
}


def leg_outcome(event: LegFailed, *, rang: bool) -> LegOutcome:
    """Interim classification until `bridge.calls.outcomes` (core) replaces it: SIP code over
    Q.850; local failures are `failed`; a timeout with neither 180 nor 183 is unreachable."""
    if event.local:
        return LegOutcome.FAILED
    outcome = LegOutcome.FAILED
    if event.sip_code is not None and event.sip_code in _BY_SIP:
        outcome = _BY_SIP[event.sip_code]
    elif event.cause is not None and event.cause in _BY_CAUSE:
        outcome = _BY_CAUSE[event.cause]
    if outcome is LegOutcome.NO_ANSWER and not rang:
        return LegOutcome.UNREACHABLE
    return outcome
