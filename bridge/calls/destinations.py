"""Destinations inside the PBX, by address (issue 9): `extension:1001`, `queue:support`,
`dialplan:100@ringgroups`. The control API's `destination`, the transfer record and the
toll-fraud policy use these addresses; assistants configure them as `extension`, `queue` and
`dialplan` destinations (`bridge.directory.models`), whose `destination_address` is the same
string. Each name is checked here with the grammar of the models (no character a dial string
or dialplan re-parses) and checked again, whole, by each adapter's dial string."""

from __future__ import annotations

from bridge.directory.models import (
    INTERNAL_KINDS,
    check_context,
    check_dialplan_exten,
    check_pbx_name,
    check_queue_name,
)
from bridge.pbx.ports import DialTarget


def is_internal(address: str) -> bool:
    kind, sep, _ = address.partition(":")
    return bool(sep) and kind in INTERNAL_KINDS


def parse_internal(address: str) -> DialTarget:
    """The dial target of an internal address, or ValueError (not one, or malformed)."""
    kind, sep, rest = address.partition(":")
    if not sep or kind not in INTERNAL_KINDS:
        raise ValueError("not an internal destination (extension:, queue:, dialplan:)")
    if kind == "extension":
        return DialTarget(endpoint=check_pbx_name(rest))
    if kind == "queue":
        return DialTarget(queue=check_queue_name(rest))
    exten, at, context = rest.rpartition("@")
    if not at:
        raise ValueError("a dialplan destination is dialplan:<extension>@<context>")
    return DialTarget(context=check_context(context), exten=check_dialplan_exten(exten))
