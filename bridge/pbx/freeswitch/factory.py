"""Build the FreeSWITCH adapter from settings, so the composition root needs one call.

`FreeswitchSettings` is the model for `[freeswitch]` in the config file; `bridge.config` can
adopt it as is (`freeswitch: FreeswitchSettings = FreeswitchSettings()`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr

from bridge.pbx.freeswitch.adapter import FreeswitchAdapter, TrunkSource


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
    reconnect_initial_delay: float = 0.5
    reconnect_max_delay: float = 15.0
    command_timeout: float = 10.0


def build_freeswitch_adapter(
    settings: FreeswitchSettings | Mapping[str, Any],
    *,
    trunks: TrunkSource | None = None,
    blind_context: str = "callbridge-blind-transfer",
) -> FreeswitchAdapter:
    """A ready-to-start adapter; `trunks` lists every trunk to provision on each connect."""
    s = (
        settings
        if isinstance(settings, FreeswitchSettings)
        else FreeswitchSettings.model_validate(dict(settings))
    )
    return FreeswitchAdapter(
        s.host,
        s.port,
        s.password.get_secret_value(),
        profile=s.profile,
        marker=s.marker,
        blind_context=blind_context,
        blind_method=s.blind_method,
        media_host=s.media_host,
        unicast_ports=(s.unicast_port_min, s.unicast_port_max),
        gateway_dir=s.gateway_dir,
        trunks=trunks,
        client_options={
            "backoff_initial": s.reconnect_initial_delay,
            "backoff_max": s.reconnect_max_delay,
            "command_timeout": s.command_timeout,
        },
    )
