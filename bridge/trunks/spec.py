"""A directory trunk as the PBX port takes it (password included: provisioning only)."""

from __future__ import annotations

from bridge.directory.models import Trunk
from bridge.pbx.ports import TrunkSpec


def trunk_spec(trunk: Trunk) -> TrunkSpec:
    return TrunkSpec(
        id=trunk.id,
        host=trunk.host,
        port=trunk.port,
        transport=trunk.transport,
        username=trunk.username,
        password=trunk.password.get_secret_value() if trunk.password else None,
        register=trunk.registration,
    )
