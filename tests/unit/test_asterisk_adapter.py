"""The Asterisk adapter's contract with the call domain, on a scripted ARI: raw leg facts,
typed errors only, the take guard, and legs that ended while the connection was down. The
behaviour with the real Asterisk is covered by tests/integration."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from bridge.errors import PbxCommandFailed, PbxUnavailable
from bridge.pbx.asterisk.adapter import AsteriskAdapter, _leg_record
from bridge.pbx.asterisk.ari import AriConflict, AriError, AriNotFound, AriUnavailable
from bridge.pbx.ports import (
    CallArrived,
    CallMissed,
    ChannelGone,
    ChannelHungUp,
    ConnectionRestored,
    DialTarget,
    LegAnswered,
    LegFailed,
    LegProgress,
    LegRinging,
    MediaAddress,
    PbxEvent,
    TrunkSpec,
)
from tests.support.calls import until

Responder = Callable[[str, str, dict[str, Any]], Any]


class ScriptedAri:
    """Answers each request with `respond(method, path, params)` (raise to fail it)."""

    app = "callbridge"

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.connected = asyncio.Event()

    async def request(self, method: str, path: str, *, params: Any = None, body: Any = None) -> Any:
        params = dict(params or {})
        self.requests.append((method, path, params))
        return self.respond(method, path, params)


def adapter_with(respond: Responder) -> tuple[AsteriskAdapter, list[PbxEvent]]:
    adapter = AsteriskAdapter(ScriptedAri(respond))  # type: ignore[arg-type]
    events: list[PbxEvent] = []

    async def sink(event: PbxEvent) -> None:
        events.append(event)

    adapter._sink = sink
    return adapter, events


ARI_FAILURES = [
    AriConflict(409, "Channel not in Stasis application", "POST", "/x"),
    AriConflict(422, "Unprocessable", "POST", "/x"),
    AriError(500, "Allocation failed", "POST", "/x"),
    AriNotFound(404, "Channel not found", "POST", "/x"),
    AriUnavailable("ARI POST /x: ClientOSError()"),
]
TARGET = DialTarget(number="+31612345678", trunk_id="t1")
TRUNK = TrunkSpec("t1", "127.0.0.1", 5060, "udp", "user", "secret", True)


@pytest.mark.parametrize("failure", ARI_FAILURES, ids=lambda e: type(e).__name__)
async def test_every_verb_raises_only_the_ports_errors(failure: Exception) -> None:
    def respond(method: str, path: str, params: dict[str, Any]) -> Any:
        raise failure

    adapter, _ = adapter_with(respond)
    verbs = [
        adapter.answer("c1"),
        adapter.hangup("c1"),
        adapter.release("c1"),
        adapter.continue_in_dialplan("c1", "ctx", "s"),
        adapter.set_variable("c1", "X", "1"),
        adapter.play_tone("c1", "ring", "cbring-t1"),
        adapter.stop_playback("cbring-t1"),
        adapter.connect("c1", "cbleg-1"),
        adapter.attach_media("c1", MediaAddress("127.0.0.1", 4000), "ulaw"),
        adapter.originate("cbleg-1", TARGET, caller_number="+3120", ring_timeout=5),
        adapter.provision_trunk(TRUNK),
        adapter.remove_trunk("t1"),
        adapter.provisioned_trunks(),
    ]
    for verb in verbs:
        try:
            await verb
        except (ChannelGone, PbxUnavailable, PbxCommandFailed):
            pass  # anything else (AriConflict, AriError, ...) fails the test


async def test_expected_conflicts_stay_inside_the_adapter() -> None:
    def respond(method: str, path: str, params: dict[str, Any]) -> Any:
        if path.startswith("/bridges/") and path.endswith("/addChannel"):
            raise AriConflict(409, "Channel already in bridge", method, path)
        if path.startswith("/bridges/"):
            raise AriConflict(409, "Bridge with id cb-c1 already exists", method, path)
        if "/play/" in path:
            raise AriConflict(409, "A playback with this id already exists", method, path)
        return None

    adapter, _ = adapter_with(respond)
    await adapter.connect("c1", "cbleg-1")
    await adapter.play_tone("c1", "ring", "cbring-t1")


async def test_a_leg_that_left_stasis_is_gone_for_the_bridge() -> None:
    def respond(method: str, path: str, params: dict[str, Any]) -> Any:
        if path.endswith("/addChannel") and params.get("channel") == "cbleg-1":
            raise AriConflict(422, "Channel not in Stasis application", method, path)
        return None

    adapter, _ = adapter_with(respond)
    with pytest.raises(ChannelGone):
        await adapter.connect("c1", "cbleg-1")


async def test_play_tone_uses_the_callers_playback_id() -> None:
    adapter, _ = adapter_with(lambda m, p, q: {"id": "cbring-t1"})
    await adapter.play_tone("c1", "ring", "cbring-t1")
    assert adapter.ari.requests == [  # type: ignore[attr-defined]
        ("POST", "/channels/c1/play/cbring-t1", {"media": "tone:ring"})
    ]


async def test_leg_events_become_raw_facts() -> None:
    adapter, events = adapter_with(lambda m, p, q: None)
    leg = {"id": "cbleg-1", "state": "Down"}
    for raw in [
        {"type": "Dial", "peer": leg, "dialstatus": ""},
        {"type": "Dial", "peer": leg, "dialstatus": "PROGRESS"},  # 183, no 180
        {"type": "Dial", "peer": leg, "dialstatus": "RINGING"},
        # Up is not the answer: the leg can join a bridge once [callbridge-leg] put it in
        # Stasis, so its StasisStart is (once).
        {"type": "ChannelStateChange", "channel": {"id": "cbleg-1", "state": "Up"}},
        {"type": "StasisStart", "channel": {"id": "cbleg-1", "state": "Up"}, "args": ["leg"]},
        {"type": "StasisStart", "channel": {"id": "cbleg-1", "state": "Up"}, "args": ["leg"]},
        {"type": "ChannelHangupRequest", "channel": leg, "cause": 17, "tech_cause": 486},
        {"type": "StasisEnd", "channel": leg},
        # The far end's 486: its hangup request carries the SIP code.
        {
            "type": "ChannelHangupRequest",
            "channel": {"id": "cbleg-2"},
            "cause": 17,
            "tech_cause": 486,
        },
        {
            "type": "ChannelDestroyed",
            "channel": {"id": "cbleg-2"},
            "cause": 17,
            "cause_txt": "User busy",
            "tech_cause": 486,
        },
        {
            "type": "ChannelDestroyed",
            "channel": {"id": "cbleg-3"},
            "cause": 66,
            "cause_txt": "Channel not implemented",
        },
        {"type": "ChannelDestroyed", "channel": {"id": "cbleg-1"}, "cause": 16},
        # Our ring timeout: a soft hangup request without tech_cause, then a tech_cause
        # Asterisk derived from cause 19.
        {"type": "ChannelHangupRequest", "channel": {"id": "cbleg-4"}, "cause": 32, "soft": True},
        {
            "type": "ChannelDestroyed",
            "channel": {"id": "cbleg-4"},
            "cause": 19,
            "cause_txt": "User alerting, no answer",
            "tech_cause": 480,
        },
        # The originate's own ring timeout: no hangup request at all, a derived 480.
        {
            "type": "ChannelDestroyed",
            "channel": {"id": "cbleg-6"},
            "cause": 19,
            "cause_txt": "User alerting, no answer",
            "tech_cause": 480,
        },
        # A real 480 from the far end comes with a hangup request carrying it.
        {
            "type": "ChannelHangupRequest",
            "channel": {"id": "cbleg-5"},
            "cause": 19,
            "tech_cause": 480,
        },
        {
            "type": "ChannelDestroyed",
            "channel": {"id": "cbleg-5"},
            "cause": 19,
            "cause_txt": "User alerting, no answer",
            "tech_cause": 480,
        },
    ]:
        await adapter._on_event(raw)
    assert events == [
        LegProgress("cbleg-1"),
        LegRinging("cbleg-1"),
        LegAnswered("cbleg-1"),  # once
        LegFailed("cbleg-2", 17, "User busy", 486, local=False),
        LegFailed("cbleg-3", 66, "Channel not implemented", None, local=True),
        ChannelHungUp("cbleg-1", 16, None),
        LegFailed("cbleg-4", 19, "User alerting, no answer", None, local=False),
        LegFailed("cbleg-6", 19, "User alerting, no answer", None, local=False),
        LegFailed("cbleg-5", 19, "User alerting, no answer", 480, local=False),
    ]


async def test_a_caller_that_left_stasis_before_we_took_it_is_left_alone() -> None:
    def respond(method: str, path: str, params: dict[str, Any]) -> Any:
        if path == "/channels/late/variable":
            raise AriConflict(409, "Channel not in Stasis application", method, path)
        return None

    adapter, events = adapter_with(respond)
    for cid in ("late", "ok"):
        await adapter._on_event(
            {"type": "StasisStart", "channel": {"id": cid, "dialplan": {"exten": "+3120"}}}
        )
    # The late one is only recorded (the guard sent it to the fallback); the other is ours.
    # (Each arrival is handled in its own task: wait for both.)
    await until(lambda: len(events) == 2, "both arrivals")
    events.sort(key=lambda e: e.channel_id)
    assert events == [CallMissed("late", "+3120"), CallArrived("ok", "+3120")]
    assert type(events[0]) is CallMissed and type(events[1]) is CallArrived
    assert ("POST", "/channels/ok/variable", {"variable": "TIMEOUT(absolute)", "value": "0"}) in (
        adapter.ari.requests  # type: ignore[attr-defined]
    )


def test_leg_records_keep_only_final_sip_codes() -> None:
    assert _leg_record("17,486,Down,1796004687") == (17, 486, "Down")
    assert _leg_record("16,180,Ringing,1796004687") == (16, None, "Ringing")
    assert _leg_record("16,,Up,1") == (16, None, "Up")


async def test_a_leg_that_ended_while_away_is_reported_before_the_calls_resume() -> None:
    records = {
        "CALLBRIDGE_LEG_cbleg-busy": "17,486,Ringing,1",
        "CALLBRIDGE_LEG_cbleg-up": "16,,Up,1",
    }

    def respond(method: str, path: str, params: dict[str, Any]) -> Any:
        if path in ("/channels", "/bridges"):
            return []
        if path == "/asterisk/variable" and method == "GET":
            return {"value": records.get(params["variable"], "")}
        return None

    adapter, events = adapter_with(respond)
    adapter._pending_legs |= {"cbleg-busy", "cbleg-up", "cbleg-lost"}
    adapter._answered_legs.add("cbleg-up")
    await adapter._reconcile_calls()
    assert events == [
        LegFailed("cbleg-busy", 17, None, 486, local=False),
        ChannelHungUp("cbleg-up", 16, "hung up while callbridge was disconnected"),
        ConnectionRestored(""),
    ]
    await asyncio.gather(*adapter._background)  # records are unset once reported
    cleared = [
        q["variable"]
        for m, p, q in adapter.ari.requests  # type: ignore[attr-defined]
        if m == "POST" and p == "/asterisk/variable"
    ]
    assert sorted(cleared) == ["CALLBRIDGE_LEG_cbleg-busy", "CALLBRIDGE_LEG_cbleg-up"]


async def test_one_request_creates_and_dials_the_leg_then_it_is_watched() -> None:
    """Issue 8 §4: the INVITE leaves with ONE request (originate into [callbridge-leg]); our
    application subscribes to the leg after it and reads its state (a 180 that came first)."""

    def respond(method: str, path: str, params: dict[str, Any]) -> Any:
        if method == "GET" and path == "/channels/cbleg-1":
            return {"id": "cbleg-1", "state": "Ringing"}
        return {}

    adapter, events = adapter_with(respond)
    await adapter.originate("cbleg-1", TARGET, caller_number="+3120", ring_timeout=5)
    requests = adapter.ari.requests  # type: ignore[attr-defined]
    assert [(m, p) for m, p, _ in requests] == [
        ("POST", "/channels"),
        ("POST", "/applications/callbridge/subscription"),
        ("GET", "/channels/cbleg-1"),
    ]
    originate = requests[0][2]
    assert (originate["context"], originate["extension"], originate["priority"]) == (
        "callbridge-leg",
        "s",
        1,
    )
    assert (originate["channelId"], originate["timeout"]) == ("cbleg-1", 5)
    assert requests[1][2] == {"eventSource": "channel:cbleg-1"}
    assert events == [LegRinging("cbleg-1")]


async def test_a_leg_gone_before_the_subscription_is_reported_from_its_record() -> None:
    def respond(method: str, path: str, params: dict[str, Any]) -> Any:
        if path.endswith("/subscription"):
            raise AriConflict(422, "Event source does not exist", method, path)
        if path == "/asterisk/variable" and method == "GET":
            return {"value": "17,486,Down,1796000000"}
        return {}

    adapter, events = adapter_with(respond)
    await adapter.originate("cbleg-1", TARGET, caller_number=None, ring_timeout=5)
    assert events == [LegFailed("cbleg-1", 17, None, 486, local=False)]
