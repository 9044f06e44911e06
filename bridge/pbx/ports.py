"""The one interface every PBX adapter implements, and the PBX-neutral events it emits.

Adapters translate protocol (ARI, ESL) into these verbs and events and hold no business logic:
what to do on busy, when to give up, what the caller hears is decided in `bridge.calls`.
Channel ids are the PBX's own ids (Asterisk channel id, FreeSWITCH uuid).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class LegOutcome(StrEnum):
    """Why an outbound leg ended before (or by) being answered."""

    ANSWERED = "answered"
    BUSY = "busy"
    NO_ANSWER = "no_answer"
    REJECTED = "rejected"  # refused by the far end or its network (403, 21 without 603)
    DECLINED = "declined"  # the person declined the call (603 Decline)
    UNREACHABLE = "unreachable"  # no route, 404, 484, DNS or transport failure
    FAILED = "failed"  # anything else (5xx, congestion, local faults in our PBX or daemon)
    CANCELLED = "cancelled"  # we hung it up ourselves (caller left, timeout in our hands)
    # --- warm transfer (issue 9 §2): the leg answered, the caller was not connected ---
    VOICEMAIL = "voicemail"  # answered, but nobody accepted in time (a machine, or no one)


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PbxEvent:
    channel_id: str


@dataclass(frozen=True, slots=True)
class CallArrived(PbxEvent):
    """A caller's channel entered our application (Stasis / socket) and waits for us."""

    called_number: str
    caller_number: str | None = None
    caller_name: str | None = None
    variables: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CallMissed(CallArrived):
    """A caller arrived for us, but the PBX's take guard had already sent it to the dialplan
    fallback (the daemon was stopped or overloaded for longer than the guard). Nothing is
    left to do for it but record it."""

    @classmethod
    def of(cls, arrival: CallArrived) -> CallMissed:
        return cls(
            arrival.channel_id,
            arrival.called_number,
            arrival.caller_number,
            arrival.caller_name,
            arrival.variables,
        )


@dataclass(frozen=True, slots=True)
class LegRinging(PbxEvent):
    """An outbound leg we originated is ringing at the far end (180 Ringing)."""


@dataclass(frozen=True, slots=True)
class LegProgress(PbxEvent):
    """An outbound leg got 183 Session Progress / early media without a 180: the far end is
    alive and working on the call (carriers often play their own ringback this way)."""


@dataclass(frozen=True, slots=True)
class LegAnswered(PbxEvent):
    """An outbound leg we originated was answered."""


@dataclass(frozen=True, slots=True)
class LegFailed(PbxEvent):
    """An outbound leg ended without being answered: raw facts only. What they mean (busy,
    declined, no answer...) is decided in `bridge.calls.outcomes`, the same for every PBX.

    `cause` is the Q.850 number, `cause_text` the PBX's own name or text for it, `sip_code` the
    far end's final SIP status when known. `local` is True when the failure is inside our own
    PBX or daemon (no such gateway/endpoint, the PBX refused the originate, PBX unreachable),
    not the destination's doing."""

    cause: int | None = None
    cause_text: str | None = None
    sip_code: int | None = None
    local: bool = False


@dataclass(frozen=True, slots=True)
class ChannelHungUp(PbxEvent):
    cause: int | None = None
    cause_text: str | None = None


@dataclass(frozen=True, slots=True)
class PlaybackFinished(PbxEvent):
    playback_id: str


@dataclass(frozen=True, slots=True)
class DtmfReceived(PbxEvent):
    digit: str


@dataclass(frozen=True, slots=True)
class ConnectionLost(PbxEvent):
    """The control connection to the PBX dropped; events may have been missed.

    `channel_id` is empty: this concerns every call.
    """


@dataclass(frozen=True, slots=True)
class ConnectionRestored(PbxEvent):
    """The control connection is (back) up. `callers` are the caller channels the PBX has in
    our application now, `legs` the outbound legs we placed that still exist (with whether they
    are answered); the call service reconciles its calls against them. `channel_id` is empty."""

    callers: tuple[CallArrived, ...] = ()
    legs: tuple[tuple[str, bool], ...] = ()
    leg_facts: tuple[LegFacts, ...] = ()  # what the PBX knows of each leg (trust, issue 7)


# --- restart safety of transfer legs (trust, issue 7 section 3) -----------------------------


@dataclass(frozen=True, slots=True)
class LegFacts:
    """What a restarted daemon learns of a leg it finds in the PBX: the call and transfer it
    was placed for (the leg's CALLBRIDGE_CALL_ID / CALLBRIDGE_TRANSFER_ID variables), and
    whether its dial was sent. `dialled=False` only when the PBX can tell the leg was created
    and never dialled; such a leg is dialled now, once. Both adapters create and dial a leg
    in one request (Asterisk `POST /channels`, FreeSWITCH `originate`), so a leg that exists
    was dialled and both report True. A leg with no facts is taken as dialled."""

    leg_id: str
    call_id: str | None = None
    transfer_id: str | None = None
    dialled: bool = True


