"""Models of the API's requests and responses, for validation and for the OpenAPI document.

Most are derived from the domain models rather than written again: `patch_model` (what a PATCH
may send), `public_model` (what `public_dict` shows), `CallOut` (from the `Call` dataclass).
Only shapes that belong to the HTTP layer itself are written here (errors, health, control
acknowledgement, list query).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, create_model, field_validator
from pydantic.fields import FieldInfo

from bridge.calls import model as calls
from bridge.calls.model import Call, CallStatus, check_destination
from bridge.directory import models
from bridge.directory.models import Assistant, Number, Speakable, Trunk


def _create_model(model_name: str, /, **kwargs: Any) -> type[BaseModel]:
    model: type[BaseModel] = create_model(model_name, **kwargs)
    return model


# Responses always carry every field, defaults included: say so in the schema.
_OUT = ConfigDict(json_schema_serialization_defaults_required=True)


def _without_default(extra: Any) -> Any:
    """A json_schema_extra that also drops `default` (a field that may be omitted, not null)."""

    def apply(schema: dict[str, Any]) -> None:
        if callable(extra):
            extra(schema)
        elif isinstance(extra, dict):
            schema.update(extra)
        schema.pop("default", None)

    return apply


def patch_model(model: type[BaseModel]) -> type[BaseModel]:
    """Every top-level field of `model` optional and nullable: the documented shape of a JSON
    merge patch (the service validates the merged object with `model` itself)."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        patched = FieldInfo.merge_field_infos(info, default=None)
        patched.default_factory = None
        # null removes a field: allowed where the field has a default, an error (422, "Field
        # required") where it has none, so the document does not offer null there.
        annotation: Any = info.annotation | None  # type: ignore[operator]
        if info.is_required():
            annotation = info.annotation
            patched.json_schema_extra = _without_default(info.json_schema_extra)
        fields[name] = (annotation, patched)
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
    return _create_model(
        "Call", __config__=_OUT, __doc__="A call, as `Call.public_dict` shows it.", **fields
    )


CallOut = _call_out()
CallDetail = create_model(
    "CallDetail",
    __base__=CallOut,
    __doc__="A call with its events and transfers.",
    events=(list[dict[str, Any]], ...),
    transfers=(list[dict[str, Any]], ...),
)


def _destination_pattern(schema: dict[str, Any]) -> None:
    """An E.164 number or a SIP URI, from the grammars' constants when the document is built."""
    schema["pattern"] = f"(?:{models.E164.pattern})|(?:{models.SIP_URI.pattern})"


_DESTINATION = Field(min_length=1, max_length=300, json_schema_extra=_destination_pattern)
# What a control request may be, strictly: the call domain's commands with their spoken text
# checked (a NUL or a control character is a 422 naming the field, not silence for the
# caller) and no lax coercion ("ring_timeout": "20" is an error, as the document says). The
# handler then builds the domain command itself (`ControlCommand`) from the same body.
_API_COMMAND = ConfigDict(strict=True)


# Named as the domain's commands: the OpenAPI document shows them under those names.
class TransferCommand(calls.TransferCommand):
    model_config = _API_COMMAND
    destination: str = _DESTINATION
    message: Speakable | None = Field(default=None, max_length=1000)
    brief: Speakable | None = Field(default=None, max_length=1000)  # warm (issue 9 §2)


class SayCommand(calls.SayCommand):
    model_config = _API_COMMAND
    message: Speakable = Field(min_length=1, max_length=1000)


class EndCallCommand(calls.EndCallCommand):
    model_config = _API_COMMAND
    message: Speakable | None = Field(default=None, max_length=1000)


# --- hand back (issue 9 §5) ---
class ReturnCommand(calls.ReturnCommand):
    model_config = _API_COMMAND
    message: Speakable | None = Field(default=None, min_length=1, max_length=1000)


class ControlRequest(
    RootModel[
        Annotated[
            TransferCommand | SayCommand | EndCallCommand | ReturnCommand,
            Field(discriminator="type"),
        ]
    ]
):
    """A call-control command, chosen by `type`."""


class ControlAccepted(BaseModel):
    """The command was accepted and runs in the background; follow it on GET /calls/{id}."""

    model_config = ConfigDict(extra="allow")

    id: str
    accepted: str
    transfer_id: str | None = None
    # A transfer: answered once authorised and on record, before the PBX places the leg;
    # "announcing" (its message plays first) or "dialing" (docs/API.md).
    state: str | None = None


class CallsQuery(BaseModel):
    """Query of GET /calls."""

    model_config = ConfigDict(extra="forbid")

    status: CallStatus | None = None
    limit: int = Field(100, ge=1, le=500)


class DestinationTestRequest(BaseModel):
    """A test call to a destination, routed as a transfer from `number_id` would be."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True)

    destination: str = _DESTINATION
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

    @field_validator("since", mode="before")
    @classmethod
    def _iso_8601(cls, value: Any) -> Any:
        # pydantic would read "0.5" as a Unix time; the document says date-time.
        if isinstance(value, str) and not re.match(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
            raise ValueError("must be an ISO 8601 date-time such as 2026-01-31T00:00:00Z")
        return value


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
