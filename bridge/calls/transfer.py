"""The transfer state machine: one explicit table, illegal transitions raise.

A transfer speaks its message, dials the destination (bridge mode) or hands the caller to the
PBX (blind mode), and ends in exactly one final state with a typed outcome. The session drives
it with events; this module only decides which state comes next and records the history.

    announcing --message_done--> dialing --leg_ringing--> ringing --leg_answered--> answered
        |  \\--handed_off--> handed_off                                   |
        |                         (any non-final) --leg_failed--> failed   --connected--> bridged
        \\--caller_gone / error--> cancelled / failed

    bridged --returned--> returned   (hand back: the caller is the assistant's again)
Warm mode (issue 9 §2) adds two steps between answered and bridged:
answered --brief--> briefing [--briefed--> awaiting_accept] --connected--> bridged, and from
either a leg_failed (declined, not accepted in time, hung up) back to the assistant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from bridge.calls.model import _iso, utcnow
from bridge.calls.outcomes import is_local
from bridge.pbx.ports import DialTarget, LegOutcome


class TransferState(StrEnum):
    ANNOUNCING = "announcing"  # the caller hears the message
    DIALING = "dialing"  # the new leg is being placed
    RINGING = "ringing"  # the destination rings; the caller hears ringback
    ANSWERED = "answered"  # the destination answered; bridging
    BRIEFING = "briefing"  # warm: the destination hears the brief, the caller hold music
    AWAITING_ACCEPT = "awaiting_accept"  # warm: briefed; waiting for DTMF 1 / 2
    BRIDGED = "bridged"  # final: caller and destination talk
    HANDED_OFF = "handed_off"  # final: blind mode, the PBX dials; outcome not ours to see
    FAILED = "failed"  # final: the caller stays with the assistant
    CANCELLED = "cancelled"  # final: the caller hung up during the transfer
    RETURNED = "returned"  # final: after the bridge, the caller came back to the assistant


class TransferEvent(StrEnum):
    MESSAGE_DONE = "message_done"
    LEG_RINGING = "leg_ringing"
    LEG_ANSWERED = "leg_answered"
    CONNECTED = "connected"
    HANDED_OFF = "handed_off"
    LEG_FAILED = "leg_failed"
    CALLER_GONE = "caller_gone"
    ERROR = "error"
    RETURNED = "returned"  # hand back (issue 9 §5): agent DTMF, the API, destination hangup
    BRIEF = "brief"  # warm: the answered destination is briefed first
    BRIEFED = "briefed"  # warm: the brief played and acceptance is required


FINAL_STATES = frozenset(
    {
        TransferState.BRIDGED,
        TransferState.HANDED_OFF,
        TransferState.FAILED,
        TransferState.CANCELLED,
        TransferState.RETURNED,
    }
)

_S, _E = TransferState, TransferEvent
TRANSITIONS: dict[tuple[TransferState, TransferEvent], TransferState] = {
    (_S.ANNOUNCING, _E.MESSAGE_DONE): _S.DIALING,
    (_S.ANNOUNCING, _E.HANDED_OFF): _S.HANDED_OFF,
    (_S.ANNOUNCING, _E.CALLER_GONE): _S.CANCELLED,
    (_S.ANNOUNCING, _E.ERROR): _S.FAILED,
    (_S.DIALING, _E.LEG_RINGING): _S.RINGING,
    (_S.DIALING, _E.LEG_ANSWERED): _S.ANSWERED,
    (_S.DIALING, _E.LEG_FAILED): _S.FAILED,
    (_S.DIALING, _E.CALLER_GONE): _S.CANCELLED,
    (_S.DIALING, _E.ERROR): _S.FAILED,
    (_S.RINGING, _E.LEG_RINGING): _S.RINGING,  # 180 after 183, or a second 180
    (_S.RINGING, _E.LEG_ANSWERED): _S.ANSWERED,
    (_S.RINGING, _E.LEG_FAILED): _S.FAILED,
    (_S.RINGING, _E.CALLER_GONE): _S.CANCELLED,
    (_S.RINGING, _E.ERROR): _S.FAILED,
    (_S.ANSWERED, _E.CONNECTED): _S.BRIDGED,
    (_S.ANSWERED, _E.LEG_FAILED): _S.FAILED,  # the destination hung up before the bridge
    (_S.ANSWERED, _E.CALLER_GONE): _S.CANCELLED,
    (_S.ANSWERED, _E.ERROR): _S.FAILED,
    # Hand back (issue 9 §5): the one way out of BRIDGED; the caller is the assistant's again.
    (_S.BRIDGED, _E.RETURNED): _S.RETURNED,
    # --- warm transfer (issue 9 §2) ---
    (_S.ANSWERED, _E.BRIEF): _S.BRIEFING,
    (_S.BRIEFING, _E.BRIEFED): _S.AWAITING_ACCEPT,
    (_S.BRIEFING, _E.CONNECTED): _S.BRIDGED,  # no acceptance required
    (_S.BRIEFING, _E.LEG_FAILED): _S.FAILED,
    (_S.BRIEFING, _E.CALLER_GONE): _S.CANCELLED,
    (_S.BRIEFING, _E.ERROR): _S.FAILED,
    (_S.AWAITING_ACCEPT, _E.CONNECTED): _S.BRIDGED,  # accepted
    (_S.AWAITING_ACCEPT, _E.LEG_FAILED): _S.FAILED,  # declined, timed out, hung up
    (_S.AWAITING_ACCEPT, _E.CALLER_GONE): _S.CANCELLED,
    (_S.AWAITING_ACCEPT, _E.ERROR): _S.FAILED,
}


@dataclass(frozen=True, slots=True)
class TransferResult:
    """The typed result of a transfer once it is final: what the session, the conversation
    (tool result) and later steps (warm transfer, fallback chains) decide on."""

    transfer_id: str
    state: TransferState
    outcome: LegOutcome | None
    reason: str | None
    sip_code: int | None = None
    cause: int | None = None
    local_fault: bool = False

    @property
    def transferred(self) -> bool:
        """The caller left the assistant: bridged to the destination or handed to the PBX."""
        return self.state in (TransferState.BRIDGED, TransferState.HANDED_OFF)

    @property
    def caller_back(self) -> bool:
        """The caller stays with (returns to) the assistant."""
        return self.state in (TransferState.FAILED, TransferState.RETURNED)


@dataclass(frozen=True, slots=True)
class WarmPlan:
    """How a warm transfer (issue 9 §2) treats its destination before the caller joins."""

    brief: str  # what the destination hears once it answers (the caller does not)
    require_accept: bool = False  # DTMF 1 accepts, 2 declines; no key in time: voicemail
    accept_timeout: float = 15.0  # seconds after the brief to press a key
    wait_for_speech: bool = False  # brief only once the destination said something ("hello")
    moh_class: str = "default"  # the caller's music on hold (the PBX's class)
    prompt: str | None = None  # spoken after the brief when acceptance is required
    speech_wait: float = 5.0  # wait_for_speech: brief anyway after this long
    # "configured" (the command's / destination's brief) or "transcript" (built without a
    # model); the model may still replace a transcript brief ("llm", see `WarmSteps`).
    brief_source: str = "configured"
    summary_timeout: float = 3.0  # seconds from the transfer's start the model may take


class IllegalTransition(Exception):
    def __init__(self, state: TransferState, event: TransferEvent) -> None:
        super().__init__(f"transfer event {event.value!r} is illegal in state {state.value!r}")
        self.state = state
        self.event = event


@dataclass
class Transfer:
    id: str
    call_id: str
    source: str  # "api" | "assistant"
    destination: str  # as requested: E.164 number, SIP URI or an internal address
    target: DialTarget
    mode: str  # "bridge" | "blind" | "warm"
    ring_timeout: float
    message: str | None = None
    label: str | None = None  # the destination's description, for assistant transfers
    summary: str | None = None  # why the caller is coming (into the PBX's artefacts)
    dtmf: str | None = None  # sent once the leg answers, before the bridge (issue 9 §4)
    warm: WarmPlan | None = None  # mode "warm" (issue 9 §2)
    leg_id: str | None = None
    state: TransferState = TransferState.ANNOUNCING
    outcome: LegOutcome | None = None
    cause: int | None = None
    cause_text: str | None = None
    sip_code: int | None = None
    reason: str | None = None  # why it ended, for people and the assistant
    rang: bool = False  # the destination sent 180 Ringing
    progressed: bool = False  # the destination sent 183 / early media
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    history: list[tuple[TransferState, datetime]] = field(default_factory=list)
    # Hand back (issue 9 §5): how the caller came back after the bridge ("agent_dtmf", "api",
    # "destination_hangup"), by whom (the API's source, the DTMF code) and when.
    returned_by: str | None = None
    returned_detail: str | None = None
    returned_at: datetime | None = None
    returned_message: str | None = None  # said to the caller once back (the command's)
    # --- fallback chains (issue 9 §3, `bridge.calls.chain`): each attempt is a transfer ---
    chain_id: str | None = None  # the chain's first transfer's id; None: a lone transfer
    attempt: int = 0  # this transfer's place in its chain (0: the first destination)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)  # steps left, in order
    attempts: list[dict[str, Any]] = field(default_factory=list)  # the earlier attempts
    skipped: str | None = None  # not dialled: why (the extension's state in the PBX)

    def __post_init__(self) -> None:
        if not self.history:
            self.history.append((self.state, self.created_at))

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def apply(self, event: TransferEvent) -> TransferState:
        """Move to the next state for `event`; raise `IllegalTransition` if there is none."""
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise IllegalTransition(self.state, event)
        self.state = nxt
        self.updated_at = utcnow()
        self.history.append((nxt, self.updated_at))
        return nxt

    def settle(
        self,
        event: TransferEvent,
        outcome: LegOutcome,
        *,
        cause: int | None = None,
        cause_text: str | None = None,
        sip_code: int | None = None,
        reason: str | None = None,
    ) -> TransferState:
        """Apply a final event and record its typed outcome."""
        state = self.apply(event)
        self.outcome = outcome
        self.cause, self.cause_text, self.sip_code = cause, cause_text, sip_code
        self.reason = reason or cause_text
        return state

    @property
    def local_fault(self) -> bool:
        """Failed inside our own PBX or daemon: never counted against the destination."""
        return self.outcome is LegOutcome.FAILED and is_local(self.reason)

    def result(self) -> TransferResult:
        """The typed result; only meaningful once `final`."""
        return TransferResult(
            transfer_id=self.id,
            state=self.state,
            outcome=self.outcome,
            reason=self.reason,
            sip_code=self.sip_code,
            cause=self.cause,
            local_fault=self.local_fault,
        )

    @property
    def ringback_id(self) -> str:
        """The id of the caller's ringback playback: derived, so a restarted daemon can stop
        the tone its predecessor started."""
        return f"cbring-{self.id}"

    def public_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "call_id": self.call_id,
            "source": self.source,
            "destination": self.destination,
            "label": self.label,
            "route": self.target.describe(),
            "trunk_id": self.target.trunk_id,
            "mode": self.mode,
            "message": self.message,
            "summary": self.summary,
            "dtmf": self.dtmf,
            "warm": asdict(self.warm) if self.warm else None,
            "state": self.state.value,
            "outcome": self.outcome.value if self.outcome else None,
            "sip_code": self.sip_code,
            "cause": self.cause,
            "cause_text": self.cause_text,
            "reason": self.reason,
            "local_fault": self.local_fault,
            "rang": self.rang,
            "early_media": self.progressed,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "history": [{"state": s.value, "at": _iso(at)} for s, at in self.history],
            "returned": self._returned_dict(),
            # fallback chains (issue 9 §3)
            "chain_id": self.chain_id,
            "attempt": self.attempt,
            "skipped": self.skipped,
            "attempts": self.attempts,
            "fallbacks": [step.get("destination") for step in self.fallbacks],
        }

    def _returned_dict(self) -> dict[str, Any] | None:
        if self.returned_by is None:
            return None
        return {
            "by": self.returned_by,
            "detail": self.returned_detail,
            "at": _iso(self.returned_at),
            "message": self.returned_message,
        }

    def result_for_assistant(self) -> dict[str, Any]:
        """The typed outcome as the assistant's tool result (issue: conversation)."""
        if self.state is TransferState.RETURNED:
            return {
                "transferred": False,
                "outcome": "returned",
                "returned_by": self.returned_by,
                "cause": self.reason,
            }
        return {
            "transferred": self.state is TransferState.BRIDGED,
            "outcome": self.outcome.value if self.outcome else self.state.value,
            "sip_code": self.sip_code,
            "cause": self.cause_text or self.reason,
            # A fallback chain's earlier attempts (issue 9 §3): the assistant knows them all.
            **({"attempts": self.attempts} if self.attempts else {}),
        }


