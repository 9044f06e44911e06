"""Sofia gateways for our trunks, and dial strings for our targets.

A trunk becomes `<gateway_dir>/cb-trunk-<id>.xml`, a file the sofia profile includes
(`<gateways><X-PRE-PROCESS cmd="include" data="<gateway_dir>/*.xml"/></gateways>`, see
freeswitch_conf/). FreeSWITCH reads it on `reloadxml` + `sofia profile <p> rescan`; a changed
or removed gateway needs `killgw` first (rescan only adds new ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from xml.sax.saxutils import quoteattr

from bridge.errors import PbxCommandFailed, UnsafeDialString
from bridge.log import get_logger
from bridge.pbx.ports import DialTarget, TrunkSpec
from bridge.sip import SipUriError, check_uri_syntax

log = get_logger(__name__)
Api = Callable[[str], Awaitable[str]]  # runs one API command; -ERR raises PbxCommandFailed

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")
# The final dial string: a whitelist. No `, | { } [ ] < > $ ^ & ( ) ' "` or whitespace: nothing
# that ends a dial string, adds a leg, opens variables or expands one.
_SAFE_DIAL = re.compile(r"^[A-Za-z0-9+_.!~*%:@=;/#-]+$")
_SAFE_URI = re.compile(r"^[A-Za-z0-9+_.!~*%:@=;-]+$")  # a SIP URI after its scheme (no IPv6 [])
_SAFE_ROUTE = re.compile(r"^[A-Za-z][A-Za-z0-9]*/[A-Za-z0-9+_./@:#*=;-]+$")
# Destinations inside the PBX (issue 9): the grammar of bridge.directory.models, again.
_PBX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_EXTEN = re.compile(r"^[A-Za-z0-9+*#][A-Za-z0-9+*#_.-]{0,63}$")
# Where queue destinations go: a dialplan context that runs `callcenter <queue>` (docs).
QUEUE_CONTEXT = "callbridge-queue"
_NUMBER = re.compile(r"^\+?[0-9]{1,20}$")


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


DEFAULT_MODE = 0o640  # owner writes, FreeSWITCH's group reads; nobody else (passwords)


def check_mode(mode: int) -> int:
    """A gateway file holds a trunk password: never world-accessible, always owner-readable."""
    if not 0 <= mode <= 0o777 or mode & 0o007 or not mode & 0o400:
        raise ValueError(
            f"gateway file mode {mode:#o} must be readable by its owner and give others "
            "nothing (it holds trunk passwords); e.g. 0o640 with gateway_group = FreeSWITCH's"
        )
    return mode


def _ids(owner: str | None, group: str | None) -> tuple[int, int]:
    """uid/gid for fchown (-1: leave as is); names or numbers."""
    uid = gid = -1
    if owner:
        uid = int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
    if group:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    return uid, gid


def write_gateway(
    directory: Path,
    trunk: TrunkSpec,
    *,
    mode: int = DEFAULT_MODE,
    owner: str | None = None,
    group: str | None = None,
) -> bool:
    """Write the gateway file atomically with `mode` (umask does not apply) and, if given,
    `owner`/`group` (FreeSWITCH runs as its own user in packaged installs and must read it);
    False when it already said exactly this with these permissions."""
    check_mode(mode)
    uid, gid = _ids(owner, group)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{gateway_name(trunk.id)}.xml"
    text = gateway_xml(trunk)
    with contextlib.suppress(OSError):
        st = path.stat()
        same_ids = uid in (-1, st.st_uid) and gid in (-1, st.st_gid)
        if st.st_mode & 0o777 == mode and same_ids and path.read_text(encoding="utf-8") == text:
            return False
    tmp = path.with_suffix(".xml.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    tmp.replace(path)
    return True


def provisioned_ids(directory: Path) -> set[str]:
    """Trunk ids of the gateway files in `directory`."""
    if not directory.is_dir():
        return set()
    return {p.stem.removeprefix("cb-trunk-") for p in directory.glob("cb-trunk-*.xml")}


def remove_gateway(directory: Path, trunk_id: str) -> bool:
    path = directory / f"{gateway_name(trunk_id)}.xml"
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def dial_string(target: DialTarget, profile: str) -> str:
    """`sofia/gateway/cb-trunk-<id>/<number>`, `sofia/<profile>/<uri>`, the route template,
    or inside the PBX `user/<extension>` and `loopback/<exten>/<context>/XML` (a queue is
    `loopback/<queue>/callbridge-queue/XML`),
    checked whole before it is used (UnsafeDialString): `bridge`/`originate` split a dial
    string on `,` `|` `:_:`, read `{...}`/`[...]`/`<...>` as variables and expand `${...}`,
    so none of those (nor quotes or whitespace) may appear; each kind has its own shape."""
    if target.endpoint:
        dial = f"user/{_pbx_name(target.endpoint)}"
    elif target.queue:
        dial = f"loopback/{_pbx_name(target.queue)}/{QUEUE_CONTEXT}/XML"
    elif target.context:
        context = _pbx_name(target.context)
        if context.lower().startswith("callbridge-"):
            raise UnsafeDialString(f"refusing callbridge's own context {context!r}")
        exten = target.exten or ""
        if not _EXTEN.match(exten):
            raise UnsafeDialString(f"refusing dialplan extension {exten!r}")
        dial = f"loopback/{exten}/{context}/XML"
    elif target.sip_uri:
        dial = f"sofia/{_profile(profile)}/{_sofia_uri(target.sip_uri)}"
    elif target.trunk_id:
        if not _SAFE_ID.match(target.trunk_id):
            raise UnsafeDialString(f"refusing trunk id {target.trunk_id!r} in a dial string")
        dial = f"sofia/gateway/{gateway_name(target.trunk_id)}/{_number(target.number)}"
    elif target.route:
        if target.route.count("{number}") > 1:
            raise UnsafeDialString("transfer.default_route may contain {number} once")
        dial = target.route.replace("{number}", _number(target.number))
        if not _SAFE_ROUTE.match(dial):
            raise UnsafeDialString(f"refusing dial string {dial!r} from transfer.default_route")
    else:
        raise UnsafeDialString("a dial target needs a SIP URI, a trunk or a route")
    if not _SAFE_DIAL.match(dial):
        raise UnsafeDialString(f"refusing dial string {dial!r}")
    return dial


def refer_uri(target: DialTarget) -> str:
    """The SIP URI a REFER (`uuid_deflect`) sends the caller to, checked like a dial string."""
    if not target.sip_uri:
        raise UnsafeDialString("a REFER needs a SIP URI target")
    uri = target.sip_uri
    _sofia_uri(uri)
    return uri if uri.lower().startswith(("sip:", "sips:")) else f"sip:{uri}"


def _sofia_uri(uri: str) -> str:
    """The URI without its scheme, as sofia dial strings take it."""
    try:
        check_uri_syntax(uri)
    except SipUriError as exc:
        raise UnsafeDialString(f"refusing to dial SIP URI {uri!r}: {exc}") from exc
    rest = uri.split(":", 1)[1]
    if not _SAFE_URI.match(rest):
        raise UnsafeDialString(f"refusing to dial SIP URI {uri!r}")
    return rest


def _pbx_name(name: str | None) -> str:
    if not name or not _PBX_NAME.match(name):
        raise UnsafeDialString(f"refusing PBX name {name!r} in a dial string")
    return name


def _number(number: str | None) -> str:
    if not number or not _NUMBER.match(number):
        raise UnsafeDialString(f"refusing to dial number {number!r}")
    return number


def _profile(profile: str) -> str:
    if not _SAFE_ID.match(profile):
        raise UnsafeDialString(f"refusing sofia profile name {profile!r}")
    return profile


class SofiaGateways:
    """Trunks as gateways of one sofia profile, through the event socket's API commands."""

    def __init__(
        self,
        api: Api,
        profile: str,
        directory: Path,
        *,
        mode: int = DEFAULT_MODE,
        owner: str | None = None,
        group: str | None = None,
    ) -> None:
        self._api = api
        self.profile = profile
        self.directory = directory
        self.mode = check_mode(mode)
        self.owner = owner
        self.group = group

    def provisioned(self) -> set[str]:
        return provisioned_ids(self.directory)

    async def provision(self, trunks: list[TrunkSpec]) -> None:
        """Write every file, then one `reloadxml`; a changed or missing gateway is killed and
        rescanned, an unchanged one that sofia already runs is left alone (no re-REGISTER)."""
        stale: list[str] = []
        for trunk in trunks:
            try:
                changed = write_gateway(
                    self.directory, trunk, mode=self.mode, owner=self.owner, group=self.group
                )
            except (OSError, KeyError) as exc:  # KeyError: no such user/group
                raise PbxCommandFailed(
                    f"cannot write gateway file for trunk {trunk.id} "
                    f"(owner={self.owner}, group={self.group}, mode={self.mode:#o}): {exc}"
                ) from exc
            name = gateway_name(trunk.id)
            if changed or not await self._loaded(name):
                stale.append(name)
        if not stale:
            return
        await self._api("reloadxml")
        for name in stale:
            with contextlib.suppress(PbxCommandFailed):  # a new gateway has nothing to kill
                await self._api(f"sofia profile {self.profile} killgw {name}")
        for name in stale:
            await self._rescan(name)
            log.info("freeswitch.gateway_loaded", gateway=name, profile=self.profile)

    async def remove(self, trunk_id: str) -> None:
        remove_gateway(self.directory, trunk_id)
        await self._api("reloadxml")
        with contextlib.suppress(PbxCommandFailed):
            await self._api(f"sofia profile {self.profile} killgw {gateway_name(trunk_id)}")
        log.info("freeswitch.gateway_removed", gateway=gateway_name(trunk_id))

    async def _loaded(self, name: str) -> bool:
        status = await self._api(f"sofia status gateway {name}")
        return "invalid gateway" not in status.lower()

    async def _rescan(self, name: str) -> None:
        # killgw only marks the gateway for deletion; the sofia worker drops it a moment
        # later, and rescan skips names that still exist. Retry until the new one is there.
        for _ in range(10):
            await self._api(f"sofia profile {self.profile} rescan")
            if await self._loaded(name):
                return
            await asyncio.sleep(0.3)
        raise PbxCommandFailed(
            f"sofia did not load gateway {name}: can FreeSWITCH's user read "
            f"{self.directory / (name + '.xml')}? (freeswitch.gateway_group, gateway_mode)"
        )