EventSink = Callable[[PbxEvent], Awaitable[None]]


# --- what adapters are asked to do ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DialTarget:
    """Where an outbound leg goes. Exactly one of these forms is used:

    - `number` through `trunk_id` (a trunk the adapter provisioned), or through `route`
      (a PBX dial string template with `{number}`) when there is no trunk;
    - `sip_uri` dialled directly;
    - inside the PBX (issue 9): `endpoint` (an extension: `PJSIP/<endpoint>` /
      `user/<endpoint>`), `queue` (through the `callbridge-queue` context), or `context` +
      `exten` (any dialplan target: ring groups, IVRs).
    """

    number: str | None = None
    trunk_id: str | None = None
    route: str | None = None
    sip_uri: str | None = None
    endpoint: str | None = None
    queue: str | None = None
    context: str | None = None
    exten: str | None = None

    @property
    def internal(self) -> bool:
        """A target inside the PBX (no trunk, no carrier)."""
        return bool(self.endpoint or self.queue or self.context)

    def describe(self) -> str:
        if self.endpoint:
            return f"extension {self.endpoint}"
        if self.queue:
            return f"queue {self.queue}"
        if self.context:
            return f"dialplan {self.exten}@{self.context}"
        if self.sip_uri:
            return self.sip_uri
        via = f"trunk {self.trunk_id}" if self.trunk_id else f"route {self.route}"
        return f"{self.number} via {via}"


@dataclass(frozen=True, slots=True)
class MediaAddress:
    """A media endpoint. Returned by `attach_media`, it also says how the PBX frames audio:
    `framing` "rtp" (Asterisk externalMedia) or "raw" (FreeSWITCH `unicast`: bare payloads,
    no RTP header), and `codec` when the PBX sends another codec than the one asked for."""

    host: str
    port: int
    framing: str = "rtp"
    codec: str | None = None


@dataclass(frozen=True, slots=True)
class TrunkSpec:
    """A SIP trunk as the PBX needs it (the password is in clear here, only here)."""

    id: str
    host: str
    port: int
    transport: str
    username: str | None
    password: str | None
    register: bool


