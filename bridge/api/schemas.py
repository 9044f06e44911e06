"""Models of the API's requests and responses, for validation and for the OpenAPI document.

Most are derived from the domain models rather than written again: `patch_model` (what a PATCH
may send), `public_model` (what `public_dict` shows), `CallOut` (from the `Call` dataclass).
Only shapes that belong to the HTTP layer itself are written here (errors, health, control
acknowledgement, list query).
"""

from __future__ import annotations

import dataclasses
import typing
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, create_model, field_validator
from pydantic.fields import FieldInfo

from bridge.calls.model import Call, CallStatus, ControlCommand, check_destination
from bridge.directory.models import Assistant, Number, Trunk


def _create_model(model_name: str, /, **kwargs: Any) -> type[BaseModel]:
    return create_model(model_name, **kwargs)  # type: ignore[no-any-return, call-overload]


# Responses always carry every field, defaults included: say so in the schema.
_OUT = ConfigDict(json_schema_serialization_defaults_required=True)


def patch_model(model: type[BaseModel]) -> type[BaseModel]:
    """Every top-level field of `model` optional and nullable: the documented shape of a JSON
    merge patch (the service validates the merged object with `model` itself)."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        patched = FieldInfo.merge_field_infos(info, default=None)
        patched.default_factory = None
        fields[name] = (info.annotation | None, patched)
    return _create_model(
        f"{model.__name__.removesuffix('In')}Patch",
        __config__=ConfigDict(extra="forbid"),
        __doc__=(
            f"JSON merge patch (RFC 7396) of {model.__name__}: send only the fields to change."
            " Objects merge, lists are replaced whole, null removes a field."
        ),
        **fields,
    )


def public_model(
    model: type[BaseModel],
    name: str,
    *,
    exclude: frozenset[str] = frozenset(),
    add: dict[str, Any] | None = None,
) -> type[BaseModel]:
    """The shape of `model.public_dict()`: its fields minus `exclude`, plus `add`."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        if field_name in exclude:
            continue
        fields[field_name] = (info.annotation, info)
    return _create_model(name, __config__=_OUT, __doc__=model.__doc__, **fields, **(add or {}))


AssistantOut = public_model(Assistant, "Assistant")
NumberOut = public_model(Number, "Number")
TrunkOut = public_model(
    Trunk,
    "SipTrunk",
    exclude=frozenset({"password"}),
    add={"has_password": (bool, Field(description="The password is write-only."))},
)


def _call_out() -> type[BaseModel]:
    hints = typing.get_type_hints(Call)
    fields: dict[str, Any] = {
        f.name: (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(Call)
    }
    return create_model(  # type: ignore[no-any-return, call-overload]
        "Call", __config__=_OUT, __doc__="A call, as `Call.public_dict` shows it.", **fields
    )


CallOut = _call_out()
CallDetail = create_model(  # type: ignore[call-overload]
    "CallDetail",
    __base__=CallOut,
    __doc__="A call with its events and transfers.",
    events=(list[dict[str, Any]], ...),
    transfers=(list[dict[str, Any]], ...),
)


class ControlRequest(RootModel[ControlCommand]):
    """A call-control command, chosen by `type`."""


class ControlAccepted(BaseModel):
    """The command was accepted and runs in the background; follow it on GET /calls/{id}."""

    model_config = ConfigDict(extra="allow")

    id: str
    accepted: str
    transfer_id: str | None = None


class CallsQuery(BaseModel):
    """Query of GET /calls."""

    model_config = ConfigDict(extra="forbid")

    status: CallStatus | None = None
    limit: int = Field(100, ge=1, le=500)


class DestinationTestRequest(BaseModel):
    """A test call to a destination, routed as a transfer from `number_id` would be."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    destination: str = Field(min_length=1, max_length=300)
    number_id: str | None = None
    ring_timeout: float = Field(20, gt=0, le=120)

    _destination = field_validator("destination")(check_destination)


class DestinationTestResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    destination: str
    route: str
    outcome: str
    sip_code: int | None = None
    ring_ms: int | None = None
    duration_ms: int


class TransferStatsQuery(BaseModel):
    """Query of GET /transfers/stats: count from `since` (ISO 8601; default: all time)."""

    model_config = ConfigDict(extra="forbid")

    since: datetime | None = None


class DestinationStats(BaseModel):
    destination: str
    attempts: int
    answered: int
    answer_rate: float
    local_faults: int  # failed in our own PBX or daemon: not counted as attempts
    outcomes: dict[str, int]


class TransferStats(BaseModel):
    """Transfer monitoring: how often the assistant's calls reach a human, and how each
    destination answers."""

    model_config = _OUT
    since: datetime | None
    calls: int
    transfers: int  # settled transfers (those with a final outcome)
    in_progress: int  # transfers still under way: not an outcome
    local_faults: int  # of `by_outcome["failed"]`, those that failed in our PBX or daemon
    transfer_rate: float
    by_outcome: dict[str, int]
    by_source: dict[str, int]
    by_destination: list[DestinationStats]


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["ok"]


class ErrorFieldDetail(BaseModel):
    field: str
    message: str
    type: str


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable kebab-case error id.")
    message: str
    field: str | None = Field(None, description="Dotted path of the first failing field.")
    details: list[ErrorFieldDetail] | dict[str, Any] | None = Field(
        None,
        description="invalid-input: every failing field; other codes: extra facts.",
    )


class ErrorResponse(BaseModel):
    error: ErrorInfo
