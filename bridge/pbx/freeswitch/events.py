"""FreeSWITCH's channel events in the PBX port's terms (raw facts; what a failure means is
decided in `bridge.calls.outcomes`).

Pure functions over `EslEvent`, so the mapping is tested without a socket. Facts behind the
tables (docs/freeswitch-esl-notes.md, measured on 1.10.12): a refused originated leg reports
`Hangup-Cause` (USER_BUSY, CALL_REJECTED, NO_ANSWER, ...) and `variable_sip_term_status` (486,
603, ...) in its CHANNEL_HANGUP, which comes before the originate's BACKGROUND_JOB; q850 codes
arrive as `variable_hangup_cause_q850` only later, so they are derived from the cause name.
"""

from __future__ import annotations

import re

from bridge.pbx.freeswitch.esl_protocol import EslEvent
from bridge.pbx.ports import CallArrived

LEG_PREFIX = "cbleg-"  # the call service names outbound legs so; we use it as their uuid
DEFAULT_MARKER = "callbridge"  # channel variable the dialplan sets on callers for us

# FreeSWITCH cause names (switch_channel_cause2str) -> Q.850 code.
Q850: dict[str, int] = {
    "UNALLOCATED_NUMBER": 1,
    "NO_ROUTE_DESTINATION": 3,
    "NORMAL_CLEARING": 16,
    "USER_BUSY": 17,
    "NO_USER_RESPONSE": 18,
    "NO_ANSWER": 19,
    "SUBSCRIBER_ABSENT": 20,
    "CALL_REJECTED": 21,
    "NUMBER_CHANGED": 22,
    "DESTINATION_OUT_OF_ORDER": 27,
    "INVALID_NUMBER_FORMAT": 28,
    "NORMAL_UNSPECIFIED": 31,
    "NORMAL_CIRCUIT_CONGESTION": 34,
    "NETWORK_OUT_OF_ORDER": 38,
    "NORMAL_TEMPORARY_FAILURE": 41,
    "SWITCH_CONGESTION": 42,
    "CHAN_NOT_IMPLEMENTED": 66,
    "RECOVERY_ON_TIMER_EXPIRE": 102,
    "INTERWORKING": 127,
    "ORIGINATOR_CANCEL": 487,
    "MANAGER_REQUEST": 503,
}


def is_leg(uuid: str) -> bool:
    return uuid.startswith(LEG_PREFIX)


def q850(event: EslEvent) -> int | None:
    raw = event.variable("hangup_cause_q850")
    if raw and raw.isdigit():
        return int(raw)
    return Q850.get(event.get("Hangup-Cause") or "")


def sip_code(event: EslEvent) -> int | None:
    """The far end's final SIP status of a refused leg (`sip_term_status`)."""
    raw = event.variable("sip_term_status") or ""
    return int(raw) if raw.isdigit() else None


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def arrival(event: EslEvent, marker: str = DEFAULT_MARKER) -> CallArrived | None:
    """A caller parked for us (CHANNEL_PARK of an inbound channel carrying the marker)."""
    uuid = event.unique_id or ""
    if not uuid or is_leg(uuid) or not truthy(event.variable(marker)):
        return None
    prefix = f"variable_{marker}"
    return CallArrived(
        channel_id=uuid,
        called_number=event.get("Caller-Destination-Number") or "",
        caller_number=event.get("Caller-Caller-ID-Number") or None,
        caller_name=event.get("Caller-Caller-ID-Name") or None,
        variables={
            k[len("variable_") :]: v for k, v in event.headers.items() if k.startswith(prefix)
        },
    )


def arrival_from_row(row: dict[str, str]) -> CallArrived:
    """A caller as `show channels as json` lists it (for resync after a reconnect)."""
    return CallArrived(
        channel_id=row.get("uuid", ""),
        called_number=row.get("dest", ""),
        caller_number=row.get("cid_num") or None,
        caller_name=row.get("cid_name") or None,
    )


_ORIGINATION_UUID = re.compile(r"origination_uuid=([^,}\s]+)")


def originated_leg(event: EslEvent) -> str | None:
    """The leg a BACKGROUND_JOB of our `originate` reports on (from its command line)."""
    if event.get("Job-Command") != "originate":
        return None
    m = _ORIGINATION_UUID.search(event.get("Job-Command-Arg") or "")
    return m.group(1) if m else None


def job_failure(event: EslEvent) -> str | None:
    """`-ERR USER_BUSY` -> "USER_BUSY"; None when the job succeeded."""
    body = (event.body or "").strip()
    if not body.startswith("-ERR"):
        return None
    return body[4:].strip() or "NORMAL_TEMPORARY_FAILURE"
