"""The FreeSWITCH adapter against the capture-built fake event socket: event mapping, the
command lines it sends (quoting, originate variables), resync, trunks, raw media."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from bridge.calls.outcomes import classify_leg_failure
from bridge.media.rtp import MediaClock, RtpStream
from bridge.pbx.freeswitch import events as fse
from bridge.pbx.freeswitch.adapter import FreeswitchAdapter, _vars
from bridge.pbx.freeswitch.esl_protocol import EslEvent
from bridge.pbx.freeswitch.gateways import dial_string, gateway_xml
from bridge.pbx.ports import (
    CallArrived,
    ChannelGone,
    ChannelHungUp,
    ConnectionLost,
    ConnectionRestored,
    DialTarget,
    LegAnswered,
    LegFailed,
    LegOutcome,
    LegRinging,
    MediaAddress,
    PbxEvent,
    TrunkSpec,
)
from tests.support.esl_server import FakeEslServer, capture_events
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
        unicast_ports=(25400, 25409),
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
    stream.set_remote(remote.host, remote.port, framing=remote.framing, codec=remote.codec)

    tone = (np.sin(np.arange(1600) / 8000 * 2 * np.pi * 440) * 8000).astype("<i2").tobytes()
    await stream.play(tone).done  # paced 20 ms frames, raw L16 LE to FreeSWITCH's port
    await asyncio.sleep(0.05)  # the last datagram is still on its way
    chan = server.channels[uuid]
    assert b"".join(chan.media_in) == tone
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
    line = next(c for c in server.commands if c.startswith("api uuid_broadcast"))
    assert line == f"api uuid_broadcast {uuid} 'gentones::%(2000,4000,440,480)|-1' aleg"
    await asyncio.sleep(0.05)
    assert server.channels[uuid].playback is not None
    await adapter.stop_playback(playback)
    await asyncio.sleep(0.05)
    assert server.channels[uuid].playback is None


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
    await adapter.originate(
        "cbleg-2", DialTarget(sip_uri="sip:5555@h"), caller_number=None, ring_timeout=5
    )
    await sink.wait(LegRinging, "cbleg-2")
    await sink.wait(LegAnswered, "cbleg-2")
    await adapter.connect(uuid, "cbleg-2")
    assert server.channels[uuid].bridged_with == "cbleg-2"
    await server.hangup("cbleg-2")
    await sink.wait(ChannelHungUp, "cbleg-2")
    await sink.wait(ChannelHungUp, uuid)


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
    assert path.stat().st_mode & 0o777 == 0o600
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
        await asyncio.sleep(0.2)
        beats = [c for c in server.commands if "global_setvar callbridge_seen" in c]
        assert len(beats) >= 2
        assert beats[0] == "api expand global_setvar callbridge_seen=${strepoch()}"
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
    await asyncio.sleep(0.05)
    assert got == [pcm[i : i + 320] for i in range(0, 1280, 320)]
    with pytest.raises(ValueError):
        stream.set_remote("127.0.0.1", 1, framing="srtp")
    stream.close()
    transport.close()
    await clock.close()
