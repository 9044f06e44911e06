"""What an outbound leg's failure means: one classification for every PBX.

Adapters report raw facts (`LegFailed`: SIP code, Q.850 cause, the PBX's cause name, whether
the failure was local); the call domain decides the typed outcome here, with what the session
saw of the leg (did it ring? did it send 183 / early media?). Order of evidence:

1. a local failure (inside our PBX or daemon) is `failed` with a local reason, never the
   destination's fault (`unreachable` would blame a number that was never tried);
2. the far end's final SIP status;
3. the Q.850 cause (or the PBX's cause name when it has no Q.850 number);
4. `failed`.

A "no answer" from a destination that neither rang nor progressed is `unreachable` (nothing
answered the INVITE); one that sent 183 was alive, so it stays `no_answer`.
"""

from __future__ import annotations

from bridge.pbx.ports import LegFailed, LegOutcome

_BY_SIP: dict[int, tuple[LegOutcome, str]] = {
    486: (LegOutcome.BUSY, "busy"),
    600: (LegOutcome.BUSY, "busy everywhere"),
    603: (LegOutcome.DECLINED, "declined"),
    403: (LegOutcome.REJECTED, "forbidden"),
    408: (LegOutcome.NO_ANSWER, "no answer (request timeout)"),
    480: (LegOutcome.NO_ANSWER, "temporarily unavailable"),
    487: (LegOutcome.NO_ANSWER, "no answer (cancelled after the ring timeout)"),
    404: (LegOutcome.UNREACHABLE, "unknown number"),
    410: (LegOutcome.UNREACHABLE, "number gone"),
    484: (LegOutcome.UNREACHABLE, "incomplete number"),
    604: (LegOutcome.UNREACHABLE, "does not exist anywhere"),
}

# Q.850 cause numbers (ITU-T Q.850, as Asterisk and FreeSWITCH report them).
_BY_CAUSE: dict[int, tuple[LegOutcome, str]] = {
    17: (LegOutcome.BUSY, "busy"),
    18: (LegOutcome.NO_ANSWER, "no user responding"),
    19: (LegOutcome.NO_ANSWER, "no answer"),
    21: (LegOutcome.REJECTED, "call rejected"),
    1: (LegOutcome.UNREACHABLE, "unallocated number"),
    3: (LegOutcome.UNREACHABLE, "no route to destination"),
    20: (LegOutcome.UNREACHABLE, "subscriber absent"),
    22: (LegOutcome.UNREACHABLE, "number changed"),
    27: (LegOutcome.UNREACHABLE, "destination out of order"),
    28: (LegOutcome.UNREACHABLE, "invalid number format"),
    38: (LegOutcome.UNREACHABLE, "network out of order"),
    102: (LegOutcome.NO_ANSWER, "no SIP answer (timer expired)"),
    34: (LegOutcome.FAILED, "no circuit available (congestion)"),
    41: (LegOutcome.FAILED, "temporary failure"),
    42: (LegOutcome.FAILED, "switch congestion"),
}

# Causes that say our own side failed: no such channel technology / endpoint / gateway.
_LOCAL_CAUSES = frozenset({66})

# The PBX's cause names with no Q.850 number (FreeSWITCH's own causes).
_BY_NAME: dict[str, tuple[LegOutcome, str]] = {
    "ALLOTTED_TIMEOUT": (LegOutcome.NO_ANSWER, "no answer"),
    "ORIGINATOR_CANCEL": (LegOutcome.CANCELLED, "cancelled by us"),
    "MANAGER_REQUEST": (LegOutcome.CANCELLED, "hung up by us"),
}
_LOCAL_NAMES = frozenset(
    {"INVALID_GATEWAY", "GATEWAY_DOWN", "CHAN_NOT_IMPLEMENTED", "SYSTEM_SHUTDOWN"}
)

NEVER_RANG = "no response (it never rang)"


def classify_leg_failure(
    event: LegFailed, *, rang: bool, progressed: bool
) -> tuple[LegOutcome, str]:
    """The typed outcome of a failed leg and a short reason for people (and the assistant).

    `rang`: the session saw a `LegRinging` (180); `progressed`: a `LegProgress` (183)."""
    name = _name(event.cause_text)
    if event.local or event.cause in _LOCAL_CAUSES or name in _LOCAL_NAMES:
        return LegOutcome.FAILED, local_reason(event.cause_text or "the PBX could not place it")
    found: tuple[LegOutcome, str] | None = None
    if event.sip_code is not None:
        found = _BY_SIP.get(event.sip_code)
    if found is None and event.cause is not None:
        found = _BY_CAUSE.get(event.cause)
    if found is None and name:
        found = _BY_NAME.get(name)
    if found is None:
        detail = event.cause_text or (f"SIP {event.sip_code}" if event.sip_code else "")
        return LegOutcome.FAILED, f"failed ({detail})" if detail else "failed"
    outcome, reason = found
    if outcome is LegOutcome.NO_ANSWER and not rang and not progressed:
        # A timeout with neither 180 nor 183: nothing answered the INVITE at all.
        return LegOutcome.UNREACHABLE, NEVER_RANG
    return outcome, reason


LOCAL_PREFIX = "local failure (not the destination's): "


def local_reason(detail: str) -> str:
    """A failure in our own PBX or daemon: says so, so that nobody blames the destination."""
    return f"{LOCAL_PREFIX}{detail}"


def is_local(reason: str | None) -> bool:
    return bool(reason) and str(reason).startswith(LOCAL_PREFIX)


def timeout_outcome(*, rang: bool, progressed: bool) -> tuple[LegOutcome, str]:
    """Our guard ran out (ring timeout plus a margin) before the PBX reported anything final.
    The PBX enforces the ring timeout itself and reports the leg's end (a leg that never rang
    ends with the PBX's own failure long before): if it reported nothing, its report was lost,
    which is our fault, not the destination's, unless we saw it ring."""
    if rang or progressed:
        return LegOutcome.NO_ANSWER, "ring timeout"
    return LegOutcome.FAILED, local_reason("the PBX reported nothing about the leg in time")


def _name(text: str | None) -> str:
    return (text or "").strip().upper().replace(" ", "_")
