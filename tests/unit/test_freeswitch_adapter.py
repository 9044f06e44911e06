"""The FreeSWITCH adapter against the capture-built fake event socket: event mapping, the
command lines it sends (quoting, originate variables), resync, trunks, raw media."""

from __future__ import annotations

import asyncio
import grp
import inspect
import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from bridge.calls.outcomes import classify_leg_failure
from bridge.config import FreeswitchSettings
from bridge.errors import PbxCommandFailed
from bridge.media.rtp import MediaClock, RtpStream
from bridge.pbx.freeswitch import events as fse
from bridge.pbx.freeswitch.adapter import FreeswitchAdapter, _vars
from bridge.pbx.freeswitch.esl_protocol import EslEvent
from bridge.pbx.freeswitch.gateways import dial_string, gateway_xml
from bridge.pbx.ports import (
    CallArrived,
    CallMissed,
    ChannelGone,
    ChannelHungUp,
    ConnectionLost,
    ConnectionRestored,
    DialTarget,
    DtmfReceived,
    ExtensionState,
    LegAnswered,
    LegFacts,
    LegFailed,
    LegOutcome,
    LegProgress,
    LegRinging,
    MediaAddress,
    PbxAdapter,
    PbxEvent,
    TrunkSpec,
)
from bridge.trunks.reconciler import TrunkReconciler
from tests.support.daemon import wait_for
from tests.support.esl_server import DATA_DIR, FakeEslServer, capture_events, capture_messages
from tests.support.ports import unicast_ports
from tests.support.tcp_proxy import TcpProxy

TRUNK = TrunkSpec("t1", "127.0.0.1", 5090, "udp", "user", "p&ss<word>", False)


class Sink:
    def __init__(self) -> None:
        self.events: list[PbxEvent] = []

    async def __call__(self, event: PbxEvent) -> None:
        self.events.append(event)

    async def wait(self, kind: type, channel: str | None = None, timeout: float = 5) -> PbxEvent:
        async with asyncio.timeout(timeout):
            while True:
                for e in self.events:
                    if isinstance(e, kind) and (channel is None or e.channel_id == channel):
                        return e
                await asyncio.sleep(0.01)


async def unicast_started(server: FakeEslServer, uuid: str) -> None:
    """FreeSWITCH answers the unicast sendmsg before its park loop opens the socket (the
    fake too): wait for the socket instead of reading it on the reply (on uvloop it opens
    a few turns of the loop later)."""
    await wait_for(lambda: server.channels[uuid].media is not None, "unicast started", 2)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[FakeEslServer]:
    srv = FakeEslServer("pw")
    await srv.start()
    srv.gateway_dir = tmp_path / "gw"
    yield srv
    await srv.stop()


async def _adapter(
    port: int, sink: Sink, gateway_dir: Path | None = None, **kw: object
) -> FreeswitchAdapter:
    adapter = FreeswitchAdapter(
        "127.0.0.1",
        port,
        "pw",
        gateway_dir=gateway_dir,
        unicast_ports=unicast_ports(25000),
        client_options={"backoff_initial": 0.05, "backoff_max": 0.2},
        **kw,  # type: ignore[arg-type]
    )
    await adapter.start(sink)
    await sink.wait(ConnectionRestored)
    return adapter


@pytest.fixture
async def parts(
    server: FakeEslServer, tmp_path: Path
) -> AsyncIterator[tuple[FakeEslServer, FreeswitchAdapter, Sink]]:
    sink = Sink()
    adapter = await _adapter(server.port, sink, tmp_path / "gw")
    yield server, adapter, sink
    await adapter.stop()


# --- pure mapping ------------------------------------------------------------------------------


def test_outcomes_from_captured_hangups() -> None:
    for name, outcome, sip in (
        ("busy", LegOutcome.BUSY, 486),
        ("decline", LegOutcome.DECLINED, 603),
        ("noanswer", LegOutcome.NO_ANSWER, None),
    ):
        hangup = next(e for e in capture_events(f"originate_{name}") if e.name == "CHANNEL_HANGUP")
        assert fse.sip_code(hangup) == sip
        failed = LegFailed("cbleg-1", fse.q850(hangup), hangup.get("Hangup-Cause"), sip)
        assert classify_leg_failure(failed, rang=True, progressed=False)[0] is outcome
    gateway = LegFailed("cbleg-1", None, "INVALID_GATEWAY", None)
    assert classify_leg_failure(gateway, rang=False, progressed=False)[0] is LegOutcome.FAILED
    other = LegFailed("cbleg-1", None, "SOMETHING_ELSE", None)
    assert classify_leg_failure(other, rang=False, progressed=False)[0] is LegOutcome.FAILED


def test_captured_park_is_an_arrival_and_legs_are_not() -> None:
    park = next(e for e in capture_events("inbound_call_park") if e.name == "CHANNEL_PARK")
    arrived = fse.arrival(park)
    assert arrived is not None and arrived.called_number == "1000"
    assert arrived.variables == {"callbridge": "1"}
    leg = EslEvent({**park.headers, "Unique-ID": "cbleg-x"})
    assert fse.arrival(leg) is None
    unmarked = EslEvent({k: v for k, v in park.headers.items() if k != "variable_callbridge"})
    assert fse.arrival(unmarked) is None


def test_job_failure_names_the_leg() -> None:
    job = EslEvent(
        {"Event-Name": "BACKGROUND_JOB", "Job-Command": "originate",
         "Job-Command-Arg": "{origination_uuid=cbleg-1,originate_timeout=5}sofia/x/1 &park()"},
        "-ERR INVALID_GATEWAY\n",
    )  # fmt: skip
    assert fse.originated_leg(job) == "cbleg-1"
    assert fse.job_failure(job) == "INVALID_GATEWAY"


def test_gateway_xml_escapes_and_dial_strings() -> None:
    xml = gateway_xml(TRUNK)
    assert '<gateway name="cb-trunk-t1">' in xml
    assert 'value="p&amp;ss&lt;word&gt;"' in xml
    assert 'name="register" value="false"' in xml
    assert dial_string(DialTarget(number="+316", trunk_id="t1"), "p") == (
        "sofia/gateway/cb-trunk-t1/+316"
    )
    assert dial_string(DialTarget(sip_uri="sip:bob@example.org"), "p") == "sofia/p/bob@example.org"
    with pytest.raises(ValueError):
        dial_string(DialTarget(sip_uri="sip:a@b}&bridge(x)"), "p")
    with pytest.raises(ValueError):
        gateway_xml(TrunkSpec("../x", "h", 5060, "udp", None, None, False))


