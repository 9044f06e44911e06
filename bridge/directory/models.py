"""Assistants, SIP trunks and numbers: the configuration objects of the seed's API.

Field names and JSON shapes follow the seed (`../shared/seed/`). The same models validate API
input and describe stored objects; `public_dict` is what the API shows (never a password).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationInfo,
)

from bridge import sip as _sip
from bridge.pbx.ports import DTMF_PATTERN as DTMF_PATTERN
from bridge.pbx.ports import check_dtmf

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
# The SIP URI grammar (user-part charset, host, port, no routing parameters) is bridge.sip's:
# one grammar for every entry point (API transfers, stored destinations, destinations/test).
SIP_URI = _sip.SIP_URI_PATTERN


# --- hosts and SIP user parts as the PBXs parse them (RFC 3261 §25.1) ----------------------
# Each pattern is one regular expression used both to validate and in the OpenAPI document, in
# the common subset of Python, Rust (pydantic) and ECMA-262 syntax.


def _ipv6() -> str:
    """RFC 3986 IPv6address."""
    h16 = "[0-9A-Fa-f]{1,4}"
    ls32 = f"(?:{h16}:{h16}|{_IPV4})"
    forms = [
        f"(?:{h16}:){{6}}{ls32}",
        f"::(?:{h16}:){{5}}{ls32}",
        f"(?:{h16})?::(?:{h16}:){{4}}{ls32}",
        f"(?:(?:{h16}:){{0,1}}{h16})?::(?:{h16}:){{3}}{ls32}",
        f"(?:(?:{h16}:){{0,2}}{h16})?::(?:{h16}:){{2}}{ls32}",
        f"(?:(?:{h16}:){{0,3}}{h16})?::{h16}:{ls32}",
        f"(?:(?:{h16}:){{0,4}}{h16})?::{ls32}",
        f"(?:(?:{h16}:){{0,5}}{h16})?::{h16}",
        f"(?:(?:{h16}:){{0,6}}{h16})?::",
    ]
    return "(?:" + "|".join(forms) + ")"


_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
# hostname = *( domainlabel "." ) toplabel; a top label starts with a letter, so a host that
# looks like an address is one (no "1.2.3.999").
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TOPLABEL = "[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_PATTERN = rf"^(?:(?:{_LABEL}\.)*{_TOPLABEL}|{_IPV4}|\[{_ipv6()}\])$"
# A SIP user part for trunk credentials: unreserved characters and %-escapes. RFC 3261 also
# allows & = $ , ; ? / (user-unreserved), which a dial string or a request line re-parses.
SIP_USER_PATTERN = r"^(?:[A-Za-z0-9\-_.!~*+]|%[0-9A-Fa-f]{2})+$"
# Text the assistant speaks: no control characters (tab and newlines aside), private-use or
# non-characters (a TTS engine says nothing, or stops, on them). Lone surrogates never get
# this far (pydantic refuses them as "not a unicode string"). The escapes stay escapes in the
# pattern text, so the OpenAPI document is plain ASCII that any regex engine reads.
SPEAKABLE_PATTERN = (
    r"^[^\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F"
    r"\uE000-\uF8FF\uFDD0-\uFDEF\uFFFE\uFFFF]*$"
)
# A secret: any printable text (a NUL ends a C string in the PBX).
SECRET_PATTERN = r"^[^\u0000-\u001F\u007F]*$"
_HOST = re.compile(HOST_PATTERN)
_SIP_USER = re.compile(SIP_USER_PATTERN)
_SPEAKABLE = re.compile(SPEAKABLE_PATTERN)
_SECRET = re.compile(SECRET_PATTERN)


def check_speakable(value: str) -> str:
    if not _SPEAKABLE.match(value):
        bad = next(i for i, ch in enumerate(value) if not _SPEAKABLE.match(ch))
        raise ValueError(
            f"contains a character that cannot be spoken (U+{ord(value[bad]):04X} at"
            f" position {bad})"
        )
    return value


# Validation context of objects read back from the database: the checks below were added after
# objects were stored (issue 7); an object stored before them must still load (the PBX refuses
# a bad trunk host as it did, a first_message is still spoken as it was), not break every list.
STORED: dict[str, Any] = {"stored": True}


def _on_input(check: Callable[[Any], Any]) -> Callable[[Any, ValidationInfo], Any]:
    """`check` for API input; skipped when loading a stored object (context STORED)."""

    def validator(value: Any, info: ValidationInfo) -> Any:
        if isinstance(info.context, dict) and info.context.get("stored"):
            return value
        return check(value)

    return validator


def _pattern_of(name: str) -> Any:
    """A JSON schema hook adding `pattern` from a module constant, read when the document is
    built: the grammar may be rewritten and the document follows it."""

    def add(schema: dict[str, Any]) -> None:
        constant = globals()[name]
        schema["pattern"] = constant if isinstance(constant, str) else constant.pattern

    return add


# Text spoken to a caller (first_message, destination and control messages).
Speakable = Annotated[
    str,
    AfterValidator(_on_input(check_speakable)),
    Field(json_schema_extra=_pattern_of("SPEAKABLE_PATTERN")),
]
E164Number = Annotated[
    str, AfterValidator(lambda v: check_e164(v)), Field(json_schema_extra=_pattern_of("E164"))
]
SipUri = Annotated[
    str, AfterValidator(lambda v: check_sip_uri(v)), Field(json_schema_extra=_pattern_of("SIP_URI"))
]


def check_e164(value: str) -> str:
    if not E164.match(value):
        raise ValueError("must be an E.164 number such as +31612345678")
    return value


def check_sip_uri(value: str) -> str:
    return _sip.check_sip_uri(value)


class _Strict(BaseModel):
    """API input: unknown fields refused, and strict types (`"port": "5060"`, `"port": true`
    and `"registration": 0` are errors), so that validation is what the OpenAPI document
    says. Stored objects (`Assistant`, `Trunk`, `Number`) relax it for their timestamps."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True)


