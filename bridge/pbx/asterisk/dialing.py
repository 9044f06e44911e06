"""Dial strings for Asterisk, checked as a whole before they leave the daemon.

`Dial()` and `POST /channels?endpoint=` split a dial string on `&` (more destinations) and,
inside the dialplan, on `,` (more arguments); `(`, `$` and `^` mean something to the dialplan
too. The policy and the SIP grammar refuse such destinations long before; this module is the
last check, on the FINAL string, whatever produced it (a policy bug, a stored destination
from an older version, a bad `default_route`): `dial_string` raises `UnsafeDialString`.

Destinations inside the PBX: an extension is `PJSIP/<endpoint>`; a queue and a dialplan
target are a Local channel (`Local/<queue>@callbridge-queue/n`, `Local/<exten>@<context>/n`)
for a bridged transfer, and a plain continue into the dialplan for a blind one.

Blind transfers never put a dial string in a channel variable that `Dial()` would re-parse:
`blind_variables` gives the parts (number, trunk endpoint, SIP URI, route head/tail), which
`[callbridge-blind-transfer]` filters again with `FILTER()` and assembles itself.
"""

from __future__ import annotations

import re

from bridge.errors import UnsafeDialString
from bridge.pbx.ports import DialTarget
from bridge.sip import SipUriError, check_uri_syntax

DIRECT_ENDPOINT = "cb-direct"
# The context of outbound-only endpoints (cb-direct): it only hangs up.
OUTBOUND_ONLY_CONTEXT = "callbridge-outbound-only"

