"""FreeSWITCH through the inbound event socket: the PBX port's verbs as ESL commands, channel
events as PBX events. No business logic: what a busy leg means is decided in `bridge.calls`.

Attach: the dialplan marks a caller (`set callbridge=1`) and holds it in the take guard
(`sleep`); the daemon claims it there (mod_hash) and breaks the sleep, the dialplan `park`s it;
its CHANNEL_PARK is the arrival. Ids are the PBX's own and derived, never only remembered, so a
restarted daemon finds them again: outbound legs are originated with `origination_uuid=<leg id>`
(the call service's `cbleg-...`), trunks are sofia gateways `cb-trunk-<id>`. Media is `unicast`
(raw L16 frames over UDP, only while the caller is parked). Facts: docs/freeswitch-esl-notes.md,
docs/freeswitch.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.errors import PbxCommandFailed, PbxUnavailable
from bridge.log import get_logger
from bridge.pbx.freeswitch import events as fse
from bridge.pbx.freeswitch.esl_client import (
    ConnectionState,
    EslChannelGone,
    EslClient,
    EslCommandError,
    EslConnectionError,
    EslError,
)
from bridge.pbx.freeswitch.esl_protocol import EslEvent, encode_bgapi
from bridge.pbx.freeswitch.gateways import SofiaGateways, dial_string, refer_uri
from bridge.pbx.ports import (
    CallMissed,
    ChannelGone,
    ChannelHungUp,
    ConnectionLost,
    ConnectionRestored,
    DialTarget,
    DtmfReceived,
    EventSink,
    ExtensionState,
    LegAnswered,
    LegFacts,
    LegFailed,
    LegProgress,
    LegRinging,
    MediaAddress,
    PbxEvent,
    PlaybackFinished,
    TrunkSpec,
    check_dtmf,
)

log = get_logger(__name__)

EVENTS = (
    "CHANNEL_EXECUTE",  # the hook's take guard (`sleep`): where callers are claimed
    "CHANNEL_PARK",
    "CHANNEL_PROGRESS",
    "CHANNEL_PROGRESS_MEDIA",
    "CHANNEL_ANSWER",
    "CHANNEL_HANGUP",
    "PLAYBACK_STOP",
    "DTMF",
    "BACKGROUND_JOB",  # originate results: failures that never created a channel
)
RING_TONE = "%(2000,4000,440,480)|-1"  # gentones: ringback, looped until uuid_break
TONES = {"ring": RING_TONE}
TONE_VAR = "callbridge_tone"  # on the caller: the playback id of its running tone
CLAIM_REALM = "callbridge_owner"  # mod_hash realm: caller uuid -> the daemon that took it
# The hook's take guard claims an untaken caller under this name when its `sleep` ends.
FALLBACK_OWNER = "fallback"
GUARD_APP = "sleep"  # the take guard's application (freeswitch_conf's hook)


class FreeswitchAdapter:
    name = "freeswitch"

    def __init__(
        self,
        host: str,
        port: int,
        password: str,
        *,
        profile: str = "callbridge",
        marker: str = fse.DEFAULT_MARKER,
        blind_context: str = "callbridge-blind-transfer",
        blind_method: str = "transfer",
        media_host: str | None = None,
        unicast_ports: tuple[int, int] = (24000, 24999),
        gateway_dir: Path | None = None,
        on_connected: Callable[[], None] | None = None,
        heartbeat_var: str | None = "callbridge_seen",
        heartbeat_interval: float = 1.0,
        instance: str | None = None,
        lease_seconds: float = 30.0,
        fallback_context: str = "callbridge-fallback",
        gateway_mode: int = 0o640,
        gateway_owner: str | None = None,
        gateway_group: str | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        if blind_method not in ("transfer", "deflect"):
            raise ValueError("blind_method must be transfer or deflect")
        self.client = EslClient(
            host,
            port,
            password,
            on_event=self._on_event,
            on_state=self._on_state,
            **(client_options or {}),
        )
        self.profile = profile
        self.marker = marker
        self.blind_context = blind_context
        self.blind_method = blind_method
        # FreeSWITCH binds the unicast socket on this address: one the daemon can reach.
        self.media_host = media_host or host
        self._ports = itertools.cycle(range(unicast_ports[0], unicast_ports[1] + 1))
        self._port_count = unicast_ports[1] - unicast_ports[0] + 1
        self._media: dict[str, int] = {}  # caller uuid -> FreeSWITCH-side unicast port
        self.gateways = (
            SofiaGateways(
                self._api,
                profile,
                gateway_dir,
                mode=gateway_mode,
                owner=gateway_owner,
                group=gateway_group,
            )
            if gateway_dir
            else None
        )
        # Who we are when claiming callers (mod_hash): a restarted daemon with the same name
        # takes its own calls back, another daemon on the same FreeSWITCH leaves them alone.
        self.instance = _word(instance or socket.gethostname())
        if self.instance == FALLBACK_OWNER:
            raise ValueError(f"instance {FALLBACK_OWNER!r} is the hook's own claim: pick another")
        self._no_hash = False  # mod_hash not loaded: calls are taken without a claim
        self._tones: dict[str, str] = {}  # playback id -> caller uuid
        # Lease: each caller we hold in park has a scheduled transfer to the fallback that
        # the heartbeat keeps pushing back; if this daemon dies, the caller reaches the
        # fallback within lease_seconds instead of waiting in park for nobody.
        self.lease_seconds = lease_seconds
        self.fallback_context = _word(fallback_context)
        self._leases: dict[str, str] = {}  # parked caller uuid -> fallback extension
        self._lease_lock = asyncio.Lock()
        self._leases_renewed = 0.0
        # Called on every (re)connect: the trunk reconciler (bridge.trunks) runs then.
        self._on_connected = on_connected
        self._sink: EventSink | None = None
        self._callers: set[str] = set()
        self._legs: set[str] = set()  # originated, not yet ended
        self._ringing: set[str] = set()
        self._progressed: set[str] = set()  # early media seen (183), no ring yet
        self._answered: set[str] = set()
        self._ended: set[str] = set()  # legs whose CHANNEL_HANGUP was seen
        # Callers whose current park began with media up and has no unicast yet: the only
        # safe place for `unicast` on 1.10.12. In a park that began without media it aborts
        # FreeSWITCH (switch_ivr_park asserts read_frame); in one that already had unicast
        # the park loop keeps serving the old connection. Others are re-parked first.
        self._fresh_park: set[str] = set()
        self._reparks: dict[str, asyncio.Future[None]] = {}
        self._leg_parks: dict[str, asyncio.Future[None]] = {}  # answered legs not parked yet
        self._connect_task: asyncio.Task[None] | None = None
        # The dialplan hook parks callers only while this global (FreeSWITCH's epoch) is
        # fresh; otherwise they go straight to the fallback (daemon unreachable).
        self.heartbeat_var = heartbeat_var
        self.heartbeat_interval = heartbeat_interval
        self._heartbeat_task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, sink: EventSink) -> None:
        self._sink = sink
        await self.client.subscribe(EVENTS)  # remembered: applied on every (re)connect
        loop = asyncio.get_running_loop()
        self._connect_task = loop.create_task(self._connect())
        if self.heartbeat_var:
            self._heartbeat_task = loop.create_task(self._heartbeat_loop())

    async def _connect(self) -> None:
        try:
            await self.client.connect(retry=True)
        except EslError as exc:
            log.error("freeswitch.connect_failed", error=str(exc))
            await self._emit(ConnectionLost(""))

    async def stop(self) -> None:
        for task in (self._connect_task, self._heartbeat_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.client.close()

    async def _heartbeat(self) -> None:
        if self.heartbeat_var and self.client.connected:
            with contextlib.suppress(EslError):
                await self.client.api(f"expand global_setvar {self.heartbeat_var}=${{strepoch()}}")

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            await self._heartbeat()
            if self.lease_seconds and loop.time() - self._leases_renewed >= self.lease_seconds / 3:
                self._leases_renewed = loop.time()
                try:
                    await self._renew_leases()
                except Exception:  # the heartbeat must go on, or every caller is sent away
                    log.exception("freeswitch.lease_renewal_crashed")

    # --- leases -----------------------------------------------------------------------------

    async def _lease(self, uuid: str, extension: str) -> None:
        """(Re)arm the caller's lease: `sched_del <uuid>` (its task group) then
        `sched_transfer +<lease> <uuid> <ext> XML <fallback>`. Under one lock with
        `_drop_lease`, so a renewal never re-arms the lease of a caller just bridged."""
        if not self.lease_seconds:
            return
        ext = extension if _EXTENSION.match(extension or "") else "s"
        async with self._lease_lock:
            self._leases[uuid] = ext
            await self._arm(uuid, ext)

    async def _arm(self, uuid: str, ext: str) -> None:
        await self.client.api(f"sched_del {uuid}")
        when = math.ceil(self.lease_seconds)
        await self.client.api(f"sched_transfer +{when} {uuid} {ext} XML {self.fallback_context}")

    async def _drop_lease(self, uuid: str) -> None:
        """The caller leaves park for good (bridged, handed off, gone): no lease any more."""
        async with self._lease_lock:
            if self._leases.pop(uuid, None) is not None:
                with contextlib.suppress(EslError):
                    await self.client.api(f"sched_del {uuid}")

    async def _renew_leases(self) -> None:
        for uuid in list(self._leases):
            async with self._lease_lock:
                ext = self._leases.get(uuid)
                if ext is None or not self.client.connected:
                    continue
                try:
                    await self._arm(uuid, ext)
                except EslChannelGone:
                    self._leases.pop(uuid, None)
                except EslError as exc:
                    log.warning("freeswitch.lease_renewal_failed", channel=uuid, error=str(exc))

    @property
    def connected(self) -> bool:
        return self.client.connected

    async def _emit(self, event: PbxEvent) -> None:
        if self._sink is not None:
            await self._sink(event)

    async def _on_state(self, state: ConnectionState) -> None:
        if state in (ConnectionState.CONNECTED, ConnectionState.RESTORED):
            try:
                await self._heartbeat()
                if self._on_connected is not None:
                    self._on_connected()
                restored = await self._resync()
            except EslError as exc:  # dropped again meanwhile: LOST follows, then a retry
                log.warning("freeswitch.resync_failed", error=str(exc))
                return
            await self._emit(restored)
        elif state in (ConnectionState.LOST, ConnectionState.AUTH_FAILED):
            if state is ConnectionState.AUTH_FAILED:
                log.error("freeswitch.auth_failed_on_reconnect")
            await self._emit(ConnectionLost(""))

    async def _resync(self) -> ConnectionRestored:
        """Callers (marked, alive) and our legs that exist now. `show channels` lags behind
        the events (core db written asynchronously), so uuids we know are probed directly."""
        text = await self.client.api("show channels as json")
        rows = {r["uuid"]: r for r in (json.loads(text or "{}").get("rows") or []) if "uuid" in r}
        callers = []
        legs: list[tuple[str, bool]] = []
        facts: list[LegFacts] = []
        for uuid in sorted(set(rows) | self._callers | self._legs):
            row = rows.get(uuid)
            if row is None and not await self._exists(uuid):
                self._forget(uuid)
                continue
            if fse.is_leg(uuid):
                up = uuid in self._answered or (row or {}).get("callstate") in ("ACTIVE", "HELD")
                if up:
                    self._answered.add(uuid)
                self._legs.add(uuid)
                legs.append((uuid, up))
                facts.append(await self._leg_facts(uuid))
            elif (row is None or row.get("direction") == "inbound") and await self._marked(uuid):
                claim = await self._claim(uuid)
                if claim is not True:
                    if claim is None:
                        await self._emit(CallMissed.of(fse.arrival_from_row(row or {"uuid": uuid})))
                    continue
                if await self._in_take_guard(uuid):  # its CHANNEL_PARK is the arrival
                    await self._end_take_guard(uuid)
                    continue
                self._callers.add(uuid)
                await self._find_tone(uuid)
                arrived = fse.arrival_from_row(row or {"uuid": uuid})
                if await self._parked(uuid):
                    await self._lease(uuid, arrived.called_number)
                callers.append(arrived)
        await self._sweep_claims(set(rows))
        return ConnectionRestored(
            "", callers=tuple(callers), legs=tuple(legs), leg_facts=tuple(facts)
        )

    async def _sweep_claims(self, listed: set[str]) -> None:
        """Delete the claims of callers that no longer exist: a claim is deleted when its
        call ends, but not by a daemon that died (or lost its connection) meanwhile, and
        mod_hash keeps entries until FreeSWITCH restarts. Any daemon's claim: the channel is
        gone (`uuid_exists`, not the lagging `show channels`), so nobody can own it."""
        if self._no_hash:
            return
        try:
            dump = await self.client.api(f"hash_dump db {CLAIM_REALM}")
        except EslError as exc:
            if "-ERR no reply" in str(exc):
                return  # no claims at all: the event socket's answer to an empty output
            log.warning("freeswitch.claim_sweep_failed", error=str(exc))
            return
        prefix = f"D/{CLAIM_REALM}_"
        swept = 0
        for line in dump.splitlines():
            if not line.startswith(prefix):
                continue
            uuid, _, owner = line[len(prefix) :].partition("/")
            if not uuid or uuid in listed or uuid in self._callers or await self._exists(uuid):
                continue
            with contextlib.suppress(EslError):
                await self.client.api(f"hash delete_ifmatch/{CLAIM_REALM}/{uuid}/{owner}")
                swept += 1
        if swept:
            log.info("freeswitch.stale_claims_deleted", count=swept)

    async def _leg_facts(self, uuid: str) -> LegFacts:
        """The leg's owner, from the variables it was originated with. An originate is one
        atomic request here: a leg that exists was dialled."""

        async def var(name: str) -> str | None:
            value = (await self.client.api(f"uuid_getvar {uuid} {name}")).strip()
            return None if not value or value == "_undef_" or value.startswith("-ERR") else value

        return LegFacts(
            uuid,
            call_id=await var("CALLBRIDGE_CALL_ID"),
            transfer_id=await var("CALLBRIDGE_TRANSFER_ID"),
        )

    async def _exists(self, uuid: str) -> bool:
        return (await self.client.api(f"uuid_exists {uuid}")).strip() == "true"

    async def _marked(self, uuid: str) -> bool:
        try:
            return fse.truthy(await self.client.api(f"uuid_getvar {uuid} {self.marker}"))
        except EslChannelGone:
            return False

    async def _parked(self, uuid: str) -> bool:
        """Not bridged (a caller we bridged to a human needs no lease): neither `bridge_to`
        (set while bridged) nor `signal_bond` (the partner of a uuid_bridge) is set."""
        try:
            for var in ("bridge_to", "signal_bond"):
                if (await self.client.api(f"uuid_getvar {uuid} {var}")).strip() not in (
                    "",
                    "_undef_",
                ):
                    return False
        except EslChannelGone:
            return False
        return True

    async def _in_take_guard(self, uuid: str) -> bool:
        """Still in the hook's `sleep` (FreeSWITCH's `current_application`)."""
        try:
            app = await self.client.api(f"uuid_getvar {uuid} current_application")
        except EslChannelGone:
            return False
        return app.strip() == GUARD_APP

    async def _find_tone(self, uuid: str) -> None:
        """A tone a previous daemon started on this caller (its id is on the channel)."""
        with contextlib.suppress(EslChannelGone):
            pid = (await self.client.api(f"uuid_getvar {uuid} {TONE_VAR}")).strip()
            if pid and pid != "_undef_":
                self._tones[pid] = uuid

    # --- claiming callers -------------------------------------------------------------------

    async def _claim(self, uuid: str) -> bool | None:
        """Take the caller, atomically against other daemons and the hook's take guard:
        `hash insert_ifempty` (mod_hash, under a write lock) succeeds for one claimer only; a
        caller we claimed before (in the take guard, or before a restart) is ours again.
        True: ours; False: another daemon's; None: the take guard gave it to the fallback."""
        try:
            await self.client.api(f"hash insert_ifempty/{CLAIM_REALM}/{uuid}/{self.instance}")
        except EslCommandError as exc:
            if "already exists" in exc.reply:
                owner = (await self.client.api(f"hash select/{CLAIM_REALM}/{uuid}")).strip()
                if owner == FALLBACK_OWNER:
                    log.info("freeswitch.caller_went_to_fallback", channel=uuid)
                    return None
                if owner != self.instance:
                    log.info("freeswitch.caller_claimed_elsewhere", channel=uuid, owner=owner)
                    return False
            elif "not found" in exc.reply.lower():  # no mod_hash: cannot share FreeSWITCH
                if not self._no_hash:
                    log.warning("freeswitch.no_claim", reason="mod_hash not loaded")
                self._no_hash = True
            else:
                log.warning("freeswitch.claim_failed", channel=uuid, error=str(exc))
                return False
        return True

    async def _take(self, uuid: str, event: EslEvent) -> None:
        """The hook's take guard started (CHANNEL_EXECUTE `sleep` of a marked caller): claim
        the caller and end the sleep, so the dialplan parks it now, not when the guard
        runs out. The CHANNEL_PARK that follows is its arrival."""
        arrived = fse.arrival(event, self.marker)
        if arrived is None:
            return
        try:
            claim = await self._claim(uuid)
            if claim is True:
                await self._end_take_guard(uuid)
        except EslError as exc:  # connection gone: the resync claims it later
            log.warning("freeswitch.claim_failed", channel=uuid, error=str(exc))
            return
        if claim is None:  # this event reached us after the guard ran out
            await self._emit(CallMissed.of(arrived))

    async def _end_take_guard(self, uuid: str) -> None:
        """`uuid_break`: the hook's `sleep` checks the break flag every 20 ms."""
        with contextlib.suppress(EslChannelGone):
            await self.client.api(f"uuid_break {uuid}")

    async def _unclaim(self, uuid: str) -> None:
        if self._no_hash:
            return
        with contextlib.suppress(EslError):
            await self.client.api(f"hash delete_ifmatch/{CLAIM_REALM}/{uuid}/{self.instance}")

    def _forget(self, uuid: str) -> None:
        for group in (
            self._callers,
            self._legs,
            self._ringing,
            self._progressed,
            self._answered,
            self._fresh_park,
        ):
            group.discard(uuid)
        self._media.pop(uuid, None)
        for pid in [p for p, u in self._tones.items() if u == uuid]:
            del self._tones[pid]

    # --- events -----------------------------------------------------------------------------

    async def _on_event(self, event: EslEvent) -> None:
        name = event.name
        if name == "BACKGROUND_JOB":
            await self._on_job(event)
            return
        uuid = event.unique_id or ""
        if not uuid:
            return
        if fse.is_leg(uuid):
            await self._on_leg_event(name, uuid, event)
        elif name == "CHANNEL_EXECUTE":
            if event.get("Application") == GUARD_APP and uuid not in self._callers:
                await self._take(uuid, event)
        elif name == "CHANNEL_PARK":
            waiter = self._reparks.pop(uuid, None)
            if waiter is not None:  # our own re-park, not a new arrival
                if not waiter.done():
                    waiter.set_result(None)
                return
            if uuid in self._callers:  # hand back (issue 9 §5): parked after its bridge
                await self._parked_after_bridge(uuid, event)
                return
            arrived = fse.arrival(event, self.marker)
            if arrived is not None:
                try:
                    mine = await self._claim(uuid)
                except EslError as exc:  # connection gone: the resync claims it later
                    log.warning("freeswitch.claim_failed", channel=uuid, error=str(exc))
                    return
                if mine is None:  # the hook's take guard gave it to the fallback
                    await self._emit(CallMissed.of(arrived))
                if not mine:
                    return
                self._callers.add(uuid)
                if event.get("Answer-State") in ("answered", "early"):
                    self._fresh_park.add(uuid)
                try:
                    await self._lease(uuid, arrived.called_number)
                except EslError as exc:
                    log.warning("freeswitch.lease_failed", channel=uuid, error=str(exc))
                await self._emit(arrived)
        elif name == "CHANNEL_HANGUP":
            self._leases.pop(uuid, None)  # FreeSWITCH drops nothing: the task finds no channel
            if uuid in self._callers:
                self._forget(uuid)
                await self._unclaim(uuid)
                await self._emit(ChannelHungUp(uuid, fse.q850(event), event.get("Hangup-Cause")))
        elif name == "DTMF" and uuid in self._callers:
            await self._emit(DtmfReceived(uuid, event.get("DTMF-Digit") or ""))
        elif name == "PLAYBACK_STOP" and uuid in self._callers:
            await self._emit(PlaybackFinished(uuid, uuid))

    async def _on_leg_event(self, name: str, uuid: str, event: EslEvent) -> None:
        if name == "CHANNEL_PROGRESS":  # 180: a real ring
            if uuid not in self._ringing and uuid not in self._answered:
                self._ringing.add(uuid)
                await self._emit(LegRinging(uuid))
        elif name == "CHANNEL_PROGRESS_MEDIA":  # 183 / early media, no ring (yet)
            seen = self._ringing | self._progressed | self._answered
            if uuid not in seen:
                self._progressed.add(uuid)
                await self._emit(LegProgress(uuid))
        elif name == "CHANNEL_ANSWER":
            self._answered.add(uuid)
            await self._emit(LegAnswered(uuid))
        # --- warm transfer (issue 9 §2): the answered leg's park (`&park()`) takes unicast
        # for the brief, and its keys are the destination's accept / decline ---
        elif name == "CHANNEL_PARK" and event.get("Answer-State") == "answered":
            self._fresh_park.add(uuid)
            parked = self._leg_parks.pop(uuid, None)
            if parked is not None and not parked.done():
                parked.set_result(None)
        elif name == "DTMF":
            await self._emit(DtmfReceived(uuid, event.get("DTMF-Digit") or ""))
        elif name == "CHANNEL_HANGUP":
            parked = self._leg_parks.pop(uuid, None)
            if parked is not None and not parked.done():
                parked.set_exception(ChannelGone(f"leg {uuid} hung up"))
            answered = uuid in self._answered
            self._forget(uuid)
            self._remember_end(uuid)
            cause = event.get("Hangup-Cause")
            if answered:
                await self._emit(ChannelHungUp(uuid, fse.q850(event), cause))
            else:
                sip = fse.sip_code(event)
                await self._emit(LegFailed(uuid, fse.q850(event), cause, sip, fse.is_local(cause)))

    async def _on_job(self, event: EslEvent) -> None:
        """An originate that failed before any channel hung up (bad gateway, no route...)."""
        leg = fse.originated_leg(event)
        cause = fse.job_failure(event)
        if leg is None or cause is None or leg in self._ended or leg in self._answered:
            return
        self._forget(leg)
        self._remember_end(leg)
        local = fse.is_local(cause) or cause not in fse.CAUSE_NAMES  # not a call outcome: ours
        await self._emit(LegFailed(leg, fse.Q850.get(cause), cause, None, local))

    def _remember_end(self, uuid: str) -> None:
        self._ended.add(uuid)
        if len(self._ended) > 1000:  # only needed until the originate's job result arrives
            self._ended.pop()

    # --- verbs ------------------------------------------------------------------------------

    async def answer(self, channel_id: str) -> None:
        await self._api(f"uuid_answer {_uuid(channel_id)}")

    async def hangup(self, channel_id: str) -> None:
        with contextlib.suppress(ChannelGone):
            await self._api(f"uuid_kill {_uuid(channel_id)}")

    async def continue_in_dialplan(self, channel_id: str, context: str, extension: str) -> None:
        uuid = _uuid(channel_id)
        await self._hand_off(uuid)
        await self._api(f"uuid_transfer {uuid} {_word(extension)} XML {_word(context)}")

    async def set_variable(self, channel_id: str, name: str, value: str) -> None:
        await self._api(f"uuid_setvar {_uuid(channel_id)} {_word(name)} {_line(value)}")

    async def send_dtmf(self, channel_id: str, digits: str) -> None:
        """`uuid_send_dtmf <uuid> <digits>`: FreeSWITCH sends them on the leg (RFC 2833 on
        sofia), `w`/`W` as its own 0.5 s / 1 s pauses."""
        await self._api(f"uuid_send_dtmf {_uuid(channel_id)} {check_dtmf(digits)}")

    async def record_outcome(self, channel_id: str, fields: dict[str, str]) -> None:
        """`callbridge_<key>` channel variables: FreeSWITCH's CDR (xml_cdr, cdr_csv
        templates) logs the channel's variables."""
        for key, value in fields.items():
            await self.set_variable(channel_id, f"callbridge_{key}", value)

    async def attach_media(self, channel_id: str, local: MediaAddress, codec: str) -> MediaAddress:
        """`unicast`: FreeSWITCH sends the caller's audio as raw L16 (host order, 8 kHz for
        G.711 callers) from `media_host:<port>` to `local`, and plays what reaches that port.
        `codec` is not used: FreeSWITCH transcodes to L16 whatever the caller speaks."""
        uuid = _uuid(channel_id)
        if fse.is_leg(uuid) and uuid not in self._fresh_park:
            await self._leg_parked(uuid)  # a warm transfer's brief (issue 9 §2)
        elif uuid not in self._fresh_park:
            await self._repark(uuid)
        port = self._media.get(uuid) or self._free_port()
        headers = {
            "local-ip": self.media_host,
            "local-port": str(port),
            "remote-ip": local.host,
            "remote-port": str(local.port),
            "transport": "udp",
        }
        try:
            await self.client.sendmsg_raw(uuid, "unicast", headers)
        except EslError as exc:
            raise _translate(exc) from exc
        self._fresh_park.discard(uuid)
        self._media[uuid] = port
        return MediaAddress(self.media_host, port, framing="raw", codec="slin_le")

    async def _leg_parked(self, uuid: str) -> None:
        """An answered leg parks (`&park()`) right after its CHANNEL_ANSWER, and the call
        may ask for its media before that CHANNEL_PARK arrived: wait for it (a re-park
        meanwhile would race the original park, and unicast would go to the park that ends)."""
        parked = self._leg_parks[uuid] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(5):
                await parked
        except TimeoutError as exc:
            raise PbxCommandFailed("the answered leg did not park") from exc
        finally:
            self._leg_parks.pop(uuid, None)

    async def _repark(self, uuid: str) -> None:
        """Leave and re-enter park (inline dialplan), which also ends an old unicast: the
        new park starts with media up and takes `unicast`. Waits for its CHANNEL_PARK."""
        waiter = self._reparks[uuid] = asyncio.get_running_loop().create_future()
        try:
            await self._api(f"uuid_transfer {uuid} park inline")
            async with asyncio.timeout(5):
                await waiter
        except TimeoutError as exc:
            raise PbxCommandFailed("the caller was not parked again") from exc
        finally:
            self._reparks.pop(uuid, None)
        self._fresh_park.add(uuid)

    async def detach_media(self, channel_id: str) -> None:
        """Nothing to send: FreeSWITCH ends `unicast` when the caller leaves park (bridge,
        transfer, hangup). The port goes back to the pool."""
        self._media.pop(_uuid(channel_id), None)

    def _free_port(self) -> int:
        used = set(self._media.values())
        for _ in range(self._port_count):
            port = next(self._ports)
            if port not in used:
                return port
        raise PbxCommandFailed("no free unicast port left (raise unicast_ports)")

    async def play_tone(self, channel_id: str, tone: str, playback_id: str) -> None:
        """`uuid_broadcast` of the `gentones` app (argument quoted: uuid_broadcast splits on
        spaces). Not `playback` of a tone_stream: a playback ends with a session reset that
        shuts `unicast` down for the rest of the park; and not `uuid_displace`: a media bug
        on a parked channel hears no written frames, so the caller would hear nothing
        (both seen on 1.10.12). The playback id is kept on the channel (`callbridge_tone`)
        so that a restarted daemon can still stop the tone."""
        uuid = _uuid(channel_id)
        pid = _word(playback_id)
        await self._api(f"uuid_setvar {uuid} {TONE_VAR} {pid}")
        self._tones[pid] = uuid
        await self._api(f"uuid_broadcast {uuid} 'gentones::{_line(_tone(tone))}' aleg")

    async def stop_playback(self, playback_id: str) -> None:
        """`uuid_break <uuid> all`: a plain `uuid_break` stops only a broadcast that already
        runs; a `uuid_broadcast` still queued on the channel (a transfer that failed within
        ~150 ms of its ringback) would start afterwards and ring forever (1.10.12). `all`
        also flushes the queue (`switch_core_session_flush_private_events`)."""
        uuid = self._tones.pop(playback_id, None) or await self._tone_owner(playback_id)
        if uuid is None:
            log.info("freeswitch.playback_unknown", playback=playback_id)
            return
        with contextlib.suppress(ChannelGone):
            await self._api(f"uuid_break {uuid} all")
            await self._api(f"uuid_setvar {uuid} {TONE_VAR}")

    async def _tone_owner(self, playback_id: str) -> str | None:
        """The caller whose channel says it plays `playback_id` (not in our map: started by a
        previous daemon before this one resynced)."""
        for uuid in sorted(self._callers):
            with contextlib.suppress(ChannelGone):
                if (await self._api(f"uuid_getvar {uuid} {TONE_VAR}")).strip() == playback_id:
                    return uuid
        return None

    async def release(self, channel_id: str) -> None:
        """The call is over for us: forget its media port, tones, park state and our claim
        (the caller itself is hung up or handed off by the call service, not here)."""
        uuid = _uuid(channel_id)
        waiter = self._reparks.pop(uuid, None)
        if waiter is not None and not waiter.done():
            waiter.cancel()
        self._forget(uuid)
        await self._drop_lease(uuid)
        await self._unclaim(uuid)

    # --- warm transfer (issue 9 §2) ----------------------------------------------------------

    async def start_hold(self, channel_id: str, moh_class: str) -> None:
        """`uuid_broadcast` of `playback::local_stream://<class>` to the parked caller (its
        unicast ends: media is attached again, re-parked, if the caller comes back). The
        stream plays until `stop_hold`; an unknown class plays nothing, so the vanilla
        configuration's `moh` / `default` streams must exist."""
        uuid = _uuid(channel_id)
        self._media.pop(uuid, None)
        self._fresh_park.discard(uuid)
        await self._api(f"uuid_broadcast {uuid} 'playback::local_stream://{_word(moh_class)}' aleg")

    async def stop_hold(self, channel_id: str) -> None:
        """`uuid_break <uuid> all`, as for tones: a queued broadcast must not start later."""
        with contextlib.suppress(ChannelGone):
            await self._api(f"uuid_break {_uuid(channel_id)} all")

    async def end_brief(self, leg_id: str) -> None:
        """Nothing to send: the leg's unicast ends when it leaves park (`uuid_bridge`) or
        hangs up. Its port goes back to the pool."""
        self._media.pop(_uuid(leg_id), None)
        self._fresh_park.discard(_uuid(leg_id))

    async def originate(
        self,
        leg_id: str,
        target: DialTarget,
        *,
        caller_number: str | None,
        ring_timeout: float,
        variables: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """`bgapi originate {...}<dial> &park()`: returns once FreeSWITCH took the job; the
        outcome arrives as channel events (or the job's `-ERR`)."""
        assert fse.is_leg(leg_id), "leg ids must carry the leg prefix"
        uuid = _uuid(leg_id)
        chan_vars = {
            "origination_uuid": uuid,
            "originate_timeout": str(max(1, round(ring_timeout))),
            "callbridge_leg": "true",
            "hangup_after_bridge": "true",
            **(variables or {}),
        }
        if caller_number:
            chan_vars["origination_caller_id_number"] = caller_number
        if target.queue or target.context:
            chan_vars.update(LOOPBACK_CODECS)
        # `sip_h_` adds INVITE headers: on a SIP leg's own INVITE, and on a loopback leg's
        # (queue, dialplan) the INVITE its dialplan sends (mod_loopback copies the variables
        # there; seen on FreeSWITCH 1.10.12), as Asterisk's inherited variables do.
        for name, value in (headers or {}).items():
            if not re.fullmatch(r"X-[A-Za-z0-9-]{1,60}", name):
                raise PbxCommandFailed(f"refusing SIP header name {name!r}")
            chan_vars[f"sip_h_{name}"] = value
        command = f"originate {{{_vars(chan_vars)}}}{dial_string(target, self.profile)} &park()"
        self._legs.add(uuid)
        try:
            reply = await self.client.raw_command(encode_bgapi(command))
        except EslError as exc:
            self._legs.discard(uuid)
            raise _translate(exc) from exc
        if not reply.reply_text.startswith("+OK"):
            self._legs.discard(uuid)
            raise PbxCommandFailed(f"originate refused: {reply.reply_text}")

    async def connect(self, channel_id: str, leg_id: str) -> None:
        """`uuid_bridge`: the caller leaves park, which also ends its unicast media."""
        uuid = _uuid(channel_id)
        # Hand back (issue 9 §5): when the destination hangs up first, uuid_bridge would hang
        # the caller up too; parked instead, the call service decides (back to the
        # assistant, or hang up as before).
        await self._api(f"uuid_setvar {uuid} park_after_bridge true")
        await self._api(f"uuid_bridge {uuid} {_uuid(leg_id)}")
        self._media.pop(uuid, None)
        await self._drop_lease(uuid)  # bridged: the lease must not pull it out of the bridge

    # --- hand back (issue 9 §5) ---
    async def _parked_after_bridge(self, uuid: str, event: EslEvent) -> None:
        """A caller of ours parked again because its bridge ended (`park_after_bridge`, the
        destination hung up): not a new arrival (the call service, told by the leg's hangup,
        decides). Parked with media up, it can take `unicast`; held in park, it gets its
        lease again."""
        if event.get("Answer-State") in ("answered", "early"):
            self._fresh_park.add(uuid)
        try:
            await self._lease(uuid, "s")
        except EslError as exc:
            log.warning("freeswitch.lease_failed", channel=uuid, error=str(exc))

    async def unbridge(self, channel_id: str, leg_id: str) -> None:
        """`uuid_transfer <caller> park inline` takes the caller out of the `uuid_bridge`
        into a fresh park (where `attach_media`'s `unicast` works; waits for its
        CHANNEL_PARK, ChannelGone if the caller left), then `uuid_kill` the leg (gone
        already is fine: it was originated with `hangup_after_bridge`). The caller is held
        in park again: its lease is re-armed (fallback extension `s`)."""
        uuid = _uuid(channel_id)
        await self._repark(uuid)
        await self.hangup(leg_id)
        try:
            await self._lease(uuid, "s")
        except EslError as exc:
            log.warning("freeswitch.lease_failed", channel=uuid, error=str(exc))

    async def blind_transfer(
        self, channel_id: str, target: DialTarget, ring_timeout: float
    ) -> None:
        """Default: `uuid_transfer` into the blind context, whose extension bridges
        `${callbridge_dial}` (FreeSWITCH dials; we lose sight of the outcome). With
        `blind_method="deflect"` and a SIP URI target: a REFER (`uuid_deflect`, in the
        background because it waits up to ~10 s for the NOTIFY)."""
        uuid = _uuid(channel_id)
        if self.blind_method == "deflect" and target.sip_uri:
            uri = refer_uri(target)  # checked like a dial string (UnsafeDialString)
            await self._hand_off(uuid)
            reply = await self._raw_bgapi(f"uuid_deflect {uuid} {_word(uri)}")
            log.info("freeswitch.deflect", channel=uuid, reply=reply)
            return
        dial = dial_string(target, self.profile)  # UnsafeDialString before anything changes
        await self.set_variable(uuid, "callbridge_dial", dial)
        await self.set_variable(uuid, "callbridge_ring_timeout", str(max(1, round(ring_timeout))))
        await self._hand_off(uuid)
        await self._api(f"uuid_transfer {uuid} s XML {_word(self.blind_context)}")

    async def _hand_off(self, uuid: str) -> None:
        """The caller stops being ours: unmark it, so a resync does not adopt it again."""
        await self._api(f"uuid_setvar {uuid} {self.marker}")
        await self._drop_lease(uuid)
        self._forget(uuid)
        await self._unclaim(uuid)

    # --- trunks -----------------------------------------------------------------------------

    async def provision_trunk(self, trunk: TrunkSpec) -> None:
        if self.gateways is None:
            log.warning("freeswitch.trunk_not_provisioned", trunk=trunk.id, reason="no gateway_dir")
            return
        await self.gateways.provision([trunk])

    async def remove_trunk(self, trunk_id: str) -> None:
        """Delete the gateway file and `killgw` it (its password leaves the disk too)."""
        if self.gateways is not None:
            await self.gateways.remove(trunk_id)

    async def provisioned_trunks(self) -> set[str]:
        """Ids of the trunks we have gateway files for (`cb-trunk-<id>.xml` in gateway_dir)."""
        return self.gateways.provisioned() if self.gateways is not None else set()

    # --- helpers ----------------------------------------------------------------------------

    # --- extension state (issue 9 §3) -------------------------------------------------------

    async def extension_state(self, endpoint: str) -> ExtensionState:
        """`sofia_contact <user>` (the default domain, as `user/<user>` dials it): an
        `error/user_not_registered` reply is offline; then `show channels as json`: a
        channel whose `presence_id` is `<user>@...` (set on calls to and from a directory
        user) is busy. A failed check is UNKNOWN: the dial itself decides."""
        try:
            user = dial_string(DialTarget(endpoint=endpoint), self.profile).split("/", 1)[1]
            contact = (await self._api(f"sofia_contact {user}")).strip()
            if not contact or contact.startswith(("error/", "-ERR")):
                return ExtensionState.OFFLINE
            text = await self._api("show channels as json")
            rows = json.loads(text or "{}").get("rows") or []
        except (PbxUnavailable, PbxCommandFailed, ChannelGone, ValueError) as exc:
            log.warning("freeswitch.extension_state_failed", endpoint=endpoint, error=str(exc))
            return ExtensionState.UNKNOWN
        if any(str(r.get("presence_id", "")).startswith(f"{user}@") for r in rows):
            return ExtensionState.BUSY
        return ExtensionState.AVAILABLE

    async def _api(self, command: str) -> str:
        try:
            return await self.client.api(command)
        except EslError as exc:
            raise _translate(exc) from exc

    async def _raw_bgapi(self, command: str) -> str:
        try:
            return (await self.client.raw_command(encode_bgapi(command))).reply_text
        except EslError as exc:
            raise _translate(exc) from exc


_EXTENSION = re.compile(r"^[A-Za-z0-9+*#._-]{1,64}$")


def _translate(exc: EslError) -> Exception:
    if isinstance(exc, EslChannelGone):
        return ChannelGone(exc.reply)
    if isinstance(exc, EslConnectionError):
        return exc  # already a PbxUnavailable
    if isinstance(exc, EslCommandError):
        return PbxCommandFailed(str(exc))
    return PbxUnavailable(str(exc))


def _tone(tone: str) -> str:
    return TONES.get(tone, tone if tone.startswith("%(") else RING_TONE)


def _word(value: str) -> str:
    """One space-free argument of an API command line."""
    if not value or any(ch.isspace() for ch in value) or "'" in value:
        raise ValueError(f"not a single word: {value!r}")
    return value


# Queue and dialplan legs are `loopback/...` channels (issue 9 §1). Measured on FreeSWITCH
# 1.10.12: a loopback channel originated from ESL has L16 as its codec (`loopback_initial_codec`
# is read before the originate's variables apply), its dialplan's `bridge` to a SIP phone then
# offers L16 only, and the phone's PCMU answer ends the leg as INCOMPATIBLE_DESTINATION (88).
# These variables reach the loopback's dialplan side (mod_loopback copies the originate's
# variables there) and make sofia offer the profile's codecs too (L16, PCMU, PCMA, ...).
LOOPBACK_CODECS = {
    "media_mix_inbound_outbound_codecs": "true",
    "export_vars": "media_mix_inbound_outbound_codecs",
}


def _uuid(value: str) -> str:
    return _word(value)


def _line(value: str) -> str:
    if any(ch in value for ch in "\r\n\x00'"):
        raise ValueError(f"refusing {value!r} in an API command")
    return value


def _vars(variables: dict[str, str]) -> str:
    """`{k=v,...}` body; commas escaped, values with spaces single-quoted."""
    out = []
    for key, value in variables.items():
        _word(key)
        value = _line(value).replace(",", "\\,")
        if any(ch in value for ch in " {}"):
            value = f"'{value}'"
        out.append(f"{key}={value}")
    return ",".join(out)
