"""Sans-I/O FreeSWITCH Event Socket (ESL) wire format: a byte parser and command serializers.

No I/O happens here so the same code serves the inbound client, the outbound (per-call) server
and the fake server used in tests, and so it can be tested on recorded bytes split anywhere.

Wire format (mod_event_socket, FreeSWITCH 1.10): every message is a block of `Name: value`
lines ended by an empty line (LF only); a `Content-Length` header announces a body of exactly
that many bytes. Envelope values are sent raw, except the outbound `connect` reply, which is a
serialized event (URL-encoded). Plain events carry, in their body, URL-encoded `Name: value`
lines, an empty line, and optionally their own `Content-Length` + body (BACKGROUND_JOB).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote

__all__ = [
    "ContentType",
    "EslEvent",
    "EslInjectionError",
    "EslMessage",
    "EslParser",
    "EslProtocolError",
    "ParserState",
    "encode_api",
    "encode_auth",
    "encode_bgapi",
    "encode_command",
    "encode_event",
    "encode_execute",
    "encode_filter",
    "encode_hangup",
    "encode_message",
    "encode_sendmsg",
    "parse_event",
    "parse_event_json",
    "parse_event_plain",
    "parse_header_items",
    "parse_headers",
]

MAX_HEADER_BYTES = 256 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024


class ContentType(StrEnum):
    """`Content-Type` values mod_event_socket sends."""

    AUTH_REQUEST = "auth/request"
    COMMAND_REPLY = "command/reply"
    API_RESPONSE = "api/response"
    EVENT_PLAIN = "text/event-plain"
    EVENT_JSON = "text/event-json"
    EVENT_XML = "text/event-xml"
    DISCONNECT_NOTICE = "text/disconnect-notice"
    RUDE_REJECTION = "text/rude-rejection"
    LOG_DATA = "log/data"


class EslProtocolError(Exception):
    """The peer sent bytes that are not ESL; the connection cannot be trusted any more."""


class EslInjectionError(ValueError):
    """A command argument would have changed the framing (CR, LF or NUL in it)."""


# --- messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EslMessage:
    """One framed message: envelope headers (raw, not URL-decoded) and the body bytes."""

    headers: Mapping[str, str]
    body: bytes = b""

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    @property
    def reply_text(self) -> str:
        """`Reply-Text` of a command/reply (URL-decoded: the `connect` reply encodes it)."""
        raw = self.headers.get("Reply-Text", "")
        return _decode_value(raw) if "%" in raw else raw

    @property
    def is_event(self) -> bool:
        return self.content_type in (
            ContentType.EVENT_PLAIN,
            ContentType.EVENT_JSON,
            ContentType.EVENT_XML,
        )

    def text(self) -> str:
        """The body as text (api/response, disconnect notice, log data)."""
        return self.body.decode("utf-8", errors="replace")

    def event(self) -> EslEvent:
        """Decode the body of an event message (plain or json)."""
        return parse_event(self)


@dataclass(frozen=True, slots=True)
class EslEvent:
    """A FreeSWITCH event: URL-decoded headers in wire order, and its own body if any.

    `headers` keeps the first value of a repeated name (FreeSWITCH repeats `Hangup-Cause` in
    CHANNEL_HANGUP_COMPLETE); `items` keeps every line, in order.
    """

    headers: Mapping[str, str]
    body: str | None = None
    raw_format: str = field(default="plain", compare=False)
    items: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)

    def __getitem__(self, name: str) -> str:
        return self.headers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.headers

    @property
    def name(self) -> str:
        return self.headers.get("Event-Name", "")

    @property
    def subclass(self) -> str | None:
        return self.headers.get("Event-Subclass")

    @property
    def unique_id(self) -> str | None:
        return self.headers.get("Unique-ID")

    @property
    def job_uuid(self) -> str | None:
        return self.headers.get("Job-UUID")

    def variable(self, name: str) -> str | None:
        """A channel variable as carried in events (`variable_<name>`)."""
        return self.headers.get(f"variable_{name}")


# --- parser --------------------------------------------------------------------------------


class ParserState(Enum):
    """Where the parser is in the current message."""

    HEADERS = "headers"  # collecting envelope lines up to the empty line
    BODY = "body"  # collecting exactly Content-Length bytes
    FAILED = "failed"  # garbage seen: every later feed raises


class EslParser:
    """Incremental ESL framer: `feed()` bytes as they arrive, get complete messages back.

    Bytes may be split anywhere. Anything that is not ESL raises `EslProtocolError` and leaves
    the parser FAILED, because resynchronizing on a byte stream would mean guessing.
    """

    def __init__(
        self,
        *,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._buf = bytearray()
        self._state = ParserState.HEADERS
        self._headers: dict[str, str] = {}
        self._body_len = 0
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes
        self._error: EslProtocolError | None = None

    @property
    def state(self) -> ParserState:
        return self._state

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[EslMessage]:
        """Add bytes; return every message they complete, in order."""
        if self._error is not None:
            raise EslProtocolError(f"parser failed earlier: {self._error}")
        self._buf += data
        out: list[EslMessage] = []
        try:
            while True:
                msg = self._step()
                if msg is None:
                    break
                out.append(msg)
        except EslProtocolError as exc:
            self._state = ParserState.FAILED
            self._error = exc
            raise
        return out

    def _step(self) -> EslMessage | None:
        if self._state is ParserState.HEADERS:
            end = self._buf.find(b"\n\n")
            if end < 0:
                if len(self._buf) > self._max_header:
                    raise EslProtocolError("header block too long without an empty line")
                first = self._buf.find(b"\n")
                if first >= 0:  # judge the first line now rather than wait for a block end
                    parse_headers(bytes(self._buf[:first]), decode=False)
                return None
            if end > self._max_header:
                raise EslProtocolError("header block too long")
            block = bytes(self._buf[:end])
            del self._buf[: end + 2]
            headers = parse_headers(block, decode=False)
            if "Content-Type" not in headers:
                raise EslProtocolError(f"message without Content-Type: {block[:80]!r}")
            length = _content_length(headers)
            if length:
                self._headers = headers
                self._body_len = length
                self._state = ParserState.BODY
                return self._step()
            return EslMessage(MappingProxyType(headers), b"")
        if self._state is ParserState.BODY:
            if len(self._buf) < self._body_len:
                return None
            body = bytes(self._buf[: self._body_len])
            del self._buf[: self._body_len]
            headers, self._headers = self._headers, {}
            self._state = ParserState.HEADERS
            return EslMessage(MappingProxyType(headers), body)
        raise EslProtocolError("parser is in FAILED state")  # pragma: no cover


def _content_length(headers: Mapping[str, str]) -> int:
    raw = headers.get("Content-Length")
    if raw is None:
        return 0
    if not raw.isascii() or not raw.isdigit() or len(raw) > 12:
        raise EslProtocolError(f"bad Content-Length {raw!r}")
    length = int(raw)
    if length > MAX_BODY_BYTES:
        raise EslProtocolError(f"Content-Length {length} too large")
    return length


def _decode_value(raw: str) -> str:
    # Like switch_url_decode: %XX becomes the byte, anything else stays; '+' is not a space.
    return unquote(raw, encoding="utf-8", errors="replace")


def parse_header_items(block: bytes, *, decode: bool) -> list[tuple[str, str]]:
    """Parse `Name: value` lines (LF separated) into pairs, repeats kept, in order.

    With `decode`, each value is URL-decoded after the split, never the block: a `%0A`
    inside a value must stay inside that value instead of forging a header line.
    """
    items: list[tuple[str, str]] = []
    if not block:
        return items
    text = block.decode("utf-8", errors="replace")
    for line in text.split("\n"):
        name, sep, value = line.partition(":")
        if not sep or not name or not _is_token(name):
            raise EslProtocolError(f"not a header line: {line[:80]!r}")
        if value.startswith(" "):
            value = value[1:]
        items.append((name, _decode_value(value) if decode else value))
    return items


def parse_headers(block: bytes, *, decode: bool) -> dict[str, str]:
    """Like `parse_header_items`; the first occurrence of a name wins, as in
    `switch_event_get_header`."""
    headers: dict[str, str] = {}
    for name, value in parse_header_items(block, decode=decode):
        headers.setdefault(name, value)
    return headers


def _is_token(name: str) -> bool:
    return all("!" <= ch <= "~" and ch != ":" for ch in name)


def parse_event_plain(body: bytes) -> EslEvent:
    """Decode a text/event-plain body: encoded headers, empty line, optional inner body."""
    end = body.find(b"\n\n")
    if end < 0:
        if body.endswith(b"\n"):
            end = len(body) - 1
        else:
            raise EslProtocolError("event-plain body without its empty line")
    items = parse_header_items(body[:end], decode=True)
    headers: dict[str, str] = {}
    for name, value in items:
        headers.setdefault(name, value)
    rest = body[end + 2 :]
    inner: str | None = None
    length = headers.get("Content-Length")
    if length is not None:
        n = _content_length({"Content-Length": length})
        if len(rest) < n:
            raise EslProtocolError(f"event body shorter than its Content-Length {n}")
        inner = rest[:n].decode("utf-8", errors="replace")
        del headers["Content-Length"]
        items = items[:-1] if items and items[-1][0] == "Content-Length" else items
    elif rest.strip(b"\n"):
        raise EslProtocolError("bytes after an event without Content-Length")
    return EslEvent(MappingProxyType(headers), inner, "plain", tuple(items))


def parse_event_json(body: bytes) -> EslEvent:
    """Decode a text/event-json body; `_body` becomes the event body, arrays become ARRAY::."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise EslProtocolError(f"bad event json: {exc}") from exc
    if not isinstance(data, dict):
        raise EslProtocolError("event json is not an object")
    headers: dict[str, str] = {}
    inner: str | None = None
    for key, value in data.items():
        if key == "_body":
            inner = str(value)
        else:
            headers[key] = _json_value(value)
    if inner is not None:
        headers.pop("Content-Length", None)  # the body's length, as in the plain format
    return EslEvent(MappingProxyType(headers), inner, "json", tuple(headers.items()))


