"""Asterisk through ARI: the PBX port's verbs as ARI requests, ARI events as PBX events.

Ids are derived, so that a restarted daemon finds its objects again: the caller's bridge is
`cb-<caller channel>`, its media channels `cbmedia-<caller channel>-<n>` (a fresh one for each
attach: Asterisk refuses an id whose previous channel is still being torn down), outbound
legs start with `cbleg-`, ringback playbacks carry the id the caller gives (`cbring-<transfer>`),
trunks are `cb-trunk-<trunk id>`.

What the adapter reports are facts (LegProgress for a 183 without 180, LegFailed with the Q.850
cause, the SIP code and whether the failure is our own); classifying them is `bridge.calls`'
job. Every ARI error leaves as ChannelGone, PbxUnavailable or PbxCommandFailed.

Measured on 22.10.1 and relied on here (see dialplan/README.md): legs are originated in one
request into `[callbridge-leg]`, which enters Stasis at the answer and waits while callbridge
is away, so they survive an answer during an ARI outage; their hangup handler
records how they ended, read back after a reconnect; a new caller's take guard
(TIMEOUT(absolute) before Stasis) is cleared on StasisStart, and a 409 there means the caller
already went to the fallback.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from bridge import faults
from bridge.errors import PbxCommandFailed, PbxUnavailable
from bridge.log import get_logger
from bridge.pbx.asterisk.ari import (
    AriClient,
    AriConflict,
    AriError,
    AriNotFound,
    AriUnavailable,
)
from bridge.pbx.asterisk.dialing import (
    DIRECT_ENDPOINT,
    OUTBOUND_ONLY_CONTEXT,
    blind_variables,
    dial_string,
    dialplan_target,
)
from bridge.pbx.ports import (
    DTMF_DIGIT_MS,
    DTMF_GAP_MS,
    DTMF_PAUSE_MS,
    CallArrived,
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
    PlaybackFinished,
    TrunkSpec,
    check_dtmf,
)

log = get_logger(__name__)

LEG_PREFIX = "cbleg-"
MEDIA_PREFIX = "cbmedia-"
LEG_END_CONTEXT = "callbridge-leg-end"  # the legs' hangup handler (extensions_callbridge.conf)
LEG_RECORD_PREFIX = "CALLBRIDGE_LEG_"  # global variable it sets: cause,sip,state,epoch
LEG_CONTEXT = "callbridge-leg"  # where an answered leg enters Stasis (see originate)
# Q.850 causes that say the failure is in our own PBX (no circuit/resource, no such endpoint,
# channel unavailable) when no SIP response came back: not the destination's doing.
LOCAL_CAUSES = frozenset({47, 58, 66, 81})


def bridge_id(channel_id: str) -> str:
    return f"cb-{channel_id}"


def media_id(channel_id: str) -> str:
    return f"{MEDIA_PREFIX}{channel_id}-{secrets.token_hex(4)}"


def media_owner(media_channel_id: str) -> str:
    """The caller channel a media channel serves."""
    return media_channel_id[len(MEDIA_PREFIX) :].rsplit("-", 1)[0]


def trunk_endpoint(trunk_id: str) -> str:
    return f"cb-trunk-{trunk_id}"


class AsteriskAdapter:
    name = "asterisk"

    def __init__(
        self,
        client: AriClient,
        *,
        inbound_context: str = "callbridge-inbound",
        blind_context: str = "callbridge-blind-transfer",
        on_connected: Callable[[], None] | None = None,
        provision_retry: float = 0.5,
    ) -> None:
        self.ari = client
        self.inbound_context = inbound_context
        self.blind_context = blind_context
        # Called (synchronously, it must not block) after each (re)connect once the calls are
        # reconciled: the trunk reconciler hooks here.
        self._on_connected = on_connected
        self._provision_retry = provision_retry
        self._provisioning: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._sink: EventSink | None = None
        self._answered_legs: set[str] = set()
        self._pending_legs: set[str] = set()  # created and not yet destroyed
        self._media_ready: dict[str, asyncio.Future[None]] = {}
        self._hangup_causes: dict[str, tuple[int | None, int | None]] = {}
        self._media: dict[str, str] = {}  # caller channel -> its media channel
        self._arriving: dict[str, list[dict[str, Any]]] = {}  # speed: callers being taken
        self._task: Any = None

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, sink: EventSink) -> None:
        self._sink = sink
        self._task = asyncio.get_running_loop().create_task(
            self.ari.run_events(self._on_event, self._on_connect, self._on_disconnect)
        )

    async def stop(self) -> None:
        await self.ari.close()
        for task in (self._task, self._provisioning, *self._background):
            if task is not None:
                task.cancel()

    @property
    def connected(self) -> bool:
        return self.ari.connected.is_set()

    async def _emit(self, event: Any) -> None:
        if self._sink is not None:
            await self._sink(event)

    async def _on_connect(self) -> None:
        """Resync after a (re)connect. Any failed request raises (AriClient then drops the
        connection and connects again, so the daemon is never left half-connected); what the
        PBX needs from us but calls do not (endpoints) is provisioned in the background."""
        if self._provisioning is None or self._provisioning.done():
            self._provisioning = asyncio.get_running_loop().create_task(
                self._retry("cb-direct", self._provision_direct)
            )
        await self._reconcile_calls()
        if self._on_connected is not None:
            self._on_connected()

    async def _retry(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` until it succeeds, backing off, for as long as the adapter runs."""
        delay = self._provision_retry
        while True:
            try:
                await step()
                return
            except (PbxUnavailable, PbxCommandFailed, ChannelGone) as exc:
                log.warning("asterisk.provision_failed", what=what, error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _reconcile_calls(self) -> None:
        channels = await self._call("GET", "/channels")
        live = {ch["id"] for ch in channels}
        callers: list[CallArrived] = []
        legs: list[tuple[str, bool]] = []
        ringing: list[tuple[str, str | None]] = []  # legs not answered yet, and their state
        facts: list[LegFacts] = []
        for ch in channels:
            cid = ch["id"]
            dialplan = ch.get("dialplan") or {}
            if cid.startswith(MEDIA_PREFIX):
                if media_owner(cid) in live:
                    self._media[media_owner(cid)] = cid  # stale after a restart: detach finds it
                else:  # its caller left while we were away: nothing else would free it
                    await self._drop_channel(cid)
                continue
            if cid.startswith(LEG_PREFIX):
                # Answered = in Stasis: a leg answered while we were away waits in
                # [callbridge-leg] and enters Stasis again shortly (its StasisStart answers).
                up = ch.get("state") == "Up" and dialplan.get("app_name") == "Stasis"
                if up:
                    self._answered_legs.add(cid)
                else:  # in case our application's subscription did not outlive us
                    await self._subscribe_again(cid)
                    ringing.append((cid, ch.get("state")))
                self._pending_legs.add(cid)
                legs.append((cid, up))
                facts.append(await self._leg_facts(cid, up))
            elif dialplan.get("app_name") == "Stasis" and str(
                dialplan.get("app_data", "")
            ).startswith(self.ari.app):
                callers.append(_arrival(ch))
        for bridge in await self._call("GET", "/bridges"):
            bid = str(bridge.get("id", ""))
            if bid.startswith("cb-") and bid[3:] not in live:  # its caller left meanwhile
                try:
                    await self._call("DELETE", f"/bridges/{bid}")
                except ChannelGone:
                    pass
        # Legs that ended while we were away: their hangup handler left the facts. Reported
        # before ConnectionRestored, so the calls see the real outcome before they resume.
        for leg in sorted(self._pending_legs - live):
            await self._report_leg_record(leg)
        await self._emit(
            ConnectionRestored("", callers=tuple(callers), legs=tuple(legs), leg_facts=tuple(facts))
        )
        # A 180 or 183 that came while we were away (the calls have resumed their transfers).
        for cid, state in ringing:
            await self._report_alive(cid, state)

    async def _leg_facts(self, leg: str, up: bool) -> LegFacts:
        """The leg's owner (its CALLBRIDGE_* variables)."""

        async def var(name: str) -> str | None:
            try:
                got = await self._call("GET", f"/channels/{leg}/variable", variable=name)
            except (PbxCommandFailed, ChannelGone):
                return None  # unset answers 404
            return str((got or {}).get("value") or "") or None

        return LegFacts(
            leg,
            call_id=await var("CALLBRIDGE_CALL_ID"),
            transfer_id=await var("CALLBRIDGE_TRANSFER_ID"),
            dialled=True,  # one request creates and dials a leg (see originate)
        )

    async def _subscribe_again(self, leg: str) -> None:
        try:
            await self._raw(
                "POST", f"/applications/{self.ari.app}/subscription", eventSource=f"channel:{leg}"
            )
        except (ChannelGone, AriConflict, PbxCommandFailed) as exc:
            log.info("asterisk.leg_subscription_failed", leg=leg, error=str(exc))

    async def _report_leg_record(self, leg: str) -> None:
        var = f"{LEG_RECORD_PREFIX}{leg}"
        value = str(
            (await self._call("GET", "/asterisk/variable", variable=var) or {}).get("value") or ""
        )
        self._pending_legs.discard(leg)
        if not value:
            log.warning("asterisk.leg_lost", leg=leg)  # e.g. Asterisk restarted meanwhile
            return
        cause, sip_code, state = _leg_record(value)
        log.info("asterisk.leg_ended_while_away", leg=leg, cause=cause, sip_code=sip_code)
        if state == "Up" or leg in self._answered_legs:
            self._answered_legs.discard(leg)
            await self._emit(ChannelHungUp(leg, cause, "hung up while callbridge was disconnected"))
        else:
            local = sip_code is None and cause in LOCAL_CAUSES
            await self._emit(LegFailed(leg, cause, None, sip_code, local=local))
        self._forget_leg_record(leg)  # reported: unset it (a failure leaves it behind, no more)

    def _forget_leg_record(self, leg: str) -> None:
        """The leg's end was seen live: unset what its hangup handler recorded (in the
        background; a failure leaves one global variable behind, nothing else)."""

        async def unset() -> None:
            try:
                await self._call("POST", "/asterisk/variable", variable=f"{LEG_RECORD_PREFIX}{leg}")
            except (PbxUnavailable, PbxCommandFailed, ChannelGone):
                pass

        task = asyncio.get_running_loop().create_task(unset())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_disconnect(self) -> None:
        await self._emit(ConnectionLost(""))

    # --- events -----------------------------------------------------------------------------

    # --- speed (issue 7 §8): an arrival never waits behind another ---
    async def _on_event(self, event: dict[str, Any]) -> None:
        """ARI delivers events one at a time, and a caller's arrival (the take, then the
        service's records and admission) takes round trips to Asterisk and the database: run
        inline, the next caller's take waited behind all of it, past the dialplan's 1 s take
        guard at 40 calls. So each caller's arrival runs in its own task; the events of that
        channel that come meanwhile wait for it and follow in order."""
        channel = event.get("channel") or {}
        cid = channel.get("id", "")
        waiting = self._arriving.get(cid)
        if waiting is not None:
            waiting.append(event)
            return
        if (
            event["type"] == "StasisStart"
            and cid
            and not cid.startswith((MEDIA_PREFIX, LEG_PREFIX))
        ):
            self._arriving[cid] = []
            task = asyncio.get_running_loop().create_task(self._arrive(cid, event))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        await self._handle_event(event)

    async def _arrive(self, cid: str, event: dict[str, Any]) -> None:
        try:
            queue = [event]
            while queue:
                try:
                    await self._handle_event(queue.pop(0))
                except Exception:
                    log.exception("asterisk.event_failed", channel=cid)
                queue += self._arriving.get(cid, [])
                self._arriving[cid] = []
        finally:
            self._arriving.pop(cid, None)

    # --- end speed ---

    async def _handle_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        channel = event.get("channel") or {}
        cid = channel.get("id", "")
        log.debug("ari.event", type=kind, channel=cid)
        if kind == "StasisStart":
            if cid.startswith(MEDIA_PREFIX):
                ready = self._media_ready.get(cid)
                if ready is not None and not ready.done():
                    ready.set_result(None)
                return
            if cid.startswith(LEG_PREFIX):
                # A leg enters Stasis when it is answered ([callbridge-leg]): only then can it
                # join the caller's bridge, so this, not its state Up, is its answer.
                if cid not in self._answered_legs:
                    self._answered_legs.add(cid)
                    await self._emit(LegAnswered(cid))
                return
            started = time.monotonic()
            taken = await self._take(cid)
            # speed (issue 7 §8): how long the caller waited in Stasis before we saw it, and
            # the take's round trip (together they must stay under the take guard).
            log.info(
                "asterisk.arrival",
                channel=cid,
                behind_ms=_age_ms(event.get("timestamp")),
                take_ms=round((time.monotonic() - started) * 1000, 1),
                taken=taken,
            )
            if taken is None:
                return  # the caller left
            await self._emit(_arrival(channel) if taken else CallMissed.of(_arrival(channel)))
        elif kind == "ChannelHangupRequest":
            self._hangup_causes[cid] = (event.get("cause"), _sip_code(event))
        elif kind == "StasisEnd":
            # Without subscribeAll the app is unsubscribed when a channel leaves Stasis, so a
            # caller's ChannelDestroyed may never come: a StasisEnd after a hangup request is
            # the hangup. (A channel we sent to the dialplan also ends its Stasis here; its
            # call has already moved on, so the event is ignored there.)
            # A leg stays in Stasis until it is destroyed: its ChannelDestroyed tells the end.
            if cid.startswith((MEDIA_PREFIX, LEG_PREFIX)) or cid not in self._hangup_causes:
                return
            cause, _ = self._hangup_causes.pop(cid)
            self._answered_legs.discard(cid)
            await self._emit(ChannelHungUp(cid, cause, None))
        elif kind == "ChannelStateChange" and cid.startswith(LEG_PREFIX):
            state = channel.get("state")
            if state == "Ringing":
                await self._emit(LegRinging(cid))
        elif kind == "Dial":
            # Measured on 22.10.1: a 180 gives dialstatus RINGING (and a ChannelStateChange to
            # Ringing), a 183 with SDP only dialstatus PROGRESS (the channel stays Down).
            peer = (event.get("peer") or {}).get("id", "")
            status = event.get("dialstatus")
            if peer.startswith(LEG_PREFIX) and status == "RINGING":
                await self._emit(LegRinging(peer))
            elif peer.startswith(LEG_PREFIX) and status == "PROGRESS":
                await self._emit(LegProgress(peer))
        elif kind == "ChannelDestroyed":
            requested = self._hangup_causes.pop(cid, None)
            if cid.startswith(MEDIA_PREFIX):
                if self._media.get(media_owner(cid)) == cid:
                    del self._media[media_owner(cid)]
                return
            cause = event.get("cause")
            cause_text = event.get("cause_txt")
            sip_code = _sip_code(event)
            if cid.startswith(LEG_PREFIX):
                # Measured on 22.10.1: a final response from the far end (486, 603, 404, 480)
                # comes first as a ChannelHangupRequest carrying its tech_cause; our own hangup
                # (a DELETE) carries none, and the originate's ring timeout (cause 19) sends no
                # hangup request at all; ChannelDestroyed then shows a tech_cause Asterisk
                # derives from the cause (480 for 19) that no SIP peer sent (the destination
                # answered our CANCEL with 487).
                sip_code = requested[1] if requested is not None else None
            if cid.startswith(LEG_PREFIX):
                self._pending_legs.discard(cid)
                self._forget_leg_record(cid)
            if cid.startswith(LEG_PREFIX) and cid not in self._answered_legs:
                local = sip_code is None and cause in LOCAL_CAUSES
                await self._emit(LegFailed(cid, cause, cause_text, sip_code, local=local))
            else:
                self._answered_legs.discard(cid)
                await self._emit(ChannelHungUp(cid, cause, cause_text))
        elif kind == "PlaybackFinished":
            playback = event.get("playback") or {}
            target = str(playback.get("target_uri", ""))
            if target.startswith("channel:"):
                await self._emit(PlaybackFinished(target[8:], playback.get("id", "")))
        elif kind == "ChannelDtmfReceived":
            await self._emit(DtmfReceived(cid, str(event.get("digit", ""))))

    async def _take(self, channel_id: str) -> bool | None:
        """Disarm the dialplan's take guard (TIMEOUT(absolute) set before Stasis, see
        extensions_callbridge.conf) and check the caller is still ours: a caller that waited
        longer than the guard while we were stopped or overloaded is in the fallback by now,
        and must be left there. Setting a variable through ARI needs the channel in Stasis
        (409 otherwise), so one request does both, without a race. True: ours; False: the
        guard sent it to the fallback; None: the caller left."""
        try:
            await self._raw(
                "POST",
                f"/channels/{channel_id}/variable",
                variable="TIMEOUT(absolute)",
                value="0",
            )
        except AriConflict:
            log.warning("asterisk.caller_not_taken_in_time", channel=channel_id)
            return False
        except ChannelGone:
            log.info("asterisk.caller_left_before_taken", channel=channel_id)
            return None
        except (PbxUnavailable, PbxCommandFailed) as exc:
            # Take it anyway: if the guard fires meanwhile, the call's next verb fails.
            log.warning("asterisk.take_guard_not_cleared", channel=channel_id, error=str(exc))
        return True

    # --- verbs ------------------------------------------------------------------------------

    async def answer(self, channel_id: str) -> None:
        await self._call("POST", f"/channels/{channel_id}/answer")

    async def hangup(self, channel_id: str) -> None:
        try:
            await self._call("DELETE", f"/channels/{channel_id}")
        except ChannelGone:
            pass

    async def release(self, channel_id: str) -> None:
        await self.detach_media(channel_id)
        try:
            await self._call("DELETE", f"/bridges/{bridge_id(channel_id)}")
        except ChannelGone:
            pass

    async def continue_in_dialplan(self, channel_id: str, context: str, extension: str) -> None:
        await self._call(
            "POST",
            f"/channels/{channel_id}/continue",
            context=context,
            extension=extension,
            priority=1,
        )

    async def set_variable(self, channel_id: str, name: str, value: str) -> None:
        await self._call("POST", f"/channels/{channel_id}/variable", variable=name, value=value)

    async def send_dtmf(self, channel_id: str, digits: str) -> None:
        """ARI `POST /channels/{id}/dtmf` (RFC 2833 on PJSIP): the leading pauses as
        `before`, the digits with Asterisk's own `w`/`W` pauses between them (its DTMF
        stream waits 0.5 s / 1 s for each), `between`/`duration` as `dtmf_seconds` counts."""
        check_dtmf(digits)
        rest = digits.lstrip("wW")
        before = sum(DTMF_PAUSE_MS[c] for c in digits[: len(digits) - len(rest)])
        await self._call(
            "POST",
            f"/channels/{channel_id}/dtmf",
            dtmf=rest,
            before=str(before),
            between=str(DTMF_GAP_MS),
            duration=str(DTMF_DIGIT_MS),
        )

    async def attach_media(self, channel_id: str, local: MediaAddress, codec: str) -> MediaAddress:
        bid = await self._ensure_bridge(channel_id)
        await self._add_to_bridge(bid, channel_id)
        await self.detach_media(channel_id)  # a stale one from before a daemon restart
        mid = media_id(channel_id)
        self._media[channel_id] = mid
        # The media channel can join the bridge only once it is in Stasis: wait for its
        # StasisStart (it may arrive before the POST returns, so listen first).
        ready = self._media_ready[mid] = asyncio.get_running_loop().create_future()
        try:
            media = await self._call(
                "POST",
                "/channels/externalMedia",
                app=self.ari.app,
                channelId=mid,
                external_host=f"{local.host}:{local.port}",
                format=codec,
                encapsulation="rtp",
                transport="udp",
                direction="both",
            )
            async with asyncio.timeout(5):
                await ready
        except TimeoutError as exc:
            await self.detach_media(channel_id)
            raise PbxCommandFailed("externalMedia channel never entered Stasis") from exc
        finally:
            self._media_ready.pop(mid, None)
        variables = media.get("channelvars") or {}
        try:
            remote = MediaAddress(
                variables["UNICASTRTP_LOCAL_ADDRESS"], int(variables["UNICASTRTP_LOCAL_PORT"])
            )
        except (KeyError, ValueError) as exc:
            await self.detach_media(channel_id)
            raise PbxUnavailable(f"externalMedia gave no RTP address: {variables}") from exc
        await self._add_to_bridge(bid, mid)
        return remote

    async def detach_media(self, channel_id: str) -> None:
        mid = self._media.pop(channel_id, None)
        if mid is None:
            return
        try:
            await self._call("DELETE", f"/channels/{mid}")
        except ChannelGone:
            pass

    async def play_tone(self, channel_id: str, tone: str, playback_id: str) -> None:
        """The id is the caller's (derived from the transfer), so that a restarted daemon can
        stop a tone an earlier process started: while a `tone:ring` playback runs, Asterisk
        times out `answer` and `addChannel` on that channel."""
        try:
            await self._raw(
                "POST", f"/channels/{channel_id}/play/{playback_id}", media=f"tone:{tone}"
            )
        except AriConflict as exc:
            if "already exists" not in exc.message.lower():
                raise PbxCommandFailed(str(exc)) from exc

    async def stop_playback(self, playback_id: str) -> None:
        try:
            await self._call("DELETE", f"/playbacks/{playback_id}")
        except ChannelGone:
            pass

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
        """One ARI request creates and dials the leg (`POST /channels`, the INVITE leaves
        with it: issue 8 section 4), so a leg that exists was dialled and a restarted daemon
        never has to tell an undialled one apart. It is originated into `[callbridge-leg]`,
        not into our application: at the answer that context enters Stasis and, if
        callbridge is away, waits answered and tries again (an originate with `app=` enters
        Stasis at the answer too but, with the application away, Asterisk hangs the
        destination up 2 ms after its 200 OK). Our application is subscribed to the leg right
        after, for its ringing, progress and hangup events (`_watch_leg`). Its hangup
        handler records how it ended, for a leg that ends while we are away."""
        assert leg_id.startswith(LEG_PREFIX), "leg ids must carry the leg prefix"
        # Inheritable (`__`): a queue or dialplan target's own legs (Local/...;2 and what it
        # dials) carry them too, for the dialplan and the agent's phone to use.
        channel_vars = {
            f"__{k}" if k.startswith("CALLBRIDGE_") else k: v for k, v in (variables or {}).items()
        }
        if not (target.queue or target.context):  # a SIP channel: headers on its INVITE
            for name, value in (headers or {}).items():
                channel_vars[f"PJSIP_HEADER(add,{_header_name(name)})"] = value
        channel_vars["CHANNEL(hangup_handler_push)"] = f"{LEG_END_CONTEXT},s,1"
        channel_vars["CALLBRIDGE_APP"] = self.ari.app  # [callbridge-leg] enters it
        if caller_number:
            # PJSIP builds an outbound From from the connected line (measured: CALLERID alone
            # gives "Anonymous" <sip:...@anonymous.invalid>); originate's callerId set both.
            channel_vars["CALLERID(num)"] = caller_number
            channel_vars["CONNECTEDLINE(num)"] = caller_number
            channel_vars["CONNECTEDLINE(pres)"] = "allowed"
        endpoint = self.dial_string(target)  # UnsafeDialString before anything is sent
        self._pending_legs.add(leg_id)
        try:
            await self._call(
                "POST",
                "/channels",
                body={"variables": channel_vars},
                endpoint=endpoint,
                context=LEG_CONTEXT,
                extension="s",
                priority=1,
                timeout=max(1, round(ring_timeout)),
                channelId=leg_id,
            )
        except (PbxCommandFailed, PbxUnavailable, ChannelGone) as exc:
            log.warning("asterisk.originate_failed", leg=leg_id, error=str(exc))
            self._pending_legs.discard(leg_id)
            raise
        await faults.point("before_subscribe")
        await self._watch_leg(leg_id)

    async def _watch_leg(self, leg_id: str) -> None:
        """Subscribe our application to a leg originated outside it, then read its state:
        what happened before the subscription is not lost. A 180 left the state Ringing, a
        183 with SDP its media negotiated (`_early_media`), an answer brings the leg into
        Stasis (its StasisStart reaches us in any case), and a leg already gone is reported
        from what its hangup handler recorded. Never raises: the leg is dialled; a watch
        that fails leaves the ring guard."""
        try:
            await self._raw(
                "POST",
                f"/applications/{self.ari.app}/subscription",
                eventSource=f"channel:{leg_id}",
            )
            channel = await self._call("GET", f"/channels/{leg_id}")
        except (ChannelGone, AriConflict):  # 422 "Event source does not exist": it ended
            if leg_id in self._pending_legs:
                try:
                    await self._report_leg_record(leg_id)
                except (PbxCommandFailed, PbxUnavailable, ChannelGone) as exc:
                    log.warning("asterisk.leg_watch_failed", leg=leg_id, error=str(exc))
            return
        except (PbxCommandFailed, PbxUnavailable) as exc:
            log.warning("asterisk.leg_watch_failed", leg=leg_id, error=str(exc))
            return
        await self._report_alive(leg_id, (channel or {}).get("state"))

    async def _report_alive(self, leg_id: str, state: str | None) -> None:
        """What a subscription made late may have missed of a leg not answered yet: a 180
        (its state Ringing) or a 183 with SDP (`_early_media`). A repeat of an event already
        seen is harmless (the transfer counts the first)."""
        if state == "Ringing":
            await self._emit(LegRinging(leg_id))
        elif state == "Down" and await self._early_media(leg_id):
            await self._emit(LegProgress(leg_id))

    async def _early_media(self, leg_id: str) -> bool:
        """Whether a leg not answered nor ringing has its media negotiated: a 183 with SDP
        came. That 183 changes no channel state (its only trace is the `Dial` event's
        PROGRESS, lost when it comes before our subscription), but it gives the channel the
        destination's media address: measured on 22.10.1, `CHANNEL(rtp,dest)` answers 500
        until the destination's SDP arrives, then that address. A PJSIP leg only (a Local
        leg, queue or dialplan target, answers 500: its early 183 is still missed)."""
        try:
            got = await self._call(
                "GET", f"/channels/{leg_id}/variable", variable="CHANNEL(rtp,dest)"
            )
        except (PbxCommandFailed, ChannelGone, PbxUnavailable):
            return False
        return bool((got or {}).get("value"))

    async def connect(self, channel_id: str, leg_id: str) -> None:
        bid = await self._ensure_bridge(channel_id)
        await self._add_to_bridge(bid, channel_id)
        # The media channel leaves first: the bridge goes from the caller alone to caller +
        # leg, never through a three-party softmix that then shrinks (seen to leave a Local
        # channel leg deaf to the caller).
        await self.detach_media(channel_id)
        await self._add_to_bridge(bid, leg_id)

    async def blind_transfer(
        self, channel_id: str, target: DialTarget, ring_timeout: float
    ) -> None:
        """The destination's parts in separate variables (never a dial string that `Dial()`
        would re-parse); `[callbridge-blind-transfer]` filters them and dials."""
        if target.queue or target.context:  # inside the PBX: its dialplan takes the caller
            context, exten = dialplan_target(target)  # UnsafeDialString first
            await self.detach_media(channel_id)
            await self.continue_in_dialplan(channel_id, context, exten)
            return
        variables = blind_variables(target)  # UnsafeDialString before anything is changed
        await self.detach_media(channel_id)
        for name, value in variables.items():
            await self.set_variable(channel_id, name, value)
        await self.set_variable(
            channel_id, "CALLBRIDGE_RING_TIMEOUT", str(max(1, round(ring_timeout)))
        )
        await self.continue_in_dialplan(channel_id, self.blind_context, "s")

    # --- hand back (issue 9 §5) ---
    async def unbridge(self, channel_id: str, leg_id: str) -> None:
        """The leg leaves the caller's bridge, then is hung up; the caller stays alone in its
        bridge (still in Stasis) until `attach_media` adds a media channel to it. The leg
        being gone already (the destination hung up) is fine; the caller gone: ChannelGone.
        The leg is in our application, so its ChannelDtmfReceived (the hand-back code)
        reaches `DtmfReceived` like the caller's."""
        try:
            await self._raw(
                "POST", f"/bridges/{bridge_id(channel_id)}/removeChannel", channel=leg_id
            )
        except (ChannelGone, AriConflict, PbxCommandFailed) as exc:
            # The leg left already (the destination hung up: 400 "Channel not found"), or
            # it is not in the bridge: its hangup below takes it out in any case.
            log.info("asterisk.unbridge_leg_not_in_bridge", leg=leg_id, error=str(exc))
        await self.hangup(leg_id)
        await self._call("GET", f"/channels/{channel_id}")  # ChannelGone if the caller left

    def dial_string(self, target: DialTarget) -> str:
        """The final dial string, checked whole (UnsafeDialString): see `dialing`."""
        return dial_string(target)

    async def record_outcome(self, channel_id: str, fields: dict[str, str]) -> None:
        """`CDR(userfield)` = `callbridge:<outcome>:<destination>` and `CDR(callbridge_<key>)`
        for each field (custom CDR variables, in every CDR backend that logs variables)."""
        outcome, destination = fields.get("outcome", ""), fields.get("destination", "")
        await self.set_variable(channel_id, "CDR(userfield)", f"callbridge:{outcome}:{destination}")
        for key, value in fields.items():
            await self.set_variable(channel_id, f"CDR(callbridge_{key})", value)

    # --- extension state (issue 9 §3) -------------------------------------------------------

    async def extension_state(self, endpoint: str) -> ExtensionState:
        """`GET /endpoints/PJSIP/<endpoint>`: `state` offline (no contact, or every contact
        unreachable) or online, and `channel_ids` (any channel of it, ringing or up, means
        busy). Measured on Asterisk 22: an AOR with a static contact is online, one with no
        registered contact offline; `/deviceStates/PJSIP%2F<endpoint>` agrees (NOT_INUSE /
        UNAVAILABLE) but needs an escaped slash, so the endpoint is asked."""
        try:
            # The dial string's own check: `PJSIP/<endpoint>` is also its ARI resource path.
            path = f"/endpoints/{dial_string(DialTarget(endpoint=endpoint))}"
            found = await self._call("GET", path)
        except ChannelGone:  # 404: no such endpoint; dialling it reports the real fault
            return ExtensionState.UNKNOWN
        except (PbxUnavailable, PbxCommandFailed) as exc:
            log.warning("asterisk.extension_state_failed", endpoint=endpoint, error=str(exc))
            return ExtensionState.UNKNOWN
        if not isinstance(found, dict):
            return ExtensionState.UNKNOWN
        if found.get("channel_ids"):
            return ExtensionState.BUSY
        state = found.get("state")
        if state == "offline":
            return ExtensionState.OFFLINE
        return ExtensionState.AVAILABLE if state == "online" else ExtensionState.UNKNOWN

    # --- trunks -----------------------------------------------------------------------------

    async def provision_trunk(self, trunk: TrunkSpec) -> None:
        name = trunk_endpoint(trunk.id)
        contact = f"sip:{trunk.host}:{trunk.port}"
        if trunk.transport != "udp":
            contact += f";transport={trunk.transport}"
        endpoint: dict[str, str] = {
            "aors": name,
            "context": self.inbound_context,
            "disallow": "all",
            "allow": "ulaw,alaw",
            "direct_media": "no",
            "rtp_symmetric": "yes",
            "rewrite_contact": "yes",
        }
        if trunk.username and trunk.password:
            await self._dynamic(
                "auth",
                f"{name}-auth",
                {"auth_type": "userpass", "username": trunk.username, "password": trunk.password},
            )
            endpoint["outbound_auth"] = f"{name}-auth"
            endpoint["from_user"] = trunk.username
        await self._dynamic("aor", name, {"contact": contact, "qualify_frequency": "0"})
        await self._dynamic("endpoint", name, endpoint)
        if trunk.register and trunk.username and trunk.password:
            try:
                await self._dynamic(
                    "registration",
                    name,
                    {
                        "server_uri": contact,
                        "client_uri": f"sip:{trunk.username}@{trunk.host}:{trunk.port}",
                        "outbound_auth": f"{name}-auth",
                        "retry_interval": "60",
                    },
                )
            except PbxUnavailable:
                raise
            except Exception as exc:
                log.warning("asterisk.registration_not_provisioned", trunk=trunk.id, error=str(exc))
        log.info("asterisk.trunk_provisioned", trunk=trunk.id, endpoint=name, contact=contact)

    async def remove_trunk(self, trunk_id: str) -> None:
        name = trunk_endpoint(trunk_id)
        for module, kind, obj in (
            ("res_pjsip", "registration", name),
            ("res_pjsip", "endpoint", name),
            ("res_pjsip", "aor", name),
            ("res_pjsip", "auth", f"{name}-auth"),
        ):
            try:
                await self._call("DELETE", f"/asterisk/config/dynamic/{module}/{kind}/{obj}")
            except ChannelGone:
                pass  # never provisioned (no auth, no registration)
        log.info("asterisk.trunk_removed", trunk=trunk_id)

    async def provisioned_trunks(self) -> set[str]:
        """Trunk ids of the `cb-trunk-*` endpoints Asterisk has now (memory objects included)."""
        prefix = trunk_endpoint("")
        endpoints = await self._call("GET", "/endpoints/PJSIP")
        return {
            str(e["resource"])[len(prefix) :]
            for e in endpoints
            if str(e.get("resource", "")).startswith(prefix)
        }

    async def _provision_direct(self) -> None:
        await self._dynamic(
            "endpoint",
            DIRECT_ENDPOINT,
            {
                "context": OUTBOUND_ONLY_CONTEXT,
                "identify_by": "ip",
                "disallow": "all",
                "allow": "ulaw,alaw",
                "direct_media": "no",
                "rtp_symmetric": "yes",
            },
        )

    async def _dynamic(
        self, kind: str, obj: str, fields: dict[str, str], module: str = "res_pjsip"
    ) -> None:
        body = {"fields": [{"attribute": k, "value": v} for k, v in fields.items()]}
        await self._call("PUT", f"/asterisk/config/dynamic/{module}/{kind}/{obj}", body)

    # --- warm transfer (issue 9 §2) ----------------------------------------------------------

    async def start_hold(self, channel_id: str, moh_class: str) -> None:
        """The caller alone in its bridge (our media channel leaves), and the bridge's music
        on hold (`POST /bridges/{id}/moh`: an announcer channel plays the class to it). The
        class must exist in musiconhold.conf (an unknown one is refused: 404 or 422)."""
        bid = await self._ensure_bridge(channel_id)
        await self._add_to_bridge(bid, channel_id)
        await self.detach_media(channel_id)
        try:
            await self._raw("POST", f"/bridges/{bid}/moh", mohClass=moh_class)
        except ChannelGone as exc:  # the bridge exists: a 404 names the class
            raise PbxCommandFailed(f"music on hold class {moh_class!r}: {exc}") from exc
        except AriConflict as exc:
            raise PbxCommandFailed(str(exc)) from exc

    async def stop_hold(self, channel_id: str) -> None:
        try:
            await self._raw("DELETE", f"/bridges/{bridge_id(channel_id)}/moh")
        except (ChannelGone, AriConflict):
            pass  # no bridge, or no music playing

    async def end_brief(self, leg_id: str) -> None:
        """The leg's media channel goes, then the leg's own bridge (`attach_media` made it):
        the leg stays in our application, in no bridge, ready to join the caller's."""
        await self.detach_media(leg_id)
        try:
            await self._call("DELETE", f"/bridges/{bridge_id(leg_id)}")
        except ChannelGone:
            pass

    # --- helpers ----------------------------------------------------------------------------

    async def _drop_channel(self, channel_id: str) -> None:
        try:
            await self._call("DELETE", f"/channels/{channel_id}")
        except ChannelGone:
            pass
        log.info("asterisk.orphan_channel_dropped", channel=channel_id)

    async def _ensure_bridge(self, channel_id: str) -> str:
        """The caller's mixing bridge, created on first use (and found again after a restart).
        `dtmf_events` (hand back, issue 9 §5): without it Asterisk bridges two RTP channels
        natively and RFC 4733 digits pass packet to packet, never raising
        ChannelDtmfReceived, so the destination's hand-back code would go unseen."""
        bid = bridge_id(channel_id)
        try:
            await self._raw("POST", f"/bridges/{bid}", type="mixing,dtmf_events", name=bid)
        except AriConflict as exc:
            if "already exists" not in exc.message:
                raise PbxCommandFailed(str(exc)) from exc
        return bid

    async def _add_to_bridge(self, bid: str, channel_id: str) -> None:
        """Add a channel to our bridge. 422 "not in Stasis" means the channel left our
        application (hung up, or sent to the dialplan): it is gone for us."""
        try:
            await self._raw("POST", f"/bridges/{bid}/addChannel", channel=channel_id)
        except AriConflict as exc:
            text = exc.message.lower()
            if "already" in text:
                return
            if "not in stasis" in text:
                raise ChannelGone(exc.message) from exc
            raise PbxCommandFailed(str(exc)) from exc

    async def _raw(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        """An ARI request with every error typed for the port, except conflicts (409/422),
        which only the callers that expect one see (as `AriConflict`)."""
        try:
            return await self.ari.request(method, path, params=params, body=body)
        except AriNotFound as exc:
            raise ChannelGone(exc.message) from exc
        except AriUnavailable as exc:
            raise PbxUnavailable(str(exc)) from exc
        except AriConflict:
            raise
        except AriError as exc:
            raise PbxCommandFailed(str(exc)) from exc

    async def _call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        """An ARI request whose errors are only the port's: ChannelGone (404),
        PbxUnavailable (unreachable, timed out), PbxCommandFailed (anything else)."""
        try:
            return await self._raw(method, path, body, **params)
        except AriConflict as exc:
            raise PbxCommandFailed(str(exc)) from exc


def _arrival(channel: dict[str, Any]) -> CallArrived:
    caller = channel.get("caller") or {}
    dialplan = channel.get("dialplan") or {}
    return CallArrived(
        channel_id=channel.get("id", ""),
        called_number=str(dialplan.get("exten", "")),
        caller_number=caller.get("number") or None,
        caller_name=caller.get("name") or None,
        variables={k: str(v) for k, v in (channel.get("channelvars") or {}).items()},
    )


def _sip_code(event: dict[str, Any]) -> int | None:
    """The SIP status behind a hangup, when Asterisk reports it (`tech_cause`)."""
    value = event.get("tech_cause")
    try:
        return int(value) if value else None
    except (TypeError, ValueError):
        return None


def _leg_record(value: str) -> tuple[int | None, int | None, str]:
    """`cause,sip status,state,epoch` as the leg's hangup handler writes it. The SIP status is
    that of the last response: a provisional one (a 180 before our timeout) is no failure code."""
    parts = [*value.split(","), "", "", "", ""][:4]

    def number(text: str) -> int | None:
        try:
            return int(text)
        except ValueError:
            return None

    sip = number(parts[1])
    return number(parts[0]), sip if sip is not None and sip >= 300 else None, parts[2]


def _header_name(name: str) -> str:
    if not re.fullmatch(r"X-[A-Za-z0-9-]{1,60}", name):
        raise PbxCommandFailed(f"refusing SIP header name {name!r}")
    return name


def _age_ms(timestamp: Any) -> float | None:
    """Milliseconds since an ARI event's `timestamp` ("2026-11-30T04:47:50.123+0000")."""
    try:
        then = datetime.strptime(str(timestamp), "%Y-%m-%dT%H:%M:%S.%f%z")
    except ValueError:
        return None
    return round(time.time() * 1000 - then.timestamp() * 1000, 1)