def transfer_to_doc(t: Transfer) -> dict[str, Any]:
    """Everything needed to rebuild the transfer after a daemon restart."""
    doc = t.public_dict()
    doc.update(
        leg_id=t.leg_id,
        ring_timeout=t.ring_timeout,
        fallbacks=t.fallbacks,
        target={
            "number": t.target.number,
            "trunk_id": t.target.trunk_id,
            "route": t.target.route,
            "sip_uri": t.target.sip_uri,
            "endpoint": t.target.endpoint,
            "queue": t.target.queue,
            "context": t.target.context,
            "exten": t.target.exten,
        },
    )
    return doc


def transfer_from_doc(doc: dict[str, Any]) -> Transfer:
    return Transfer(
        id=doc["id"],
        call_id=doc["call_id"],
        source=doc["source"],
        destination=doc["destination"],
        target=DialTarget(**doc["target"]),
        mode=doc["mode"],
        ring_timeout=doc["ring_timeout"],
        message=doc.get("message"),
        label=doc.get("label"),
        summary=doc.get("summary"),
        dtmf=doc.get("dtmf"),
        warm=WarmPlan(**doc["warm"]) if doc.get("warm") else None,
        leg_id=doc.get("leg_id"),
        state=TransferState(doc["state"]),
        outcome=LegOutcome(doc["outcome"]) if doc.get("outcome") else None,
        cause=doc.get("cause"),
        cause_text=doc.get("cause_text"),
        sip_code=doc.get("sip_code"),
        reason=doc.get("reason"),
        rang=bool(doc.get("rang", False)),
        progressed=bool(doc.get("early_media", False)),
        created_at=datetime.fromisoformat(doc["created_at"]),
        updated_at=datetime.fromisoformat(doc["updated_at"]),
        history=[
            (TransferState(h["state"]), datetime.fromisoformat(h["at"])) for h in doc["history"]
        ],
        **_returned_from_doc(doc.get("returned")),
        chain_id=doc.get("chain_id"),
        attempt=int(doc.get("attempt") or 0),
        fallbacks=list(doc.get("fallbacks") or []),
        attempts=list(doc.get("attempts") or []),
        skipped=doc.get("skipped"),
    )


def _returned_from_doc(returned: dict[str, Any] | None) -> dict[str, Any]:
    if not returned:
        return {}
    at = returned.get("at")
    return {
        "returned_by": returned.get("by"),
        "returned_detail": returned.get("detail"),
        "returned_at": datetime.fromisoformat(at) if at else None,
        "returned_message": returned.get("message"),
    }
