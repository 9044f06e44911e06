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

# FreeSWITCH cause names (switch_channel_cause2str) -> Q.850 code (switch_types.h); only
# the real Q.850 ones: FreeSWITCH's own causes (ORIGINATOR_CANCEL 487, MANAGER_REQUEST 703,
# INVALID_GATEWAY 808, ...) have no Q.850 number and are reported by name only.
Q850: dict[str, int] = {
    "UNALLOCATED_NUMBER": 1,
    "NO_ROUTE_TRANSIT_NET": 2,
    "NO_ROUTE_DESTINATION": 3,
    "CHANNEL_UNACCEPTABLE": 6,
    "CALL_AWARDED_DELIVERED": 7,
    "NORMAL_CLEARING": 16,
    "USER_BUSY": 17,
    "NO_USER_RESPONSE": 18,
    "NO_ANSWER": 19,
    "SUBSCRIBER_ABSENT": 20,
    "CALL_REJECTED": 21,
    "NUMBER_CHANGED": 22,
    "REDIRECTION_TO_NEW_DESTINATION": 23,
    "EXCHANGE_ROUTING_ERROR": 25,
    "DESTINATION_OUT_OF_ORDER": 27,
    "INVALID_NUMBER_FORMAT": 28,
    "FACILITY_REJECTED": 29,
    "RESPONSE_TO_STATUS_ENQUIRY": 30,
    "NORMAL_UNSPECIFIED": 31,
    "NORMAL_CIRCUIT_CONGESTION": 34,
    "NETWORK_OUT_OF_ORDER": 38,
    "NORMAL_TEMPORARY_FAILURE": 41,
    "SWITCH_CONGESTION": 42,
    "ACCESS_INFO_DISCARDED": 43,
    "REQUESTED_CHAN_UNAVAIL": 44,
    "PRE_EMPTED": 45,
    "FACILITY_NOT_SUBSCRIBED": 50,
    "OUTGOING_CALL_BARRED": 52,
    "INCOMING_CALL_BARRED": 54,
    "BEARERCAPABILITY_NOTAUTH": 57,
    "BEARERCAPABILITY_NOTAVAIL": 58,
    "SERVICE_UNAVAILABLE": 63,
    "BEARERCAPABILITY_NOTIMPL": 65,
    "CHAN_NOT_IMPLEMENTED": 66,
    "FACILITY_NOT_IMPLEMENTED": 69,
    "SERVICE_NOT_IMPLEMENTED": 79,
    "INVALID_CALL_REFERENCE": 81,
    "INCOMPATIBLE_DESTINATION": 88,
    "INVALID_MSG_UNSPECIFIED": 95,
    "MANDATORY_IE_MISSING": 96,
    "MESSAGE_TYPE_NONEXIST": 97,
    "WRONG_MESSAGE": 98,
    "IE_NONEXIST": 99,
    "INVALID_IE_CONTENTS": 100,
    "WRONG_CALL_STATE": 101,
    "RECOVERY_ON_TIMER_EXPIRE": 102,
    "MANDATORY_IE_LENGTH_ERROR": 103,
    "PROTOCOL_ERROR": 111,
    "INTERWORKING": 127,
}
# FreeSWITCH's own cause names (no Q.850 number).
FS_CAUSES = frozenset(
    """SUCCESS ORIGINATOR_CANCEL CRASH SYSTEM_SHUTDOWN LOSE_RACE MANAGER_REQUEST BLIND_TRANSFER
    ATTENDED_TRANSFER ALLOTTED_TIMEOUT USER_CHALLENGE MEDIA_TIMEOUT PICKED_OFF
    USER_NOT_REGISTERED PROGRESS_TIMEOUT INVALID_GATEWAY GATEWAY_DOWN INVALID_URL
    INVALID_PROFILE NO_PICKUP SRTP_READ_ERROR BOWOUT BUSY_EVERYWHERE DECLINE
    DOES_NOT_EXIST_ANYWHERE NOT_ACCEPTABLE UNWANTED NO_IDENTITY BAD_IDENTITY_INFO
    UNSUPPORTED_CERTIFICATE INVALID_IDENTITY STALE_DATE REJECT_ALL""".split()
)
CAUSE_NAMES = frozenset(Q850) | FS_CAUSES
# Failures inside our own FreeSWITCH (its configuration, its state), not the destination's:
# a gateway we provisioned is unknown or down, a dial string it cannot parse, a profile that
# is not running, an endpoint type it does not have, or it is shutting down.
LOCAL_CAUSES = frozenset(
    {
        "INVALID_GATEWAY",
        "GATEWAY_DOWN",
        "INVALID_URL",
        "INVALID_PROFILE",
        "CHAN_NOT_IMPLEMENTED",
        "SYSTEM_SHUTDOWN",
        "CRASH",
    }
)


def is_local(cause: str | None) -> bool:
    return (cause or "") in LOCAL_CAUSES


def is_leg(uuid: str) -> bool:
    return uuid.startswith(LEG_PREFIX)


def q850(event: EslEvent) -> int | None:
    """The Q.850 cause of a hangup: FreeSWITCH's `hangup_cause_q850` is its enum value, a
    Q.850 number only up to 127 (ORIGINATOR_CANCEL is 487, INVALID_GATEWAY 808, ...)."""
    raw = event.variable("hangup_cause_q850")
    if raw and raw.isdigit() and int(raw) <= 127:
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
