"""Typed settings, read once at start-up.

Sources, highest priority first: constructor arguments, environment (`CALLBRIDGE_*`, nested
with `__`, e.g. `CALLBRIDGE_ARI__URL`), the TOML file named by `CALLBRIDGE_CONFIG` (or passed
to `load_settings`), then the defaults below. Nothing else in the package reads the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class ApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class AriSettings(BaseModel):
    url: str = "http://127.0.0.1:8088"
    username: str = "callbridge"
    password: SecretStr = SecretStr("callbridge")
    app: str = "callbridge"
    reconnect_initial_delay: float = 0.5
    reconnect_max_delay: float = 15.0
    request_timeout: float = 10.0


class MediaSettings(BaseModel):
    """Where the PBX sends call audio (externalMedia RTP) and how we answer it."""

    bind_host: str = "127.0.0.1"
    advertise_host: str | None = None  # address the PBX should send RTP to; default bind_host
    codec: Literal["ulaw", "alaw", "slin"] = "ulaw"


class TransferSettings(BaseModel):
    mode: Literal["bridge", "blind"] = "bridge"
    ring_timeout: float = Field(30.0, gt=0, le=300)
    # Dial string for E.164 destinations when the number has no transfer trunk.
    # `{number}` is replaced by the destination, e.g. "PJSIP/{number}@carrier".
    default_route: str | None = None
    # Caller ID presented on the new leg: "caller" keeps the caller's number, "number" uses the
    # dialled number (the DID), anything else is used as is.
    caller_id: str = "caller"
    failure_message: str = "Sorry, I could not reach them. I'm still here with you."
    busy_message: str = "Sorry, that line is busy. I'm still here with you."
    no_answer_message: str = "Sorry, nobody answered. I'm still here with you."
    blind_context: str = "callbridge-blind-transfer"


class CallSettings(BaseModel):
    # A call for a number we do not know: continue in this dialplan context (the hook's
    # fallback), or hang up.
    unknown_number_action: Literal["continue", "hangup"] = "continue"
    fallback_context: str = "callbridge-fallback"
    # After the assistant's goodbye, or on a failure we cannot handle, where the caller goes.
    default_greeting: str = "Hello, how can I help you?"


class TtsSettings(BaseModel):
    engine: Literal["flite", "espeak-ng"] = "flite"
    voice: str | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CALLBRIDGE_", env_nested_delimiter="__", extra="forbid"
    )

    database: Path = Path("callbridge.sqlite3")
    pbx: Literal["asterisk", "freeswitch"] = "asterisk"
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    api: ApiSettings = ApiSettings()
    ari: AriSettings = AriSettings()
    media: MediaSettings = MediaSettings()
    transfer: TransferSettings = TransferSettings()
    calls: CallSettings = CallSettings()
    tts: TtsSettings = TtsSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _CONFIG_FILE or os.environ.get("CALLBRIDGE_CONFIG")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_file)))
        return tuple(sources)


_CONFIG_FILE: str | None = None


def load_settings(config_file: str | Path | None = None, **overrides: object) -> Settings:
    """Build the settings from overrides, environment and an optional TOML file."""
    global _CONFIG_FILE
    _CONFIG_FILE = str(config_file) if config_file else None
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    finally:
        _CONFIG_FILE = None
