"""The SIP URI grammar callbridge accepts for a transfer destination (RFC 3261 §19.1, narrowed).

A destination ends up inside a PBX dial string (`PJSIP/cb-direct/<uri>`, `sofia/<profile>/<uri>`)
and in a Request-URI that a proxy routes. So the grammar refuses everything a dialplan or a
request router would interpret rather than carry:

- user part: alphanumerics and `+ - _ . ! ~ * '` only, plus %-escapes that do not decode to
  anything else than those or `#` (never `& , ( ) $ ^ | / ; ? = @ :`, whitespace or controls:
  `Dial()` splits on `&` and `,`; `;`/`?`/`=` would start parameters or headers; `:` a password);
- scheme `sip:` or `sips:`, in lower case;
- host: a hostname, an IPv4 address or a bracketed IPv6 address, compared case-insensitively
  (`SipUri.host` is lower-cased; no trailing dot);
- an optional port 1-65535;
- URI parameters (`;name=value`) only when their name is explicitly allowed: `maddr`,
  `transport`, `lr`, `received`... redirect a request elsewhere than the host the allow-list
  checked. By default only `user=phone` passes. Headers (`?...`) are never accepted.

`parse_sip_uri` is the one parser; the policy compares `SipUri.host`, the adapters re-check
the final dial string they build.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

# Parameters that never change where a request goes. Everything else needs a setting
# (`transfer.allowed_uri_params`).
SAFE_URI_PARAMS: dict[str, frozenset[str]] = {"user": frozenset({"phone"})}

USER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-_.!~*'")
# What a %-escape in the user part may decode to: the user characters, and `#` (DTMF-style
# extensions). Never a separator a dialplan or a SIP parser would act on.
_ESCAPED_OK = USER_CHARS | {"#"}
_USER = re.compile(r"^(?:[A-Za-z0-9+\-_.!~*']|%[0-9A-Fa-f]{2})+$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"^{_OCTET}(?:\.{_OCTET}){{3}}$")
_IPV6 = re.compile(r"^\[[0-9A-Fa-f:.]{2,45}\]$")
_PARAM_NAME = re.compile(r"^[A-Za-z0-9\-_.!~*]{1,32}$")
_PARAM_VALUE = re.compile(r"^[A-Za-z0-9\-_.!~*]{1,64}$")
_PORT = re.compile(r"^[0-9]{1,5}$")
_MAX_LENGTH = 256
# The grammar as one regular expression, for documents (OpenAPI `pattern`): it checks the
# characters and the shape; `parse_sip_uri` also checks escapes, port range and parameters.
SIP_URI_PATTERN = re.compile(
    r"^sips?:(?:(?:[A-Za-z0-9+\-_.!~*']|%[0-9A-Fa-f]{2})+@)?"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])"
    r"(?::[0-9]{1,5})?(?:;[A-Za-z0-9\-_.!~*]+(?:=[A-Za-z0-9\-_.!~*]+)?)*$"
)
_configured_params: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SipUri:
    scheme: str  # "sip" or "sips"
    user: str | None  # as written (escapes kept)
    host: str  # lower-cased
    port: int | None
    params: tuple[tuple[str, str | None], ...] = ()

    def __str__(self) -> str:
        text = f"{self.scheme}:"
        if self.user is not None:
            text += f"{self.user}@"
        text += self.host
        if self.port is not None:
            text += f":{self.port}"
        for name, value in self.params:
            text += f";{name}" if value is None else f";{name}={value}"
        return text


class SipUriError(ValueError):
    """Not a SIP URI callbridge will dial; the message says which rule refused it."""


def parse_sip_uri(value: str, *, allowed_params: Collection[str] = ()) -> SipUri:
    """Parse `value` by the grammar above. `allowed_params` names URI parameters accepted on
    top of `user=phone` (any value of the accepted token charset)."""
    if not isinstance(value, str) or len(value) > _MAX_LENGTH:
        raise SipUriError(f"must be a SIP URI of at most {_MAX_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) > 0x7E for ch in value):
        raise SipUriError("a SIP URI may not contain whitespace, control or non-ASCII characters")
    if "?" in value:
        raise SipUriError("SIP URI headers ('?...') are not accepted")
    scheme, sep, rest = value.partition(":")
    if not sep or scheme not in ("sip", "sips"):  # lower case: what every caller tests for
        raise SipUriError("must be a SIP URI such as sip:alice@pbx.example.com")
    address, *raw_params = rest.split(";")
    user: str | None = None
    if "@" in address:
        user, _, hostport = address.rpartition("@")
        _check_user(user)
    else:
        hostport = address
    host, port = _split_hostport(hostport)
    params = _check_params(raw_params, allowed_params)
    return SipUri(scheme, user, host.lower(), port, params)


def check_sip_uri(value: str, *, allowed_params: Collection[str] | None = None) -> str:
    """`value` unchanged if it is a SIP URI callbridge accepts, else ValueError (a
    `SipUriError`). Without `allowed_params`, the parameters set by `configure_uri_params`."""
    allowed = _configured_params if allowed_params is None else allowed_params
    parse_sip_uri(value, allowed_params=allowed)
    return value


def check_uri_syntax(value: str) -> SipUri:
    """The grammar with any well-formed parameter: for the adapters' last check of a dial
    string (which parameters are allowed is the policy's decision, made before)."""
    return parse_sip_uri(value, allowed_params=_ANY)


class _AnyName(frozenset[str]):
    def __contains__(self, item: object) -> bool:
        return True


_ANY: Collection[str] = _AnyName()


def is_sip_uri(value: str) -> bool:
    """True if `value` is meant as a SIP URI (valid or not): it has a sip/sips scheme."""
    return value[:5].lower().startswith(("sip:", "sips:"))  # so "SIP:..." is refused as a URI


def configure_uri_params(names: Collection[str]) -> None:
    """The URI parameters the operator allows (`transfer.allowed_uri_params`), for the
    validators that cannot see the settings (API and stored destinations). Set once at
    start-up; `parse_sip_uri` callers that have the settings pass them explicitly."""
    global _configured_params
    _configured_params = frozenset(n.lower() for n in names)


def configured_uri_params() -> frozenset[str]:
    return _configured_params


def _check_user(user: str) -> None:
    if not user:
        raise SipUriError("the SIP URI user part is empty")
    if len(user) > 64:
        raise SipUriError("the SIP URI user part is longer than 64 characters")
    if not _USER.match(user):
        bad = sorted({ch for ch in user if ch not in USER_CHARS and ch != "%"})
        shown = " ".join(bad) if bad else "a malformed %-escape"
        raise SipUriError(
            f"the SIP URI user part may contain only letters, digits and + - _ . ! ~ * ' "
            f"(refused: {shown})"
        )
    for escape in re.findall(r"%([0-9A-Fa-f]{2})", user):
        if chr(int(escape, 16)) not in _ESCAPED_OK:
            raise SipUriError(f"the SIP URI user part has an escape %{escape} that is not allowed")


def _split_hostport(hostport: str) -> tuple[str, int | None]:
    port_text: str | None = None
    if hostport.startswith("["):
        end = hostport.find("]")
        host, tail = hostport[: end + 1], hostport[end + 1 :]
        if end < 0 or (tail and not tail.startswith(":")):
            raise SipUriError("the SIP URI host is not a valid bracketed IPv6 address")
        if tail:
            port_text = tail[1:]
        if not _IPV6.match(host) or host.count(":") < 2:
            raise SipUriError("the SIP URI host is not a valid bracketed IPv6 address")
    else:
        host, sep, port_part = hostport.partition(":")
        if sep:
            port_text = port_part
        if not host or len(host) > 253:
            raise SipUriError("the SIP URI has no valid host")
        if not (_IPV4.match(host) or _HOSTNAME.match(host)):
            raise SipUriError("the SIP URI host must be a hostname or an IP address")
        if re.fullmatch(r"[0-9.]+", host) and not _IPV4.match(host):
            raise SipUriError("the SIP URI host is not a valid IPv4 address")
    port: int | None = None
    if port_text is not None:
        if not _PORT.match(port_text) or not 0 < int(port_text) < 65536:
            raise SipUriError("SIP URI port must be between 1 and 65535")
        port = int(port_text)
    return host, port


def _check_params(raw: list[str], allowed: Collection[str]) -> tuple[tuple[str, str | None], ...]:
    allowed_names = allowed if isinstance(allowed, _AnyName) else {a.lower() for a in allowed}
    seen: set[str] = set()
    out: list[tuple[str, str | None]] = []
    for item in raw:
        name, sep, val = item.partition("=")
        value: str | None = val if sep else None
        if not _PARAM_NAME.match(name) or (value is not None and not _PARAM_VALUE.match(value)):
            raise SipUriError(f"malformed SIP URI parameter {item!r}")
        key = name.lower()
        if key in seen:
            raise SipUriError(f"SIP URI parameter {name!r} is repeated")
        seen.add(key)
        safe_values = SAFE_URI_PARAMS.get(key)
        if key in allowed_names:
            pass
        elif safe_values is not None and value is not None and value.lower() in safe_values:
            pass
        else:
            raise SipUriError(
                f"SIP URI parameter {name!r} is not accepted: it can change where the request "
                "goes (allow it with transfer.allowed_uri_params)"
            )
        out.append((name, value))
    return tuple(out)