_NUMBER = re.compile(r"^\+?[0-9]{1,20}$")
# Names inside the PBX (the grammar of bridge.directory.models, checked again here).
_PBX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_EXTEN = re.compile(r"^[A-Za-z0-9+*#][A-Za-z0-9+*#_.-]{0,63}$")
# Where queue destinations go: `[callbridge-queue]` runs Queue(${EXTEN}).
QUEUE_CONTEXT = "callbridge-queue"
_TRUNK_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A route (operator's `transfer.default_route`) around its {number}: a technology and a
# resource, e.g. "PJSIP/" + number + "@carrier", "Local/" + number + "@outbound/n".
_ROUTE_PART = re.compile(r"^[A-Za-z0-9+_./@:#*-]*$")
_ROUTE_HEAD = re.compile(r"^[A-Za-z][A-Za-z0-9]*/[A-Za-z0-9+_./@:#*-]*$")
# The URI charset `[callbridge-blind-transfer]` lets through (keep the two in step).
_URI_CHARS = re.compile(r"^[A-Za-z0-9+_.!~*'%:@=\[\];-]+$")


def trunk_endpoint(trunk_id: str) -> str:
    return f"cb-trunk-{trunk_id}"


def dial_string(target: DialTarget) -> str:
    """The `PJSIP/...` (or route) string for `target`, or UnsafeDialString."""
    if target.endpoint:
        return f"PJSIP/{_name(target.endpoint)}"
    if target.queue:
        return f"Local/{_name(target.queue)}@{QUEUE_CONTEXT}/n"
    if target.context:
        return f"Local/{_exten(target.exten)}@{_context(target.context)}/n"
    if target.sip_uri:
        return f"PJSIP/{DIRECT_ENDPOINT}/{_uri(target.sip_uri)}"
    if target.trunk_id:
        return f"PJSIP/{_number(target.number)}@{trunk_endpoint(_trunk(target.trunk_id))}"
    if target.route:
        head, number, tail = _route_parts(target)
        return f"{head}{number}{tail}"
    raise UnsafeDialString("a dial target needs a SIP URI, a trunk or a route")


def blind_variables(target: DialTarget) -> dict[str, str]:
    """The channel variables `[callbridge-blind-transfer]` reads: every one is set (empty when
    unused) so that nothing stale from an earlier attempt on the channel is dialled."""
    parts = {
        "CALLBRIDGE_DIAL_KIND": "",
        "CALLBRIDGE_NUMBER": "",
        "CALLBRIDGE_ENDPOINT": "",
        "CALLBRIDGE_URI": "",
        "CALLBRIDGE_ROUTE_HEAD": "",
        "CALLBRIDGE_ROUTE_TAIL": "",
    }
    if target.endpoint:
        parts |= {"CALLBRIDGE_DIAL_KIND": "endpoint", "CALLBRIDGE_ENDPOINT": _name(target.endpoint)}
    elif target.queue or target.context:
        raise UnsafeDialString("queue and dialplan targets continue in the dialplan directly")
    elif target.sip_uri:
        parts |= {"CALLBRIDGE_DIAL_KIND": "uri", "CALLBRIDGE_URI": _uri(target.sip_uri)}
    elif target.trunk_id:
        parts |= {
            "CALLBRIDGE_DIAL_KIND": "trunk",
            "CALLBRIDGE_NUMBER": _number(target.number),
            "CALLBRIDGE_ENDPOINT": trunk_endpoint(_trunk(target.trunk_id)),
        }
    elif target.route:
        head, number, tail = _route_parts(target)
        parts |= {
            "CALLBRIDGE_DIAL_KIND": "route",
            "CALLBRIDGE_ROUTE_HEAD": head,
            "CALLBRIDGE_NUMBER": number,
            "CALLBRIDGE_ROUTE_TAIL": tail,
        }
    else:
        raise UnsafeDialString("a dial target needs a SIP URI, a trunk or a route")
    return parts


def dialplan_target(target: DialTarget) -> tuple[str, str]:
    """(context, extension) where a blind transfer to a queue or dialplan target continues."""
    if target.queue:
        return QUEUE_CONTEXT, _name(target.queue)
    if target.context:
        return _context(target.context), _exten(target.exten)
    raise UnsafeDialString("not a queue or dialplan target")


def _name(name: str | None) -> str:
    if not name or not _PBX_NAME.match(name):
        raise UnsafeDialString(f"refusing PBX name {name!r} in a dial string")
    return name


def _context(context: str | None) -> str:
    name = _name(context)
    if name.lower().startswith("callbridge-"):
        raise UnsafeDialString(f"refusing callbridge's own context {name!r} as a destination")
    return name


def _exten(exten: str | None) -> str:
    if not exten or not _EXTEN.match(exten):
        raise UnsafeDialString(f"refusing dialplan extension {exten!r}")
    return exten


def _uri(uri: str) -> str:
    try:
        check_uri_syntax(uri)
    except SipUriError as exc:
        raise UnsafeDialString(f"refusing to dial SIP URI {uri!r}: {exc}") from exc
    if not _URI_CHARS.match(uri):
        raise UnsafeDialString(f"refusing to dial SIP URI {uri!r}")
    return uri


def _number(number: str | None) -> str:
    if not number or not _NUMBER.match(number):
        raise UnsafeDialString(f"refusing to dial number {number!r}")
    return number


def _trunk(trunk_id: str) -> str:
    if not _TRUNK_ID.match(trunk_id):
        raise UnsafeDialString(f"refusing trunk id {trunk_id!r} in a dial string")
    return trunk_id


def _route_parts(target: DialTarget) -> tuple[str, str, str]:
    route = target.route or ""
    pieces = route.split("{number}")
    if len(pieces) > 2:
        raise UnsafeDialString("transfer.default_route may contain {number} once")
    head, tail = pieces[0], pieces[1] if len(pieces) == 2 else ""
    number = _number(target.number) if len(pieces) == 2 else ""
    if not _ROUTE_HEAD.match(head) or not _ROUTE_PART.match(tail):
        raise UnsafeDialString(
            f"refusing dial string from transfer.default_route {route!r}: only letters, "
            "digits and + _ . / @ : # * - may surround {number}"
        )
    return head, number, tail
