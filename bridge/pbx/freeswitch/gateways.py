"""Sofia gateways for our trunks, and dial strings for our targets.

A trunk becomes `<gateway_dir>/cb-trunk-<id>.xml`, a file the sofia profile includes
(`<gateways><X-PRE-PROCESS cmd="include" data="<gateway_dir>/*.xml"/></gateways>`, see
freeswitch_conf/). FreeSWITCH reads it on `reloadxml` + `sofia profile <p> rescan`; a changed
or removed gateway needs `killgw` first (rescan only adds new ones).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from xml.sax.saxutils import quoteattr

from bridge.pbx.ports import DialTarget, TrunkSpec

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")
_SAFE_DIAL = re.compile(r"^[^\s{}'\",]+$")  # nothing that ends a dial string or its {vars}


def gateway_name(trunk_id: str) -> str:
    if not _SAFE_ID.match(trunk_id):
        raise ValueError(f"trunk id {trunk_id!r} cannot name a sofia gateway")
    return f"cb-trunk-{trunk_id}"


def gateway_xml(trunk: TrunkSpec) -> str:
    """The `<include>` document for one gateway (values XML-escaped)."""
    params: list[tuple[str, str]] = [
        ("proxy", f"{trunk.host}:{trunk.port}"),
        ("realm", trunk.host),
        ("register", "true" if trunk.register and trunk.username and trunk.password else "false"),
        ("register-transport", trunk.transport),
        ("caller-id-in-from", "true"),
        ("retry-seconds", "30"),
    ]
    if trunk.username:
        params.append(("username", trunk.username))
        params.append(("from-user", trunk.username))
    else:
        params.append(("username", "callbridge"))  # sofia requires one; unused without auth
    if trunk.password:
        params.append(("password", trunk.password))
    lines = [f"    <param name={quoteattr(k)} value={quoteattr(v)}/>" for k, v in params]
    return (
        "<include>\n"
        f"  <gateway name={quoteattr(gateway_name(trunk.id))}>\n"
        + "\n".join(lines)
        + "\n  </gateway>\n</include>\n"
    )


def write_gateway(directory: Path, trunk: TrunkSpec) -> Path:
    """Write the gateway file atomically, readable by its owner only (it holds a password)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{gateway_name(trunk.id)}.xml"
    tmp = path.with_suffix(".xml.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(gateway_xml(trunk))
    tmp.replace(path)
    return path


def remove_gateway(directory: Path, trunk_id: str) -> bool:
    path = directory / f"{gateway_name(trunk_id)}.xml"
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def dial_string(target: DialTarget, profile: str) -> str:
    """`sofia/gateway/cb-trunk-<id>/<number>`, `sofia/<profile>/<uri>` or the route template."""
    if target.sip_uri:
        uri = target.sip_uri
        for scheme in ("sip:", "sips:"):
            uri = uri.removeprefix(scheme)
        dial = f"sofia/{profile}/{uri}"
    elif target.trunk_id:
        dial = f"sofia/gateway/{gateway_name(target.trunk_id)}/{target.number or ''}"
    elif target.route:
        dial = target.route.replace("{number}", target.number or "")
    else:
        raise ValueError("a dial target needs a SIP URI, a trunk or a route")
    if not _SAFE_DIAL.match(dial):
        raise ValueError(f"refusing dial string {dial!r}")
    return dial