_STORED = ConfigDict(strict=False)


# --- assistants ----------------------------------------------------------------------------


# DTMF sent once the destination answers, before the caller is bridged (issue 9 §4): an IVR's
# choices or an extension behind it, `w` a 0.5 s pause, `W` 1 s ("wwww1234#").
Dtmf = Annotated[
    str,
    AfterValidator(lambda v: check_dtmf(v)),
    Field(json_schema_extra=_pattern_of("DTMF_PATTERN")),
]


# --- warm transfer (issue 9 §2): optional fields of every destination, absent from the
# seed's shape (read back without them when unset) ---
WARM_FIELDS = (
    "transfer_mode",
    "brief",
    "require_accept",
    "accept_timeout",
    "wait_for_speech",
    "moh_class",
)


class _WarmOptions(_Strict):
    # "warm": the caller hears hold music while the destination is dialled and briefed.
    transfer_mode: Literal["bridge", "blind", "warm"] | None = None
    brief: Speakable | None = Field(default=None, max_length=1000)  # what the agent hears
    require_accept: bool | None = None  # DTMF 1 accepts, 2 declines
    accept_timeout: float | None = Field(default=None, gt=0, le=120)
    wait_for_speech: bool | None = None  # brief once the agent said something
    moh_class: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# --- fallback chains (issue 9 §3) ------------------------------------------------------------
# A destination may list alternatives, tried in order when it is busy, does not answer or
# declines (`bridge.calls.chain`): destinations of the same shape, without fallbacks of their
# own (one flat chain; the first destination's `message` is the only announcement).
MAX_FALLBACKS = 10


def _no_nested_fallbacks(dest: Any) -> Any:
    if getattr(dest, "fallbacks", None):
        raise ValueError("a fallback cannot have fallbacks of its own (one flat chain)")
    return dest


class _Destination(_WarmOptions):
    """A destination's schema is one in the OpenAPI document: `fallbacks` makes the models
    recursive, which would otherwise split each into -Input and -Output schemas."""

    model_config = ConfigDict(json_schema_mode_override="validation")


Fallbacks = Annotated[
    list[Annotated["Destination", AfterValidator(_no_nested_fallbacks)]] | None,
    Field(default=None, min_length=1, max_length=MAX_FALLBACKS),
]


class NumberDestination(_Destination):
    type: Literal["number"] = "number"
    number: E164Number
    description: str = Field(min_length=1, max_length=500)
    message: Speakable | None = Field(default=None, max_length=1000)
    dtmf: Dtmf | None = None
    fallbacks: Fallbacks = None  # issue 9 §3: tried in order when this one fails


class SipDestination(_Destination):
    """Our extension of the seed: a destination reached by SIP URI."""

    type: Literal["sip"]
    sip_uri: SipUri
    description: str = Field(min_length=1, max_length=500)
    message: Speakable | None = Field(default=None, max_length=1000)
    dtmf: Dtmf | None = None
    fallbacks: Fallbacks = None  # issue 9 §3: tried in order when this one fails


