"""Build the FreeSWITCH adapter from the `[freeswitch]` settings, so the composition root
needs one call."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from bridge.config import FreeswitchSettings
from bridge.pbx.freeswitch.adapter import FreeswitchAdapter


def build_freeswitch_adapter(
    settings: FreeswitchSettings | Mapping[str, Any],
    *,
    on_connected: Callable[[], None] | None = None,
    blind_context: str = "callbridge-blind-transfer",
    fallback_context: str = "callbridge-fallback",
) -> FreeswitchAdapter:
    """A ready-to-start adapter; `on_connected` runs on each (re)connect (the trunk
    reconciler)."""
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
        gateway_mode=s.gateway_mode,
        gateway_owner=s.gateway_owner,
        gateway_group=s.gateway_group,
        instance=s.instance,
        lease_seconds=s.lease_seconds,
        fallback_context=fallback_context,
        heartbeat_interval=s.heartbeat_interval,
        on_connected=on_connected,
        client_options={
            "backoff_initial": s.reconnect_initial_delay,
            "backoff_max": s.reconnect_max_delay,
            "command_timeout": s.command_timeout,
        },
    )