def _json_value(value: Any) -> str:
    if isinstance(value, list):
        return "ARRAY::" + "|:".join(str(v) for v in value)
    return str(value)


def parse_event(message: EslMessage) -> EslEvent:
    """Decode the event carried by `message` (text/event-plain or text/event-json)."""
    ct = message.content_type
    if ct == ContentType.EVENT_PLAIN:
        return parse_event_plain(message.body)
    if ct == ContentType.EVENT_JSON:
        return parse_event_json(message.body)
    if ct == ContentType.COMMAND_REPLY and "Event-Name" in message.headers:
        # Outbound `connect` reply: a serialized CHANNEL_DATA event in the envelope itself.
        decoded = {k: _decode_value(v) for k, v in message.headers.items()}
        return EslEvent(MappingProxyType(decoded), None, "plain", tuple(decoded.items()))
    raise EslProtocolError(f"not an event message: {ct!r}")


# --- serializers ---------------------------------------------------------------------------

_FORBIDDEN = ("\r", "\n", "\x00")


def _check(what: str, value: str) -> str:
    for ch in _FORBIDDEN:
        if ch in value:
            raise EslInjectionError(f"{what} contains {ch!r}: refused (header injection)")
    return value


def _check_name(name: str) -> str:
    _check("header name", name)
    if not name or not _is_token(name):
        raise EslInjectionError(f"bad header name {name!r}")
    return name