class PbxAdapter(Protocol):
    """Verbs the call service uses. Every verb raises `ChannelGone` when the channel no longer
    exists, `PbxUnavailable` when the PBX cannot be reached and `PbxCommandFailed` when the PBX
    refuses the command; never a raw protocol error (ARI HTTP status, ESL reply)."""

    async def start(self, sink: EventSink) -> None:
        """Connect, keep reconnecting, and deliver events to `sink` in order per channel."""
        ...

    async def stop(self) -> None: ...

    async def answer(self, channel_id: str) -> None: ...

    async def hangup(self, channel_id: str) -> None: ...

    async def continue_in_dialplan(self, channel_id: str, context: str, extension: str) -> None:
        """Hand the channel back to the dialplan at `context`, `extension`, priority 1."""
        ...

    async def attach_media(self, channel_id: str, local: MediaAddress, codec: str) -> MediaAddress:
        """Stream the caller's audio as RTP to `local` and accept RTP for the caller; return
        where to send it."""
        ...

    async def detach_media(self, channel_id: str) -> None: ...

    async def play_tone(self, channel_id: str, tone: str, playback_id: str) -> None:
        """Start a PBX tone ("ring") to the caller under the id `playback_id` chosen by the
        caller (derived from the transfer, so a restarted daemon can stop it)."""
        ...

    async def stop_playback(self, playback_id: str) -> None:
        """Stop a playback started by `play_tone`; a playback that is gone is not an error."""
        ...

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
        """Place an outbound leg with channel id `leg_id`; what happens arrives as events
        (LegProgress, LegRinging, LegAnswered or LegFailed; ChannelHungUp once answered).
        `variables` are set on the leg; `headers` are added to its INVITE when the leg is a
        SIP channel (not through a dialplan or queue target). Values are checked text
        (`bridge.calls.context`)."""
        ...

    async def connect(self, channel_id: str, leg_id: str) -> None:
        """Bridge an answered outbound leg with the caller (and stop the caller's media)."""
        ...

    async def blind_transfer(
        self, channel_id: str, target: DialTarget, ring_timeout: float
    ) -> None:
        """Hand the caller to the PBX to dial `target`; we lose sight of the outcome."""
        ...

    async def provision_trunk(self, trunk: TrunkSpec) -> None: ...

    async def remove_trunk(self, trunk_id: str) -> None: ...

    async def provisioned_trunks(self) -> set[str]:
        """Ids of the trunks the PBX currently has from us (`cb-trunk-<id>` objects, gateway
        files), so that a reconciler can remove those no longer in the directory."""
        ...

    async def set_variable(self, channel_id: str, name: str, value: str) -> None: ...

    async def send_dtmf(self, channel_id: str, digits: str) -> None:
        """Send DTMF on an answered leg (issue 9 §4), RFC 2833 on SIP: digits 0-9 * # A-D,
        `w` a 0.5 s pause, `W` 1 s (`check_dtmf`). Returns once the PBX took them; playing
        them takes `dtmf_seconds(digits)`."""
        ...

    async def record_outcome(self, channel_id: str, fields: dict[str, str]) -> None:
        """Put a transfer's outcome into the call's own record in the PBX (issue 9 §6):
        Asterisk `CDR(userfield)` and `CDR(callbridge_<key>)`, FreeSWITCH channel variables
        `callbridge_<key>` (in its CDR). Keys: transfer_id, outcome, destination."""
        ...

    async def release(self, channel_id: str) -> None:
        """The call is over for us: free what the adapter made for it (bridge, media)."""
        ...

    # --- hand back (issue 9 §5) ---
    async def unbridge(self, channel_id: str, leg_id: str) -> None:
        """Take the caller out of its bridge with `leg_id` and hang the leg up (a leg already
        gone is not an error). The caller stays with us, without media, until `attach_media`.
        DTMF the leg receives while bridged arrives as `DtmfReceived(leg_id, digit)`."""
        ...

    # --- extension state (issue 9 §3, fallback chains) ---------------------------------------
    async def extension_state(self, endpoint: str) -> ExtensionState:
        """What the PBX knows of an extension before it is dialled (Asterisk: the PJSIP
        endpoint's state and channels through ARI; FreeSWITCH: the user's registration and
        channels). UNKNOWN when the PBX cannot tell; never raises for that."""
        ...

    # --- warm transfer (issue 9 §2) ---------------------------------------------------------
    # The brief is played to an answered leg with `attach_media(leg, ...)` (the leg alone
    # with our media, the caller not in it) and `end_brief(leg)` ends that before `connect`.
    # The leg's DTMF arrives as `DtmfReceived(leg, digit)`.

    async def start_hold(self, channel_id: str, moh_class: str) -> None:
        """The caller (alone: its media detached) hears the PBX's music on hold of class
        `moh_class` until `stop_hold`: Asterisk musiconhold.conf classes, FreeSWITCH
        `local_stream://<class>`."""
        ...

    async def stop_hold(self, channel_id: str) -> None:
        """Stop the caller's hold music; a caller not on hold (or gone) is not an error."""
        ...

    async def end_brief(self, leg_id: str) -> None:
        """Take our media off an answered leg (what `attach_media(leg)` made for the brief),
        leaving the leg up and ours, ready for `connect` or `hangup`. Nothing there is not an
        error."""
        ...


class ExtensionState(StrEnum):
    """An extension's state as the PBX reports it, before callbridge rings it (issue 9 §3)."""

    AVAILABLE = "available"  # registered / reachable, not on a call
    BUSY = "busy"  # on a call (a channel of it exists: up or ringing)
    OFFLINE = "offline"  # not registered / unreachable: ringing it cannot work
    UNKNOWN = "unknown"  # the PBX cannot tell (no such endpoint, no state): dial it anyway


class ChannelGone(Exception):
    """The channel no longer exists on the PBX."""


# --- DTMF after answer (issue 9 §4) -----------------------------------------------------------
DTMF_PATTERN = r"^[0-9*#A-DwW]{1,64}$"
DTMF_DIGIT_MS = 100  # tone length of each digit (both PBXs' default)
DTMF_GAP_MS = 100  # silence between digits
DTMF_PAUSE_MS = {"w": 500, "W": 1000}


def check_dtmf(value: str) -> str:
    """Digits 0-9 * # A-D and `w`/`W` pauses, 1 to 64 characters, at least one digit."""
    if not re.fullmatch(DTMF_PATTERN, value) or not any(c not in "wW" for c in value):
        raise ValueError(
            "must be DTMF: digits 0-9 * # A-D and w (0.5 s) / W (1 s) pauses, up to 64, "
            "with at least one digit"
        )
    return value


def dtmf_seconds(digits: str) -> float:
    """How long sending `digits` lasts (pauses, then each digit's tone and gap)."""
    ms = sum(DTMF_PAUSE_MS.get(c, DTMF_DIGIT_MS + DTMF_GAP_MS) for c in digits)
    return ms / 1000
