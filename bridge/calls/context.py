"""Context a transfer carries into the PBX's own artefacts (issue 9 §6): the new leg's channel
variables, the SIP headers of its INVITE, and the outcome in the caller's CDR.

Values come from callers and API clients (a summary, a description): they are reduced here to
one line of plain printable ASCII with none of the characters a dial string, a FreeSWITCH
originate variable block or a SIP header would re-parse, and capped in length."""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.calls.model import Call
    from bridge.calls.transfer import Transfer

MAX_VALUE = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9 .:;_/+@#?!()*=-]")


def safe_value(text: str | None, limit: int = MAX_VALUE) -> str:
    """`text` as one safe line: accents dropped, anything else unsafe becomes a space."""
    if not text:
        return ""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return " ".join(_UNSAFE.sub(" ", ascii_text).split())[:limit]


def summary_of(transfer: Transfer) -> str:
    """Why the caller is coming: the summary given with the transfer, else the destination's
    description (an assistant's transfer), else nothing."""
    return safe_value(transfer.summary or transfer.label)


def leg_fields(call: Call, transfer: Transfer) -> dict[str, str]:
    return {
        "call_id": call.id,
        "transfer_id": transfer.id,
        "summary": summary_of(transfer),
        "caller": safe_value(call.caller_number, 64),
        "destination": safe_value(transfer.destination, 300),
    }


def leg_variables(call: Call, transfer: Transfer) -> dict[str, str]:
    """Channel variables of the new leg (inherited by a dialplan/queue target's own legs)."""
    fields = leg_fields(call, transfer)
    out = {
        "CALLBRIDGE_CALL_ID": fields["call_id"],
        "CALLBRIDGE_TRANSFER_ID": fields["transfer_id"],
    }
    if fields["summary"]:
        out["CALLBRIDGE_SUMMARY"] = fields["summary"]
    if fields["caller"]:
        out["CALLBRIDGE_CALLER"] = fields["caller"]
    return out


def leg_headers(call: Call, transfer: Transfer, names: dict[str, str]) -> dict[str, str]:
    """The configured SIP headers (`transfer.sip_headers`: name -> field), empty ones left out."""
    fields = leg_fields(call, transfer)
    return {name: fields[field] for name, field in names.items() if fields.get(field)}


def outcome_fields(transfer: Transfer) -> dict[str, str]:
    """What the caller's CDR records of a settled transfer."""
    return {
        "transfer_id": transfer.id,
        "outcome": (transfer.outcome.value if transfer.outcome else transfer.state.value),
        "destination": safe_value(transfer.destination, 300),
    }
