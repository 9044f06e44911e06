"""Assistants, SIP trunks and numbers: the configuration objects of the seed's API.

Field names and JSON shapes follow the seed (`../shared/seed/`). The same models validate API
input and describe stored objects; `public_dict` is what the API shows (never a password).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from bridge import sip as _sip

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
# The SIP URI grammar (user-part charset, host, port, no routing parameters) is bridge.sip's:
# one grammar for every entry point (API transfers, stored destinations, destinations/test).
SIP_URI = _sip.SIP_URI_PATTERN
HOSTNAME = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?$"
    r"|^\[?[0-9A-Fa-f:]+\]?$"
)


def check_e164(value: str) -> str:
    if not E164.match(value):
        raise ValueError("must be an E.164 number such as +31612345678")
    return value


def check_sip_uri(value: str) -> str:
    return _sip.check_sip_uri(value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


# --- assistants ----------------------------------------------------------------------------


class NumberDestination(_Strict):
    type: Literal["number"] = "number"
    number: str
    description: str = Field(min_length=1, max_length=500)
    message: str | None = Field(default=None, max_length=1000)

    _e164 = field_validator("number")(check_e164)


class SipDestination(_Strict):
    """Our extension of the seed: a destination reached by SIP URI."""

    type: Literal["sip"]
    sip_uri: str
    description: str = Field(min_length=1, max_length=500)
    message: str | None = Field(default=None, max_length=1000)

    _uri = field_validator("sip_uri")(check_sip_uri)


Destination = Annotated[NumberDestination | SipDestination, Field(discriminator="type")]


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


class AssistantIn(_Strict):
    name: str = Field(min_length=1, max_length=200)
    first_message: str | None = Field(default=None, max_length=2000)
    llm_config: LlmConfig = Field(default_factory=LlmConfig)


class Assistant(AssistantIn):
    id: str
    created_at: datetime
    updated_at: datetime

    def destinations(self) -> list[NumberDestination | SipDestination]:
        """Every destination of every `transfer_call` tool: the only places the LLM may send
        a caller."""
        return [
            d
            for tool in self.llm_config.tools
            if isinstance(tool, TransferCallTool)
            for d in tool.destinations
        ]

    def public_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --- SIP trunks ----------------------------------------------------------------------------


class TrunkIn(_Strict):
    name: str = Field(min_length=1, max_length=200)
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(5060, ge=1, le=65535)
    transport: Literal["udp", "tcp", "tls"] = "udp"
    username: str | None = Field(default=None, min_length=1, max_length=200)
    password: SecretStr | None = Field(default=None, max_length=200)
    registration: bool = False  # REGISTER with the trunk's credentials
    # Toll-fraud policy for this trunk: numbers it carries must start with one of these
    # E.164 prefixes (they replace transfer.allowed_prefixes for this trunk); [] = the global
    # policy alone. See docs/security.md.
    allowed_prefixes: list[Annotated[str, Field(pattern=r"^\+[0-9]{1,15}$")]] = Field(
        default_factory=list, max_length=100
    )

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not HOSTNAME.match(value):
            raise ValueError("must be a hostname or IP address, without scheme or port")
        return value

    @field_validator("username")
    @classmethod
    def _username(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9\-_.!~*'()&=+$,;?/%]+", value):
            raise ValueError("may contain only characters allowed in a SIP user part")
        return value


class Trunk(TrunkIn):
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
    id: str
    created_at: datetime
    updated_at: datetime

    def public_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