# --- destinations inside the PBX (issue 9) --------------------------------------------------
# Names that reach a dial string (`PJSIP/<endpoint>`, `Local/<exten>@<context>/n`,
# `user/<endpoint>`, `loopback/<exten>/<context>/XML`): none of the characters a dial string,
# the dialplan or FreeSWITCH's originate re-parse (& , | / @ ( ) $ { } [ ] < > : quotes, spaces).
PBX_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DIALPLAN_EXTEN_PATTERN = r"^[A-Za-z0-9+*#][A-Za-z0-9+*#_.-]{0,63}$"
# Contexts of callbridge itself are not destinations (a transfer to callbridge-inbound would
# loop the caller back to an assistant; the blind and fallback contexts have their own use).
RESERVED_CONTEXT_PREFIX = "callbridge-"
_PBX_NAME = re.compile(PBX_NAME_PATTERN)
_DIALPLAN_EXTEN = re.compile(DIALPLAN_EXTEN_PATTERN)
INTERNAL_KINDS = ("extension", "queue", "dialplan")


def check_pbx_name(value: str) -> str:
    if not _PBX_NAME.match(value):
        raise ValueError(
            "must be a PBX name: letters, digits, '_', '.', '-' (up to 64, starting with a "
            "letter or digit)"
        )
    return value


# --- queue names (leftovers, issue 9 §1) ---
# At least 2 characters: `[callbridge-queue]` matches `_[A-Za-z0-9].` (the `.` wants one more
# character), so a 1-character queue would be accepted here and refused by the PBX later.
QUEUE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{1,63}$"
_QUEUE_NAME = re.compile(QUEUE_NAME_PATTERN)


def check_queue_name(value: str) -> str:
    if not _QUEUE_NAME.match(value):
        raise ValueError(
            "must be a queue name: 2 to 64 letters, digits, '_', '.', '-', starting with a "
            "letter or digit"
        )
    return value


def check_dialplan_exten(value: str) -> str:
    if not _DIALPLAN_EXTEN.match(value):
        raise ValueError("must be a dialplan extension: letters, digits, + * # _ . - (up to 64)")
    return value


def check_context(value: str) -> str:
    check_pbx_name(value)
    if value.lower().startswith(RESERVED_CONTEXT_PREFIX):
        raise ValueError(f"contexts starting with {RESERVED_CONTEXT_PREFIX!r} are callbridge's own")
    return value


PbxName = Annotated[
    str,
    AfterValidator(lambda v: check_pbx_name(v)),
    Field(json_schema_extra=_pattern_of("PBX_NAME_PATTERN")),
]
QueueName = Annotated[
    str,
    AfterValidator(lambda v: check_queue_name(v)),
    Field(json_schema_extra=_pattern_of("QUEUE_NAME_PATTERN")),
]
DialplanExten = Annotated[
    str,
    AfterValidator(lambda v: check_dialplan_exten(v)),
    Field(json_schema_extra=_pattern_of("DIALPLAN_EXTEN_PATTERN")),
]
DialplanContext = Annotated[
    str,
    AfterValidator(lambda v: check_context(v)),
    Field(json_schema_extra=_pattern_of("PBX_NAME_PATTERN")),
]


class ExtensionDestination(_Destination):
    """An endpoint of the PBX: `PJSIP/<extension>` on Asterisk, `user/<extension>` on
    FreeSWITCH. Its state is checked before it is dialled."""

    type: Literal["extension"]
    extension: PbxName
    description: str = Field(min_length=1, max_length=500)
    message: Speakable | None = Field(default=None, max_length=1000)
    dtmf: Dtmf | None = None
    fallbacks: Fallbacks = None  # issue 9 §3: tried in order when this one fails


class QueueDestination(_Destination):
    """A queue of the PBX, reached through the `callbridge-queue` context (Asterisk
    `Queue(<queue>)`, FreeSWITCH `callcenter <queue>`)."""

    type: Literal["queue"]
    queue: QueueName
    description: str = Field(min_length=1, max_length=500)
    message: Speakable | None = Field(default=None, max_length=1000)
    dtmf: Dtmf | None = None
    fallbacks: Fallbacks = None  # issue 9 §3: tried in order when this one fails


class DialplanDestination(_Destination):
    """Anything the PBX's dialplan already has (ring groups, IVRs): `extension` in `context`."""

    type: Literal["dialplan"]
    context: DialplanContext
    extension: DialplanExten
    description: str = Field(min_length=1, max_length=500)
    message: Speakable | None = Field(default=None, max_length=1000)
    dtmf: Dtmf | None = None
    fallbacks: Fallbacks = None  # issue 9 §3: tried in order when this one fails