def test_originate_variables_are_escaped() -> None:
    assert _vars({"a": "1,2", "b": "x y"}) == "a=1\\,2,b='x y'"
    with pytest.raises(ValueError):
        _vars({"a": "it's"})


# --- against the fake event socket ----------------------------------------------------------


async def test_arrival_answer_media_and_hangup(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    server, adapter, sink = parts
    uuid = await server.call_arrives("+31201234567", "+31600000000", caller_name="Ann")
    arrived = await sink.wait(CallArrived, uuid)
    assert isinstance(arrived, CallArrived)
    assert (arrived.called_number, arrived.caller_number) == ("+31201234567", "+31600000000")
    await adapter.answer(uuid)

    heard: list[bytes] = []
    spoke = asyncio.Event()

    def on_audio(pcm: bytes) -> None:
        heard.append(pcm)
        spoke.set()

    clock = MediaClock()
    stream = RtpStream("ulaw", on_audio=on_audio)
    host, port = await stream.open("127.0.0.1", clock)
    remote = await adapter.attach_media(uuid, MediaAddress(host, port), "ulaw")
    assert (remote.framing, remote.codec) == ("raw", "slin_le")
    assert server.crashes == [], "unicast was sent into a park that began without media"
    assert f"uuid_transfer {uuid} park inline" in " ".join(server.commands)
    await unicast_started(server, uuid)  # frames sent before the socket opens are lost
    stream.set_remote(remote.host, remote.port, framing=remote.framing, codec=remote.codec)

    tone = (np.sin(np.arange(1600) / 8000 * 2 * np.pi * 440) * 8000).astype("<i2").tobytes()
    await stream.play(tone).done  # paced 20 ms frames, raw L16 LE to FreeSWITCH's port
    chan = server.channels[uuid]
    silence = bytes(320)  # what the stream sends while nothing is queued

    def spoken() -> bytes:
        return b"".join(f for f in chan.media_in if f != silence)

    await wait_for(lambda: spoken() == tone, "the tone at FreeSWITCH's unicast port", 2)
    assert {len(f) for f in chan.media_in} == {320}
    server.send_media(uuid, tone[:320])  # the caller speaks
    await asyncio.wait_for(spoke.wait(), 2)
    assert heard == [tone[:320]]

    await server.hangup(uuid)
    hung = await sink.wait(ChannelHungUp, uuid)
    assert isinstance(hung, ChannelHungUp) and hung.cause == 16
    with pytest.raises(ChannelGone):
        await adapter.answer(uuid)
    stream.close()
    await clock.close()


async def test_media_attached_again_gets_a_fresh_park(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    """A second attach (after a daemon restart, or a new media socket) must not land in a
    park that already has unicast: FreeSWITCH would keep the old connection."""
    server, adapter, _ = parts
    uuid = await server.call_arrives(answered=True)
    first = await adapter.attach_media(uuid, MediaAddress("127.0.0.1", 40001), "ulaw")
    second = await adapter.attach_media(uuid, MediaAddress("127.0.0.1", 40002), "ulaw")
    assert first.port == second.port
    await unicast_started(server, uuid)
    assert server.unicast_ignored == [] and server.crashes == []
    assert server.channels[uuid].media is not None
    assert server.channels[uuid].media.remote == ("127.0.0.1", 40002)
    assert server.commands.count(f"api uuid_transfer {uuid} park inline") == 2


async def test_ringback_is_quoted_gentones_and_stops(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    server, adapter, _ = parts
    uuid = await server.call_arrives(answered=True)
    playback = "cbring-t1"
    await adapter.play_tone(uuid, "ring", playback)
    assert server.channels[uuid].variables["callbridge_tone"] == "cbring-t1"
    line = next(c for c in server.commands if c.startswith("api uuid_broadcast"))
    assert line == f"api uuid_broadcast {uuid} 'gentones::%(2000,4000,440,480)|-1' aleg"
    chan = server.channels[uuid]
    await wait_for(lambda: chan.playback is not None, "the tone to start", 2)
    assert chan.hearing_tone
    await adapter.stop_playback(playback)
    assert f"api uuid_break {uuid} all" in server.commands
    await wait_for(lambda: chan.playback is None, "the tone to stop", 2)
    assert not chan.hearing_tone and "callbridge_tone" not in chan.variables


@pytest.mark.parametrize(
    ("outcome", "expected", "sip"),
    [("busy", LegOutcome.BUSY, 486), ("noanswer", LegOutcome.NO_ANSWER, None),
     ("decline", LegOutcome.DECLINED, 603)],
)  # fmt: skip
async def test_originate_outcomes(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
    outcome: str,
    expected: LegOutcome,
    sip: int | None,
) -> None:
    server, adapter, sink = parts
    server.set_originate_outcome("5555", outcome)
    await adapter.originate(
        "cbleg-1", DialTarget(sip_uri="sip:5555@h:5090"), caller_number="+31", ring_timeout=3
    )
    failed = await sink.wait(LegFailed, "cbleg-1")
    assert isinstance(failed, LegFailed)
    outcome_seen = classify_leg_failure(failed, rang=True, progressed=False)[0]
    assert (outcome_seen, failed.sip_code) == (expected, sip)
    assert len([e for e in sink.events if isinstance(e, LegFailed)]) == 1  # job not doubled
    line = next(c for c in server.commands if c.startswith("bgapi originate"))
    assert line.startswith("bgapi originate {origination_uuid=cbleg-1,originate_timeout=3,")
    assert "origination_caller_id_number=+31" in line and line.endswith(" &park()")


async def test_answered_leg_is_bridged_and_its_hangup_reported(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    server, adapter, sink = parts
    uuid = await server.call_arrives(answered=True)
    await sink.wait(CallArrived, uuid)
    await adapter.originate(
        "cbleg-2", DialTarget(sip_uri="sip:5555@h"), caller_number=None, ring_timeout=5
    )
    await sink.wait(LegRinging, "cbleg-2")
    await sink.wait(LegAnswered, "cbleg-2")
    await adapter.connect(uuid, "cbleg-2")
    assert server.channels[uuid].bridged_with == "cbleg-2"
    assert f"api uuid_setvar {uuid} park_after_bridge true" in server.commands
    await server.hangup("cbleg-2")
    await sink.wait(ChannelHungUp, "cbleg-2")
    # Hand back (issue 9 §5): the caller is parked, not hung up with the destination; the
    # call service decides (back to the assistant, or hang up).
    caller = server.channels[uuid]
    assert caller.up and caller.bridged_with is None and caller.park_has_media
    assert not [e for e in sink.events if isinstance(e, ChannelHungUp) and e.channel_id == uuid]
    # Its park is not a new arrival (a call ended meanwhile must not be adopted again), and
    # the caller held in park has a lease again.
    await wait_for(
        lambda: any(c.startswith(f"api sched_transfer +30 {uuid} s XML") for c in server.commands),
        "the caller's lease after the bridge",
    )
    assert len([e for e in sink.events if isinstance(e, CallArrived)]) == 1


async def test_unknown_gateway_fails_from_the_job_result(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    _, adapter, sink = parts
    await adapter.originate(
        "cbleg-3", DialTarget(number="+316", trunk_id="nope"), caller_number=None, ring_timeout=5
    )
    failed = await sink.wait(LegFailed, "cbleg-3")
    assert isinstance(failed, LegFailed)
    outcome_seen = classify_leg_failure(failed, rang=False, progressed=False)[0]
    assert outcome_seen is LegOutcome.FAILED  # a local fault, not the destination's
    assert failed.cause_text == "INVALID_GATEWAY"


async def test_trunk_provisioning_writes_a_gateway_and_rescans(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink], tmp_path: Path
) -> None:
    server, adapter, _ = parts
    await adapter.provision_trunk(TRUNK)
    path = tmp_path / "gw" / "cb-trunk-t1.xml"
    assert path.read_text() == gateway_xml(TRUNK)
    assert path.stat().st_mode & 0o777 == 0o640  # FreeSWITCH's group can read it
    assert "cb-trunk-t1" in server.gateways
    assert server.commands.count("api reloadxml") == 1
    await adapter.provision_trunk(TRUNK)  # unchanged and loaded: left alone (no re-REGISTER)
    assert server.commands.count("api reloadxml") == 1
    await adapter.remove_trunk("t1")
    assert not path.exists() and "cb-trunk-t1" not in server.gateways


async def test_blind_transfer_and_fallback_unmark_the_caller(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    server, adapter, _ = parts
    uuid = await server.call_arrives(answered=True)
    await adapter.blind_transfer(uuid, DialTarget(sip_uri="sip:bob@h"), 20)
    chan = server.channels[uuid]
    assert chan.variables["callbridge_dial"] == "sofia/callbridge/bob@h"
    assert chan.variables["callbridge_ring_timeout"] == "20"
    assert "callbridge" not in chan.variables  # a resync will not adopt it again
    assert chan.variables["transfer_destination"] == "s XML callbridge-blind-transfer"
    other = await server.call_arrives(answered=True)
    await adapter.continue_in_dialplan(other, "callbridge-fallback", "+3120")
    assert server.channels[other].variables["transfer_destination"] == (
        "+3120 XML callbridge-fallback"
    )


async def test_reconnect_resyncs_callers_and_legs(server: FakeEslServer) -> None:
    proxy = await TcpProxy("127.0.0.1", server.port).start()
    sink = Sink()
    adapter = await _adapter(proxy.port, sink)
    try:
        caller = await server.call_arrives(answered=True)
        await sink.wait(CallArrived, caller)
        await adapter.originate(
            "cbleg-4", DialTarget(sip_uri="sip:5555@h"), caller_number=None, ring_timeout=5
        )
        await sink.wait(LegAnswered, "cbleg-4")
        handed = await server.call_arrives(answered=True)
        await adapter.continue_in_dialplan(handed, "elsewhere", "1")
        sink.events.clear()
        proxy.cut()
        await sink.wait(ConnectionLost)
        gone = await server.call_arrives(answered=True)  # arrives and leaves unseen
        await server.hangup(gone)
        late = await server.call_arrives(answered=True)  # arrives unseen, still parked
        proxy.restore()
        restored = await sink.wait(ConnectionRestored)
        assert isinstance(restored, ConnectionRestored)
        assert {c.channel_id for c in restored.callers} == {caller, late}
        assert restored.legs == (("cbleg-4", True),)
    finally:
        await adapter.stop()
        await proxy.close()


async def test_heartbeat_for_the_dialplan_hook(server: FakeEslServer) -> None:
    sink = Sink()
    adapter = await _adapter(server.port, sink, heartbeat_interval=0.05)
    try:

        def beats() -> list[str]:
            return [c for c in server.commands if "global_setvar callbridge_seen" in c]

        await wait_for(lambda: len(beats()) >= 3, "three heartbeats", 2)
        assert beats()[0] == "api expand global_setvar callbridge_seen=${strepoch()}"
    finally:
        await adapter.stop()


async def test_raw_framing_sends_bare_payloads() -> None:
    got: list[bytes] = []

    class Peer(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            got.append(data)

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    clock = MediaClock()
    stream = RtpStream("ulaw")
    await stream.open("127.0.0.1", clock)
    stream.set_remote(*transport.get_extra_info("sockname")[:2], framing="raw", codec="slin_le")
    pcm = bytes(range(256)) * 5  # 1280 bytes: 4 frames
    assert await stream.play(pcm).done
    expected = [pcm[i : i + 320] for i in range(0, 1280, 320)]
    await wait_for(lambda: bytes(320) in got[4:], "the 4 frames, then silence (no gap)", 2)
    assert [f for f in got if f != bytes(320)] == expected
    with pytest.raises(ValueError):
        stream.set_remote("127.0.0.1", 1, framing="srtp")
    stream.close()
    transport.close()
    await clock.close()


# --- the whole port ----------------------------------------------------------------------------


def _port_verbs() -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(fn)
        for name, fn in inspect.getmembers(PbxAdapter, inspect.isfunction)
        if not name.startswith("_")
    }


def test_adapter_implements_every_verb_of_the_pbx_port() -> None:
    """Statically: each verb of PbxAdapter exists, is a coroutine and takes the same
    parameters (names, kinds; extra ones only with defaults). `release` was missing once."""
    verbs = _port_verbs()
    assert {"release", "play_tone", "stop_playback", "originate"} <= set(verbs)
    for name, proto in verbs.items():
        impl = getattr(FreeswitchAdapter, name, None)
        assert impl is not None, f"FreeswitchAdapter has no {name}()"
        assert inspect.iscoroutinefunction(impl), name
        have = inspect.signature(impl).parameters
        for pname, param in proto.parameters.items():
            assert pname in have, f"{name}() lacks parameter {pname}"
            assert have[pname].kind == param.kind, f"{name}({pname}) kind differs"
        for pname in set(have) - set(proto.parameters):
            assert have[pname].default is not inspect.Parameter.empty, f"{name}({pname})"


async def test_every_verb_runs_against_the_fake(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    """Dynamically: every verb of the port, once, on the capture-built fake event socket."""
    server, adapter, sink = parts
    port: PbxAdapter = adapter  # the type checker's view of the same claim

    uuid = await server.call_arrives(answered=True)
    await sink.wait(CallArrived, uuid)
    await port.answer(uuid)
    await port.set_variable(uuid, "x", "y")
    await port.record_outcome(uuid, {"outcome": "answered", "transfer_id": "t1"})
    assert f"api uuid_setvar {uuid} callbridge_outcome answered" in server.commands
    await port.attach_media(uuid, MediaAddress("127.0.0.1", 40011), "ulaw")
    await port.play_tone(uuid, "ring", "cbring-v")
    await port.stop_playback("cbring-v")
    await port.originate(
        "cbleg-v", DialTarget(sip_uri="sip:1@h"), caller_number="1", ring_timeout=5
    )
    await sink.wait(LegAnswered, "cbleg-v")
    await port.send_dtmf("cbleg-v", "w1#")
    assert "api uuid_send_dtmf cbleg-v w1#" in server.commands
    # warm transfer (issue 9 §2): hold music, the brief's media on the leg alone
    await port.start_hold(uuid, "moh")
    assert f"api uuid_broadcast {uuid} 'playback::local_stream://moh' aleg" in server.commands
    await port.attach_media("cbleg-v", MediaAddress("127.0.0.1", 40013), "ulaw")
    await unicast_started(server, "cbleg-v")
    assert not server.crashes
    await port.end_brief("cbleg-v")
    await port.stop_hold(uuid)
    await port.connect(uuid, "cbleg-v")
    await port.detach_media(uuid)
    await port.unbridge(uuid, "cbleg-v")  # hand back (issue 9 §5)
    await port.hangup("cbleg-v")
    await port.release(uuid)
    other = await server.call_arrives(answered=True)
    await port.blind_transfer(other, DialTarget(sip_uri="sip:bob@h"), 20)
    third = await server.call_arrives(answered=True)
    await port.continue_in_dialplan(third, "callbridge-fallback", "1")
    assert await port.extension_state("1001") is ExtensionState.OFFLINE
    server.register_user("1001")
    assert await port.extension_state("1001") is ExtensionState.AVAILABLE
    await port.provision_trunk(TRUNK)
    assert await port.provisioned_trunks() == {"t1"}
    await port.remove_trunk("t1")
    assert await port.provisioned_trunks() == set()
    called = {
        "answer", "set_variable", "attach_media", "play_tone", "stop_playback", "originate",
        "connect", "detach_media", "hangup", "release", "blind_transfer",
        "continue_in_dialplan", "provision_trunk", "provisioned_trunks", "remove_trunk",
        "record_outcome", "send_dtmf", "unbridge", "extension_state",
        "start_hold", "stop_hold", "end_brief", "start", "stop",  # by the fixture
    }  # fmt: skip
    assert set(_port_verbs()) <= called


async def test_extension_state_from_registration_and_channels(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    """Issue 9 §3: `sofia_contact` says offline or registered; a channel whose presence_id is
    the user's (the directory's dial-string sets it on `user/` calls) says busy."""
    server, adapter, sink = parts
    assert await adapter.extension_state("2002") is ExtensionState.OFFLINE
    assert "api sofia_contact 2002" in server.commands
    server.register_user("2002")
    assert await adapter.extension_state("2002") is ExtensionState.AVAILABLE
    await adapter.originate(
        "cbleg-busy", DialTarget(endpoint="2002"), caller_number="1", ring_timeout=5
    )
    await sink.wait(LegAnswered, "cbleg-busy")
    assert await adapter.extension_state("2002") is ExtensionState.BUSY
    await adapter.hangup("cbleg-busy")
    await wait_for(lambda: "cbleg-busy" not in server.channels, "the leg gone")
    assert await adapter.extension_state("2002") is ExtensionState.AVAILABLE


async def test_release_frees_what_the_adapter_made_for_the_call(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    server, adapter, sink = parts
    uuid = await server.call_arrives(answered=True)
    await sink.wait(CallArrived, uuid)
    assert server.hash[f"callbridge_owner_{uuid}"] == adapter.instance
    await adapter.attach_media(uuid, MediaAddress("127.0.0.1", 40021), "ulaw")
    await adapter.play_tone(uuid, "ring", "cbring-r")
    await adapter.release(uuid)
    assert adapter._media == {} and adapter._tones == {} and uuid not in adapter._callers
    assert f"callbridge_owner_{uuid}" not in server.hash  # our claim is given back
    await adapter.release(uuid)  # twice, or for a caller already gone: no error


# --- ringback: the fast-failure race ------------------------------------------------------------


async def test_fake_reproduces_the_queued_broadcast_race(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    """What 1.10.12 does: a plain `uuid_break` right after `uuid_broadcast` stops nothing
    (the broadcast is still queued) and the tone then rings on."""
    server, adapter, _ = parts
    uuid = await server.call_arrives(answered=True)
    chan = server.channels[uuid]
    await adapter.client.api(f"uuid_broadcast {uuid} 'gentones::%(2000,4000,440,480)|-1' aleg")
    await adapter.client.api(f"uuid_break {uuid}")
    await wait_for(lambda: chan.playback is not None, "the queued tone to start anyway", 2)
    assert chan.hearing_tone


async def test_tone_stopped_before_it_started_never_plays(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    """A transfer that fails within ~150 ms: stop_playback reaches FreeSWITCH while the
    ringback is still queued; `uuid_break ... all` flushes it, so it never starts."""
    server, adapter, _ = parts
    uuid = await server.call_arrives(answered=True)
    chan = server.channels[uuid]
    pid = "cbring-fast"
    await adapter.play_tone(uuid, "ring", pid)
    assert chan.queued and chan.playback is None  # queued, not started
    await adapter.stop_playback(pid)
    assert chan.queued == [] and chan.playback is None and not chan.hearing_tone


async def test_a_restarted_daemon_stops_the_tone_by_its_id(server: FakeEslServer) -> None:
    first_sink, second_sink = Sink(), Sink()
    first = await _adapter(server.port, first_sink, instance="cb1")
    uuid = await server.call_arrives(answered=True)
    await first_sink.wait(CallArrived, uuid)
    await first.play_tone(uuid, "ring", "cbring-t9")
    chan = server.channels[uuid]
    await wait_for(lambda: chan.playback is not None, "the tone to start", 2)
    await first.stop()  # the daemon dies; the caller stays parked, ringing
    second = await _adapter(server.port, second_sink, instance="cb1")
    try:
        restored = second_sink.events[0]
        assert isinstance(restored, ConnectionRestored)
        assert [c.channel_id for c in restored.callers] == [uuid]
        await second.stop_playback("cbring-t9")
        await wait_for(lambda: chan.playback is None, "the tone to stop", 2)
    finally:
        await second.stop()


# --- contract 1: leg facts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "cause", "cause_text", "sip"),
    [("busy", 17, "USER_BUSY", 486), ("decline", 21, "CALL_REJECTED", 603),
     ("noanswer", 19, "NO_ANSWER", None), ("unreachable", 1, "UNALLOCATED_NUMBER", 404)],
)  # fmt: skip
async def test_failed_legs_report_raw_facts(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
    outcome: str,
    cause: int,
    cause_text: str,
    sip: int | None,
) -> None:
    server, adapter, sink = parts
    server.set_originate_outcome("5555", outcome)
    await adapter.originate(
        "cbleg-f", DialTarget(sip_uri="sip:5555@h"), caller_number=None, ring_timeout=5
    )
    failed = await sink.wait(LegFailed, "cbleg-f")
    assert isinstance(failed, LegFailed)
    assert (failed.cause, failed.cause_text, failed.sip_code) == (cause, cause_text, sip)
    assert [e for e in sink.events if isinstance(e, LegFailed)] == [failed]  # once


async def test_early_media_without_ring_is_progress_not_ringing(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    server, adapter, sink = parts
    server.set_originate_outcome("5555", "early_media")
    await adapter.originate(
        "cbleg-e", DialTarget(sip_uri="sip:5555@h"), caller_number=None, ring_timeout=5
    )
    await sink.wait(LegProgress, "cbleg-e")
    kinds = [type(e).__name__ for e in sink.events if e.channel_id == "cbleg-e"]
    assert kinds == ["LegProgress"]


async def test_a_real_ring_is_ringing(parts: tuple[FakeEslServer, FreeswitchAdapter, Sink]) -> None:
    server, adapter, sink = parts
    server.set_originate_outcome("5555", "noanswer")
    await adapter.originate(
        "cbleg-g", DialTarget(sip_uri="sip:5555@h"), caller_number=None, ring_timeout=5
    )
    await sink.wait(LegFailed, "cbleg-g")
    kinds = [type(e).__name__ for e in sink.events if e.channel_id == "cbleg-g"]
    assert kinds == ["LegRinging", "LegFailed"]


async def test_local_failures_are_marked_local(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    server, adapter, sink = parts
    await adapter.originate(
        "cbleg-l", DialTarget(number="+316", trunk_id="missing"), caller_number=None, ring_timeout=5
    )
    failed = await sink.wait(LegFailed, "cbleg-l")
    assert isinstance(failed, LegFailed)
    assert (failed.cause, failed.cause_text, failed.sip_code) == (None, "INVALID_GATEWAY", None)
    assert failed.local is True  # type: ignore[attr-defined]
    server.set_originate_outcome("5555", "busy")
    await adapter.originate(
        "cbleg-m", DialTarget(sip_uri="sip:5555@h"), caller_number=None, ring_timeout=5
    )
    busy = await sink.wait(LegFailed, "cbleg-m")
    assert busy.local is False  # type: ignore[attr-defined]


def test_q850_numbers_only_for_q850_causes() -> None:
    assert fse.Q850["USER_BUSY"] == 17 and fse.Q850["INTERWORKING"] == 127
    assert "ORIGINATOR_CANCEL" not in fse.Q850 and "INVALID_GATEWAY" not in fse.Q850
    hangup = EslEvent({"Hangup-Cause": "INVALID_GATEWAY", "variable_hangup_cause_q850": "808"})
    assert fse.q850(hangup) is None
    assert fse.is_local("GATEWAY_DOWN") and not fse.is_local("USER_BUSY")


# --- trunks: permissions, and what the PBX has ------------------------------------------------


async def test_gateway_file_owner_group_and_mode_are_configurable(
    server: FakeEslServer, tmp_path: Path
) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    sink = Sink()
    adapter = await _adapter(
        server.port, sink, tmp_path / "gw", gateway_mode=0o660, gateway_group=group
    )
    try:
        await adapter.provision_trunk(TRUNK)
        st = (tmp_path / "gw" / "cb-trunk-t1.xml").stat()
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, os.getgid())
        assert "cb-trunk-t1" in server.gateways
    finally:
        await adapter.stop()
    with pytest.raises(ValueError, match="trunk passwords"):
        FreeswitchSettings(gateway_mode=0o644)
    assert FreeswitchSettings().gateway_mode == 0o640
    with pytest.raises(ValueError):
        FreeswitchAdapter("h", 1, "p", gateway_dir=tmp_path, gateway_mode=0o604)


async def test_unknown_gateway_group_is_a_typed_error(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink], tmp_path: Path
) -> None:
    _, adapter, _ = parts
    assert adapter.gateways is not None
    adapter.gateways.group = "no-such-group-cb"
    with pytest.raises(PbxCommandFailed, match="no-such-group-cb"):
        await adapter.provision_trunk(TRUNK)


async def test_trunks_deleted_while_disconnected_are_removed_on_connect(
    server: FakeEslServer, tmp_path: Path
) -> None:
    """The PBX-neutral trunk reconciler (bridge.trunks) on the FreeSWITCH adapter: a gateway
    whose trunk was deleted while the daemon was away is removed on the next connect."""
    gw = tmp_path / "gw"

    async def trunks() -> list[TrunkSpec]:
        return [TRUNK]  # "old" is no longer in the directory

    adapter = await _adapter(server.port, Sink(), gw)
    await adapter.provision_trunk(TrunkSpec("old", "10.0.0.1", 5060, "udp", "u", "pw", True))
    await adapter.stop()
    assert (gw / "cb-trunk-old.xml").exists()
    reconciler: TrunkReconciler | None = None

    def connected() -> None:
        assert reconciler is not None
        reconciler.kick()

    second = FreeswitchAdapter(
        "127.0.0.1",
        server.port,
        "pw",
        gateway_dir=gw,
        unicast_ports=unicast_ports(25000),
        client_options={"backoff_initial": 0.05, "backoff_max": 0.2},
        on_connected=connected,
    )
    reconciler = TrunkReconciler(second, trunks)
    await second.start(Sink())
    try:
        await asyncio.wait_for(reconciler.settled.wait(), 10)
        assert await second.provisioned_trunks() == {"t1"}
        assert not (gw / "cb-trunk-old.xml").exists()
        assert "cb-trunk-old" not in server.gateways
        assert "api sofia profile callbridge killgw cb-trunk-old" in server.commands
    finally:
        await reconciler.close()
        await second.stop()


# --- no caller waits for a dead daemon; one daemon per caller ----------------------------------


async def test_live_daemon_claims_the_caller_in_the_take_guard(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    """The daemon claims the caller as the hook's `sleep` starts and breaks it: the caller is
    parked for it at once and never reaches the fallback."""
    server, adapter, sink = parts
    uuid = await server.hook_call("+31201234567")
    await sink.wait(CallArrived, uuid)
    chan = server.channels[uuid]
    await asyncio.wait_for(chan.guard_over.wait(), 5)
    assert chan.guard_broken  # ended by the daemon's uuid_break, not by running out
    assert f"api hash insert_ifempty/callbridge_owner/{uuid}/{adapter.instance}" in server.commands
    assert f"api uuid_break {uuid}" in server.commands
    assert server.hash[f"callbridge_owner_{uuid}"] == adapter.instance  # the hook's insert lost
    assert not chan.fallback
    [lease] = server.scheduled[uuid]  # a caller taken has its 30 s lease
    assert lease.when() - asyncio.get_running_loop().time() > 20
    assert f"api sched_transfer +30 {uuid} +31201234567 XML callbridge-fallback" in server.commands


async def test_caller_of_a_dead_daemon_reaches_the_fallback_within_2s(
    server: FakeEslServer,
) -> None:
    """Nobody claims the caller: the hook's sleep runs its 1000 ms out, the hook's own
    `insert_ifempty ... fallback` wins and callbridge-take sends the caller on."""
    server.heartbeat_max = 3.0
    sink = Sink()
    adapter = await _adapter(server.port, sink)
    await adapter.stop()  # the daemon dies (its heartbeat is still fresh)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    uuid = await server.hook_call("+31201234567")
    chan = server.channels[uuid]
    await wait_for(lambda: chan.fallback, "the caller to reach the fallback", 2.5)
    assert chan.fallback_at is not None
    assert server.take_guard_ms / 1000 <= chan.fallback_at - t0 <= 2.0
    assert not chan.guard_broken and server.hash[f"callbridge_owner_{uuid}"] == "fallback"
    assert "callbridge" not in chan.variables  # no later resync adopts it
    server.heartbeat_at = loop.time() - 10  # long dead: the hook does not even wait
    late = await server.hook_call("+31201234567")
    assert server.channels[late].fallback


async def test_caller_sent_to_the_fallback_is_not_taken_by_a_late_daemon(
    server: FakeEslServer,
) -> None:
    server.take_guard_ms = 40
    uuid = await server.hook_call("+31201234567")
    await wait_for(lambda: server.channels[uuid].fallback, "the guard to run out", 2)
    server.channels[uuid].variables["callbridge"] = "1"  # even if still marked
    sink = Sink()
    adapter = await _adapter(server.port, sink)
    try:
        missed, restored = sink.events[:2]
        assert isinstance(missed, CallMissed) and missed.channel_id == uuid  # recorded only
        assert isinstance(restored, ConnectionRestored) and restored.callers == ()
        assert server.hash[f"callbridge_owner_{uuid}"] == "fallback"
        assert f"api uuid_break {uuid}" not in server.commands
    finally:
        await adapter.stop()


async def test_a_claim_too_late_for_the_take_guard_leaves_the_caller_to_the_fallback(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    """The race, one side: the daemon's claim reaches FreeSWITCH after the hook's (its event
    loop ran late): the fallback owns the caller, the daemon records it as missed and
    neither breaks nor parks it."""
    server, adapter, sink = parts
    server.take_guard_ms = 100
    claim = adapter._claim

    async def late_claim(uuid: str) -> bool | None:
        await server.channels[uuid].guard_over.wait()
        return await claim(uuid)

    adapter._claim = late_claim  # type: ignore[method-assign]
    uuid = await server.hook_call("+31201234567")
    missed = await sink.wait(CallMissed, uuid)
    assert missed.channel_id == uuid
    assert server.channels[uuid].fallback
    assert server.hash[f"callbridge_owner_{uuid}"] == "fallback"
    assert not any(
        isinstance(e, CallArrived) and not isinstance(e, CallMissed) for e in sink.events
    )
    assert f"api uuid_break {uuid}" not in server.commands


async def test_a_claim_whose_break_comes_after_the_guard_ran_out_keeps_the_caller(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    """The race, other side: the daemon inserted first but its `uuid_break` arrives after the
    sleep ran out: the hook's insert finds the key taken, callbridge-take parks the caller
    for the daemon. Never both, never neither."""
    server, adapter, sink = parts
    server.take_guard_ms = 100
    end_guard = adapter._end_take_guard

    async def late_break(uuid: str) -> None:
        await server.channels[uuid].guard_over.wait()
        await end_guard(uuid)

    adapter._end_take_guard = late_break  # type: ignore[method-assign]
    uuid = await server.hook_call("+31201234567")
    await sink.wait(CallArrived, uuid)
    chan = server.channels[uuid]
    assert not chan.guard_broken and not chan.fallback
    assert server.hash[f"callbridge_owner_{uuid}"] == adapter.instance
    assert not any(isinstance(e, CallMissed) for e in sink.events)


async def test_a_daemon_connecting_during_the_take_guard_claims_the_caller(
    server: FakeEslServer,
) -> None:
    """A caller found in the hook's sleep by a (re)connecting daemon's resync is claimed the
    same way (claim, uuid_break); its CHANNEL_PARK is then its arrival, like any other."""
    server.take_guard_ms = 60_000  # the guard must not decide first
    uuid = await server.hook_call("+31201234567")
    chan = server.channels[uuid]
    sink = Sink()
    adapter = await _adapter(server.port, sink, instance="cb1")
    try:
        restored = next(e for e in sink.events if isinstance(e, ConnectionRestored))
        assert restored.callers == ()  # not parked yet: the arrival follows
        await sink.wait(CallArrived, uuid)
        await asyncio.wait_for(chan.guard_over.wait(), 5)
        assert chan.guard_broken and not chan.fallback
        assert server.hash[f"callbridge_owner_{uuid}"] == "cb1"
        assert server.scheduled[uuid]  # leased like any caller taken
    finally:
        await adapter.stop()


def test_the_hook_s_own_claim_name_is_not_a_daemon_s() -> None:
    with pytest.raises(ValueError, match="fallback"):
        FreeswitchAdapter("127.0.0.1", 1, "pw", instance="fallback")


async def test_two_daemons_on_one_freeswitch_take_each_caller_once(
    server: FakeEslServer,
) -> None:
    sinks = [Sink(), Sink()]
    adapters = [
        await _adapter(server.port, sinks[0], instance="daemon-a"),
        await _adapter(server.port, sinks[1], instance="daemon-b"),
    ]
    try:
        uuids = [await server.hook_call("+31201234567") for _ in range(6)]
        for uuid in uuids:
            claims = f"/callbridge_owner/{uuid}/"

            def both_tried(c: str = claims) -> bool:
                return sum(c in line for line in server.commands) >= 2

            await wait_for(both_tried, "both daemons to try the claim", 5)
            await wait_for(
                lambda u=uuid: any(  # type: ignore[misc]
                    isinstance(e, CallArrived) and e.channel_id == u
                    for s in sinks
                    for e in s.events
                ),
                "one daemon to take the caller",
                5,
            )
        for uuid in uuids:
            takers = [
                i for i, s in enumerate(sinks)
                for e in s.events if isinstance(e, CallArrived) and e.channel_id == uuid
            ]  # fmt: skip
            assert len(takers) == 1, (uuid, takers)
            owner = server.hash[f"callbridge_owner_{uuid}"]
            assert owner == adapters[takers[0]].instance
        # A resync (reconnect) of the loser does not adopt the winner's callers.
        restored = await adapters[1]._resync()
        mine = {e.channel_id for e in sinks[1].events if isinstance(e, CallArrived)}
        assert {c.channel_id for c in restored.callers} == mine
    finally:
        for adapter in adapters:
            await adapter.stop()


async def test_lease_sends_the_callers_of_a_daemon_that_died_to_the_fallback(
    server: FakeEslServer,
) -> None:
    """A caller the daemon had taken must not wait in park forever either: the heartbeat
    keeps pushing its scheduled fallback transfer back; when the daemon dies, it runs."""
    sink = Sink()
    adapter = await _adapter(server.port, sink, lease_seconds=1, heartbeat_interval=0.1)
    uuid = await server.hook_call("+31201234567")
    await sink.wait(CallArrived, uuid)
    lease = f"api sched_transfer +1 {uuid} "
    renewed = len([c for c in server.commands if c.startswith(lease)])
    await wait_for(
        lambda: len([c for c in server.commands if c.startswith(lease)]) >= renewed + 3,
        "three renewals",
        5,
    )
    assert not server.channels[uuid].fallback  # renewed: a live daemon keeps its caller
    await adapter.stop()  # the daemon dies
    await wait_for(lambda: server.channels[uuid].fallback, "the lease to run out", 3)


async def test_bridged_caller_has_no_lease(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    server, adapter, sink = parts
    uuid = await server.hook_call("+31201234567")
    await sink.wait(CallArrived, uuid)
    assert server.scheduled[uuid]
    await adapter.originate(
        "cbleg-b", DialTarget(sip_uri="sip:5555@h"), caller_number=None, ring_timeout=5
    )
    await sink.wait(LegAnswered, "cbleg-b")
    await adapter.connect(uuid, "cbleg-b")
    assert uuid not in server.scheduled  # a lease would pull the caller out of the bridge
    await adapter._renew_leases()
    assert uuid not in server.scheduled
    restored = await adapter._resync()  # a restarted daemon does not lease it again
    assert uuid in {c.channel_id for c in restored.callers} and uuid not in server.scheduled


# --- the fake against the capture of issue 7's commands ------------------------------------


async def test_fake_answers_claims_schedules_and_breaks_as_captured(
    server: FakeEslServer,
) -> None:
    """tests/data/esl/claims_break_sched.txt (real 1.10.12): every `api` reply of the capture
    is what the fake answers to the same command, and the capture shows the race the fake
    models: after `uuid_broadcast` + plain `uuid_break` the tone still starts; after
    `uuid_broadcast` + `uuid_break all` it never does."""
    sent = [
        line[4:].strip()
        for line in (DATA_DIR / "claims_break_sched.txt").read_text("latin-1").splitlines()
        if line.startswith("# > ")
    ]
    messages = capture_messages("claims_break_sched")
    replies = [m.text() for m in messages if m.content_type == "api/response"]
    commands = [c[4:] for c in sent if c.startswith("api ")]
    assert len(replies) == len(commands)
    park = next(m.event() for m in messages if m.is_event and m.event().name == "CHANNEL_PARK")
    captured_uuid = park.unique_id or ""
    uuid = await server.call_arrives("1001", answered=True)
    for command, reply in zip(commands, replies, strict=True):
        got = await server.api(command.replace(captured_uuid, uuid))
        assert got == reply, command
    events = [m.event() for m in messages if m.is_event]
    started = [
        e for e in events if e.name == "CHANNEL_EXECUTE" and e.get("Application") == "gentones"
    ]
    assert len(started) == 1  # two broadcasts: only the one behind a plain uuid_break played


async def test_early_media_leg_stays_up_until_we_hang_it_up(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    """Seen on 1.10.12: `originate … &park()` to a far end that sends 183 with SDP and never
    180 succeeds on the early media (job `+OK <uuid>`), so `originate_timeout` no longer
    applies: the leg waits in park, unanswered, and only the call domain's ring timeout ends
    it. No LegAnswered, no LegFailed of its own."""
    server, adapter, sink = parts
    server.set_originate_outcome("5555", "early_media")
    await adapter.originate(
        "cbleg-em", DialTarget(sip_uri="sip:5555@h"), caller_number=None, ring_timeout=1
    )
    await wait_for(lambda: bool(sink.events), "the progress event", 2)
    leg = server.channels["cbleg-em"]
    assert leg.up and not leg.answered
    assert not any(isinstance(e, LegAnswered | LegFailed) for e in sink.events)
    await adapter.hangup("cbleg-em")
    failed = await sink.wait(LegFailed, "cbleg-em")
    assert isinstance(failed, LegFailed) and failed.cause_text == "NORMAL_CLEARING"


async def test_a_restarted_daemon_learns_whose_leg_it_finds(server: FakeEslServer) -> None:
    """Issue 7 section 3: a leg placed by a daemon that died before recording it is reported
    with the call and transfer it was placed for (its CALLBRIDGE_* variables), as dialled
    (originate is one request here)."""
    first_sink, second_sink = Sink(), Sink()
    first = await _adapter(server.port, first_sink, instance="cb1")
    await first.originate(
        "cbleg-t7",
        DialTarget(sip_uri="sip:5555@h"),
        caller_number=None,
        ring_timeout=30,
        variables={"CALLBRIDGE_CALL_ID": "call-7", "CALLBRIDGE_TRANSFER_ID": "t7"},
    )
    await first.stop()  # the daemon dies with the leg up or ringing
    second = await _adapter(server.port, second_sink, instance="cb1")
    try:
        restored = second_sink.events[0]
        assert isinstance(restored, ConnectionRestored)
        assert [leg for leg, _ in restored.legs] == ["cbleg-t7"]
        assert restored.leg_facts == (
            LegFacts("cbleg-t7", call_id="call-7", transfer_id="t7", dialled=True),
        )
    finally:
        await second.stop()


# --- claims of dead daemons (trust, issue 7) ------------------------------------------------


async def test_a_claim_is_deleted_when_its_call_ends(server: FakeEslServer) -> None:
    sink = Sink()
    adapter = await _adapter(server.port, sink, instance="cb1")
    try:
        uuid = await server.hook_call("+31201234567")
        await sink.wait(CallArrived, uuid)
        assert server.hash[f"callbridge_owner_{uuid}"] == "cb1"
        await server.hangup(uuid)
        await sink.wait(ChannelHungUp, uuid)
        await wait_for(lambda: f"callbridge_owner_{uuid}" not in server.hash, "claim deleted", 2)
    finally:
        await adapter.stop()


async def test_claims_of_calls_that_ended_while_no_daemon_watched_are_swept_at_connect(
    server: FakeEslServer,
) -> None:
    """A daemon that dies leaves its claims; the callers hang up meanwhile. The next daemon
    to connect (whatever its name) deletes the claims of calls that no longer exist, and
    keeps those of live calls (its own, and another live daemon's)."""
    dead_sink, other_sink, next_sink = Sink(), Sink(), Sink()
    dead = await _adapter(server.port, dead_sink, instance="dead")
    gone = await server.hook_call("+31201234567")
    await dead_sink.wait(CallArrived, gone)
    kept = await server.hook_call("+31201234567")
    await dead_sink.wait(CallArrived, kept)
    await dead.stop()  # dies: nobody deletes its claims when its callers leave
    await server.hangup(gone)
    assert f"callbridge_owner_{gone}" in server.hash
    other = await _adapter(server.port, other_sink, instance="other")
    try:
        assert f"callbridge_owner_{gone}" not in server.hash  # swept at its connect
        assert server.hash[f"callbridge_owner_{kept}"] == "dead"
        live_elsewhere = await server.hook_call("+31201234567")
        await other_sink.wait(CallArrived, live_elsewhere)
        server.hash["callbridge_owner_vanished-uuid"] = "someone"  # a call long gone
        following = await _adapter(server.port, next_sink, instance="next")
        try:
            assert "callbridge_owner_vanished-uuid" not in server.hash
            assert server.hash[f"callbridge_owner_{kept}"] == "dead"  # live: still claimed
            assert server.hash[f"callbridge_owner_{live_elsewhere}"] == "other"
        finally:
            await following.stop()
    finally:
        await other.stop()


async def test_no_claims_at_connect_is_not_a_failed_sweep(server: FakeEslServer) -> None:
    """Seen on a real 1.10.12 (leftovers): `hash_dump db callbridge_owner` with no claims
    answers `-ERR no reply` (the event socket's answer to an empty output, which the fake
    now gives too): nothing to sweep, not a warning at every connect."""
    from structlog.testing import capture_logs

    assert not server.hash
    sink = Sink()
    with capture_logs() as logs:
        adapter = await _adapter(server.port, sink, instance="cb1")
        try:
            assert "api hash_dump db callbridge_owner" in server.commands
        finally:
            await adapter.stop()
    assert [e for e in logs if e["event"] == "freeswitch.claim_sweep_failed"] == []


# --- hand back (issue 9 §5) -------------------------------------------------------------------


async def test_hand_back_takes_the_caller_out_of_the_bridge_and_hears_the_legs_digits(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    """The leg's DTMF reaches the daemon while bridged (the hand-back code); `unbridge`
    re-parks the caller (out of the bridge, fresh park, lease again), the leg hangs up, and
    `unicast` attaches again."""
    server, adapter, sink = parts
    uuid = await server.call_arrives(answered=True)
    await sink.wait(CallArrived, uuid)
    await adapter.attach_media(uuid, MediaAddress("127.0.0.1", 40013), "ulaw")
    await adapter.originate(
        "cbleg-hb", DialTarget(sip_uri="sip:1@h"), caller_number="1", ring_timeout=5
    )
    await sink.wait(LegAnswered, "cbleg-hb")
    await adapter.connect(uuid, "cbleg-hb")
    assert server.channels[uuid].bridged_with == "cbleg-hb"
    server.press_dtmf("cbleg-hb", "#")
    digit = await sink.wait(DtmfReceived, "cbleg-hb")
    assert isinstance(digit, DtmfReceived) and digit.digit == "#"
    await adapter.unbridge(uuid, "cbleg-hb")
    assert f"api uuid_transfer {uuid} park inline" in server.commands
    assert server.channels[uuid].bridged_with is None and server.channels[uuid].up
    await sink.wait(ChannelHungUp, "cbleg-hb")
    assert any(c.startswith(f"api sched_transfer +30 {uuid} s XML") for c in server.commands)
    await adapter.attach_media(uuid, MediaAddress("127.0.0.1", 40014), "ulaw")
    await unicast_started(server, uuid)


async def test_unbridge_of_a_caller_gone_is_channel_gone(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    server, adapter, sink = parts
    uuid = await server.call_arrives(answered=True)
    await sink.wait(CallArrived, uuid)
    await server.hangup(uuid)
    with pytest.raises(ChannelGone):
        await adapter.unbridge(uuid, "cbleg-none")


async def test_brief_media_on_a_leg_waits_for_its_park_after_the_answer(
    parts: tuple[FakeEslServer, FreeswitchAdapter, Sink],
) -> None:
    """Warm transfer (issue 9 §2): the call asks for media on the leg as soon as it answered;
    its `&park()` CHANNEL_PARK may come later. The adapter waits for it (no re-park racing
    the original park), then `unicast` goes to the parked leg, which FreeSWITCH accepts."""
    server, adapter, sink = parts
    server.step_seconds = 0.2  # the leg's events come 200 ms apart: ANSWER, then PARK
    await adapter.originate(
        "cbleg-w", DialTarget(sip_uri="sip:1@h"), caller_number="1", ring_timeout=5
    )
    await sink.wait(LegAnswered, "cbleg-w")
    await adapter.attach_media("cbleg-w", MediaAddress("127.0.0.1", 40015), "ulaw")
    await unicast_started(server, "cbleg-w")
    assert not server.crashes
    assert not any(c.startswith("api uuid_transfer cbleg-w") for c in server.commands)
    await adapter.end_brief("cbleg-w")
    await adapter.hangup("cbleg-w")