def encode_message(
    first_line: str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
) -> bytes:
    """Serialize a command line, `Name: value` headers and an optional body (Content-Length
    is added). Refuses CR/LF/NUL anywhere but in the body, which is length-framed."""
    _check("command", first_line)
    if not first_line.strip():
        raise EslInjectionError("empty command")
    items = headers.items() if isinstance(headers, Mapping) else headers
    lines = [first_line]
    for name, value in items:
        lines.append(f"{_check_name(name)}: {_check(f'header {name}', value)}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
        return ("\n".join(lines) + "\n\n").encode() + body
    return ("\n".join(lines) + "\n\n").encode()


def encode_command(command: str) -> bytes:
    """A bare command such as `noevents`, `exit`, `linger 30`, `myevents`, `connect`."""
    return encode_message(command)


def encode_auth(password: str, user: str | None = None) -> bytes:
    """`auth <password>` or `userauth <user>:<password>` (user@domain for directory users)."""
    _check("password", password)
    if " " in password:
        raise EslInjectionError("password with a space cannot be sent (FreeSWITCH splits it)")
    if user is not None:
        return encode_message(f"userauth {_check('user', user)}:{password}")
    return encode_message(f"auth {password}")


def encode_api(command: str) -> bytes:
    """`api <command>`: the answer is one api/response."""
    return encode_message(f"api {command}")


def encode_bgapi(command: str, job_uuid: str | None = None) -> bytes:
    """`bgapi <command>` with an optional client-chosen Job-UUID (mod_event_socket honours the
    `Job-UUID` header), so the caller can wait on the id before the reply arrives."""
    headers = {"Job-UUID": job_uuid} if job_uuid else {}
    return encode_message(f"bgapi {command}", headers)


def encode_event(events: Iterable[str], fmt: str = "plain") -> bytes:
    """`event <plain|json|xml> <names...>` (names may include `CUSTOM sub::class`)."""
    if fmt not in ("plain", "json", "xml"):
        raise EslInjectionError(f"bad event format {fmt!r}")
    names = [_check("event name", e).strip() for e in events]
    if not names or not all(names):
        raise EslInjectionError(f"bad event list {names!r}")
    return encode_message(f"event {fmt} {' '.join(names)}")


def encode_filter(header: str, value: str, *, delete: bool = False) -> bytes:
    """`filter <header> <value>` (or `filter delete ...`)."""
    _check_name(header)
    _check("filter value", value)
    verb = "filter delete" if delete else "filter"
    return encode_message(f"{verb} {header} {value}")


def encode_sendmsg(
    uuid: str | None,
    call_command: str,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
) -> bytes:
    """`sendmsg [<uuid>]` with `call-command` and its headers (uuid omitted in outbound mode:
    the socket's own channel)."""
    first = f"sendmsg {_check('uuid', uuid)}" if uuid else "sendmsg"
    if uuid is not None and (" " in uuid or not uuid):
        raise EslInjectionError(f"bad uuid {uuid!r}")
    all_headers = {"call-command": call_command, **(headers or {})}
    return encode_message(first, all_headers, body)


def encode_execute(
    uuid: str | None,
    app: str,
    arg: str | None = None,
    *,
    event_lock: bool = False,
    event_uuid: str | None = None,
    loops: int | None = None,
) -> bytes:
    """`sendmsg` execute of a dialplan application; `event_uuid` tags the
    CHANNEL_EXECUTE(_COMPLETE) events (Application-UUID) so the caller can match them."""
    h: dict[str, str] = {"execute-app-name": app}
    if arg is not None:
        h["execute-app-arg"] = arg
    if event_lock:
        h["event-lock"] = "true"
    if event_uuid:
        h["Event-UUID"] = event_uuid
    if loops is not None:
        h["loops"] = str(int(loops))
    return encode_sendmsg(uuid, "execute", h)


def encode_hangup(uuid: str | None, cause: str = "NORMAL_CLEARING") -> bytes:
    """`sendmsg` hangup with a FreeSWITCH cause name."""
    return encode_sendmsg(uuid, "hangup", {"hangup-cause": cause})