AnyDestination = (
    NumberDestination
    | SipDestination
    | ExtensionDestination
    | QueueDestination
    | DialplanDestination
)


def internal_address(kind: str, name: str, context: str | None = None) -> str:
    """The address of a destination inside the PBX, as the control API and the transfer
    record name it: `extension:1001`, `queue:support`, `dialplan:100@ringgroups`."""
    if kind == "dialplan":
        return f"dialplan:{name}@{context}"
    return f"{kind}:{name}"


def destination_address(dest: Any) -> str:
    """The one string that names a destination (a model or a plain dict): its number, its SIP
    URI or its internal address. The transfer command and the policy compare these."""

    def get(name: str) -> Any:
        return dest.get(name) if isinstance(dest, dict) else getattr(dest, name, None)

    kind = get("type") or "number"
    if kind == "number":
        return str(get("number"))
    if kind == "sip":
        return str(get("sip_uri"))
    if kind == "extension":
        return internal_address("extension", str(get("extension")))
    if kind == "queue":
        return internal_address("queue", str(get("queue")))
    if kind == "dialplan":
        return internal_address("dialplan", str(get("extension")), str(get("context")))
    raise ValueError(f"unknown destination type {kind!r}")


def _destination_type(value: Any) -> str | None:
    """`type` is optional for a number destination (its default, as in the seed)."""
    if isinstance(value, dict):
        kind = value.get("type", "number")
        return kind if isinstance(kind, str) else None
    return getattr(value, "type", None)


Destination = Annotated[
    Annotated[NumberDestination, Tag("number")]
    | Annotated[SipDestination, Tag("sip")]
    | Annotated[ExtensionDestination, Tag("extension")]
    | Annotated[QueueDestination, Tag("queue")]
    | Annotated[DialplanDestination, Tag("dialplan")],
    Discriminator(
        _destination_type,
        custom_error_type="destination_type",  # service.field_path names `type` for it
        custom_error_message=(
            "Input tag should be 'number', 'sip', 'extension', 'queue' or 'dialplan'"
        ),
    ),
]


for _model in (
    NumberDestination,
    SipDestination,
    ExtensionDestination,
    QueueDestination,
    DialplanDestination,
):
    _model.model_rebuild()  # `Fallbacks` refers to `Destination`, defined after them


class TransferCallTool(_Strict):
    type: Literal["transfer_call"]
    destinations: list[Destination] = Field(min_length=1, max_length=50)


class EndCallTool(_Strict):
    type: Literal["end_call"]


Tool = Annotated[TransferCallTool | EndCallTool, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=20000)


class LlmConfig(_Strict):
    provider: str = Field("local", min_length=1, max_length=50)
    model: str | None = Field(default=None, max_length=200)
    messages: list[ChatMessage] = Field(default_factory=list, max_length=50)
    tools: list[Tool] = Field(default_factory=list, max_length=10)


# --- assistant knowledge (issue 8 §2): what the assistant answers itself ---------------------


class KnowledgeItem(_Strict):
    """A question the assistant answers itself, and its answer; or a fact alone (`answer`
    only). The local provider answers from the closest entry; a language model gets the list
    in its system prompt (docs/conversation.md)."""

    question: str | None = Field(default=None, min_length=1, max_length=500)
    answer: Speakable = Field(min_length=1, max_length=1000)


# --- hand back (issue 9 §5) ---
DEFAULT_HANDBACK_DTMF = "##"
DEFAULT_RETURN_MESSAGE = "Is there anything else I can help you with?"
HandbackCode = Annotated[
    str,
    Field(
        pattern=r"^[0-9*#A-D]{1,8}$",
        description="digits 0-9 * # A-D, 1 to 8 of them",
    ),
]


class Handback(_Strict):
    """How a caller comes back to this assistant after a bridged transfer."""

    dtmf: HandbackCode | None = Field(
        default=DEFAULT_HANDBACK_DTMF,
        description="Pressed by the destination (the human), it hands the caller back; null:"
        " off. The caller's own digits never trigger it.",
    )
    return_on_destination_hangup: bool = Field(
        default=False,
        description="When the destination hangs up first, the caller comes back to the"
        " assistant instead of being hung up.",
    )
    message: Speakable = Field(default=DEFAULT_RETURN_MESSAGE, max_length=1000)


