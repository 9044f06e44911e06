"""The PBX-neutral call model: a call, its transfers, and the control commands."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from bridge.calls.destinations import is_internal, parse_internal
from bridge.directory.models import E164, check_sip_uri


def utcnow() -> datetime:
    return datetime.now(UTC)


class CallStatus(StrEnum):
    ACTIVE = "active"  # with the assistant
    TRANSFERRING = "transferring"  # a transfer is under way; caller hears message / ringback
    TRANSFERRED = "transferred"  # bridged to a human (bridge mode) or handed off (blind)
    # ... and TRANSFERRED -> ACTIVE when a bridged caller is handed back (issue 9 §5),
    # recorded as `transfer.returned` + `call.resumed` with the call, in one commit.
    ENDED = "ended"


@dataclass
class Call:
    id: str
    pbx: str
    channel_id: str
    status: CallStatus
    started_at: datetime
    number_id: str | None = None
    number: str | None = None
    assistant_id: str | None = None
    caller_number: str | None = None
    caller_name: str | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    end_reason: str | None = None

    def public_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status.value,
            "pbx": self.pbx,
            "channel_id": self.channel_id,
            "number_id": self.number_id,
            "number": self.number,
            "assistant_id": self.assistant_id,
            "caller_number": self.caller_number,
            "caller_name": self.caller_name,
            "started_at": _iso(self.started_at),
            "answered_at": _iso(self.answered_at),
            "ended_at": _iso(self.ended_at),
            "end_reason": self.end_reason,
        }


@dataclass
class CallEvent:
    kind: str
    at: datetime
    data: dict[str, Any] = field(default_factory=dict)

    def public_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "at": _iso(self.at), **self.data}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


# --- control commands (POST /calls/{id}/control) ---------------------------------------------


def check_destination(value: str) -> str:
    """A transfer destination: an E.164 number, a SIP URI, or a destination inside the PBX
    (`extension:1001`, `queue:support`, `dialplan:100@ringgroups`; issue 9)."""
    if value.startswith(("sip:", "sips:")):
        return check_sip_uri(value)
    if is_internal(value):
        parse_internal(value)
        return value
    if not E164.match(value):
        raise ValueError(
            "must be an E.164 number (+31612345678), a SIP URI (sip:...), or extension:<name>,"
            " queue:<name>, dialplan:<extension>@<context>"
        )
    return value


# A music-on-hold class name (Asterisk musiconhold.conf, FreeSWITCH local_stream).
MOH_CLASS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class TransferCommand(_Command):
    type: Literal["transfer"]
    destination: str = Field(min_length=1, max_length=300)
    message: str | None = Field(default=None, max_length=1000)
    mode: Literal["bridge", "blind", "warm"] | None = None
    ring_timeout: float | None = Field(default=None, gt=0, le=300)
    # Why the caller is coming (issue 9 §6): on the leg's variables and SIP headers.
    summary: str | None = Field(default=None, max_length=300)
    # --- warm transfer (issue 9 §2): used with mode "warm"; unset: the destination's own
    # settings (an assistant's destination), then `[transfer]`'s ---
    brief: str | None = Field(default=None, max_length=1000)
    require_accept: bool | None = None
    accept_timeout: float | None = Field(default=None, gt=0, le=120)
    wait_for_speech: bool | None = None
    moh_class: str | None = Field(default=None, pattern=MOH_CLASS_PATTERN)

    _destination = field_validator("destination")(check_destination)

    # --- fallback chain (issue 9 §3, `bridge.calls.chain`): tried in order after
    # `destination` on busy / no answer / decline; each through the transfer policy.
    fallbacks: (
        list[Annotated[str, Field(min_length=1, max_length=300), AfterValidator(check_destination)]]
        | None
    ) = Field(default=None, min_length=1, max_length=10)

    @field_validator("fallbacks")
    @classmethod
    def _chain_bridges(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value and info.data.get("mode") == "blind":
            raise ValueError("a blind transfer cannot fall back: callbridge never sees its outcome")
        return value


class SayCommand(_Command):
    type: Literal["say"]
    message: str = Field(min_length=1, max_length=1000)


class EndCallCommand(_Command):
    type: Literal["end_call"]
    message: str | None = Field(default=None, max_length=1000)


# --- hand back (issue 9 §5) ---
class ReturnCommand(_Command):
    """After a bridged transfer: the destination leg is hung up and the caller comes back to
    the assistant, which says `message` (else the assistant's `handback.message`)."""

    type: Literal["return"]
    message: str | None = Field(default=None, min_length=1, max_length=1000)


ControlCommand = Annotated[
    TransferCommand | SayCommand | EndCallCommand | ReturnCommand, Field(discriminator="type")
]
