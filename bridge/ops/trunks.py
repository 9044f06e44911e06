"""Trunks as the PBX has them: each directory trunk with whether it is provisioned now.

Registration status proper is not visible through ARI (nor cheaply through ESL): what is shown
is whether the trunk registers (its setting) and whether its objects exist on the PBX now
(`PbxAdapter.provisioned_trunks`, what the trunk reconciler also reads).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from bridge.log import get_logger

log = get_logger(__name__)


async def trunk_states(
    trunks: list[Any],
    connected: bool,
    provisioned: Callable[[], Awaitable[set[str]]],
) -> dict[str, Any]:
    present: set[str] | None = None
    error: str | None = None
    if connected:
        try:
            present = await provisioned()
        except Exception as exc:  # the PBX answered badly: say so, do not fail the page
            error = str(exc) or type(exc).__name__
            log.warning("ops.trunk_states_failed", error=error)
    data = []
    for trunk in trunks:
        doc = trunk.public_dict()
        if present is None:
            state = "unknown"
        else:
            state = "provisioned" if trunk.id in present else "missing"
        doc["pbx_state"] = state
        data.append(doc)
    return {"pbx_connected": connected, "error": error, "data": data}