class AssistantIn(_Strict):
    name: str = Field(min_length=1, max_length=200)
    first_message: Speakable | None = Field(default=None, max_length=2000)
    llm_config: LlmConfig = Field(default_factory=LlmConfig)
    knowledge: list[KnowledgeItem] = Field(default_factory=list, max_length=200)
    handback: Handback | None = None  # hand back (issue 9 §5); unset: the defaults


class Assistant(AssistantIn):
    model_config = _STORED

    id: str
    created_at: datetime
    updated_at: datetime

    def destinations(self) -> list[AnyDestination]:
        """Every destination of every `transfer_call` tool, their fallbacks included (issue 9
        §3): the only places a caller may be sent (the LLM names the first ones only)."""
        return [
            d
            for tool in self.llm_config.tools
            if isinstance(tool, TransferCallTool)
            for first in tool.destinations
            for d in [first, *(first.fallbacks or [])]
        ]

    def public_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        for tool in data["llm_config"].get("tools") or []:
            for dest in tool.get("destinations") or []:
                for shown in [dest, *(dest.get("fallbacks") or [])]:
                    for optional in ("dtmf", "fallbacks", *WARM_FIELDS):
                        if shown.get(optional) is None:  # unset: the seed's shape unchanged
                            shown.pop(optional, None)
        if data.get("handback") is None:  # unset: the seed's shape reads back unchanged
            data.pop("handback", None)
        return data


# --- SIP trunks ----------------------------------------------------------------------------


def _check_host(value: str) -> str:
    if not _HOST.match(value):
        raise ValueError(
            "must be a hostname, an IPv4 address or a bracketed IPv6 address ([2001:db8::1]),"
            " without scheme or port"
        )
    return value


def _check_sip_user(value: str) -> str:
    if not _SIP_USER.match(value):
        raise ValueError(
            "may contain only letters, digits, - _ . ! ~ * + and %-escapes (a SIP user part"
            " without the characters a dial string re-parses)"
        )
    return value


def _check_secret(value: SecretStr) -> SecretStr:
    if not _SECRET.match(value.get_secret_value()):
        raise ValueError("must not contain control characters")
    return value


# As PJSIP and sofia parse it: an RFC 3261 hostname, an IPv4 address or a bracketed IPv6
# address; no scheme, no port (`port` is its own field).
SipHost = Annotated[
    str,
    AfterValidator(_on_input(_check_host)),
    Field(json_schema_extra=_pattern_of("HOST_PATTERN")),
]
SipUser = Annotated[
    str,
    AfterValidator(_on_input(_check_sip_user)),
    Field(json_schema_extra=_pattern_of("SIP_USER_PATTERN")),
]
Secret = Annotated[
    SecretStr,
    AfterValidator(_on_input(_check_secret)),
    Field(json_schema_extra=_pattern_of("SECRET_PATTERN")),
]


def _integral(value: Any) -> Any:
    """JSON Schema counts 5060.0 as an integer; strict mode would not (true and "5060" stay
    errors)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer as JSON Schema defines it (the document says "type": "integer").
JsonInt = Annotated[int, BeforeValidator(_integral)]


class TrunkIn(_Strict):
    name: str = Field(min_length=1, max_length=200)
    host: SipHost = Field(min_length=1, max_length=253)
    port: JsonInt = Field(5060, ge=1, le=65535)
    transport: Literal["udp", "tcp", "tls"] = "udp"
    username: SipUser | None = Field(default=None, min_length=1, max_length=200)
    password: Secret | None = Field(default=None, max_length=200)
    registration: bool = False  # REGISTER with the trunk's credentials
    # Toll-fraud policy for this trunk: numbers it carries must start with one of these
    # E.164 prefixes (they replace transfer.allowed_prefixes for this trunk); [] = the global
    # policy alone. See docs/security.md.
    allowed_prefixes: list[Annotated[str, Field(pattern=r"^\+[0-9]{1,15}$")]] = Field(
        default_factory=list, max_length=100
    )


class Trunk(TrunkIn):
    model_config = _STORED

    id: str
    created_at: datetime
    updated_at: datetime

    def public_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"password"})
        data["has_password"] = self.password is not None
        return data


# --- numbers -------------------------------------------------------------------------------


class NumberIn(_Strict):
    # The DID as it reaches the PBX (the dialled extension): E.164 or a dialplan extension.
    number: str = Field(min_length=1, max_length=64, pattern=r"^\+?[0-9A-Za-z*#_\-.]+$")
    assistant_id: str | None = None
    transfer_trunk_id: str | None = None
    name: str | None = Field(default=None, max_length=200)


class Number(NumberIn):
    model_config = _STORED

    id: str
    created_at: datetime
    updated_at: datetime

    def public_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
