"""FreeSWITCH dial safety against the fake event socket: the final dial string is checked
whole (`sofia/...`, route), refused with a typed error before any command leaves the daemon,
for originate (bridge mode, destination tests), blind transfer and REFER (deflect)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.errors import PbxCommandFailed, UnsafeDialString
from bridge.pbx.freeswitch.adapter import FreeswitchAdapter
from bridge.pbx.freeswitch.gateways import dial_string, refer_uri
from bridge.pbx.ports import ConnectionRestored, DialTarget, PbxEvent
from tests.support.esl_server import FakeEslServer

FORGED = [
    DialTarget(sip_uri="sip:x&Local/+19005550206,,,@pbx.example.com"),
    DialTarget(sip_uri="sip:x,sofia/gateway/cb-trunk-t1/+19005550206@pbx.example.com"),
    DialTarget(sip_uri="sip:x|sofia/gateway/cb-trunk-t1/+19005550206@pbx.example.com"),
    DialTarget(sip_uri="sip:a@h;x=${system(id)}"),
    DialTarget(sip_uri="sip:a@h}[origination_caller_id_number=1]"),
    DialTarget(sip_uri="sip:a'@h"),  # ends the originate's quoted variables
    DialTarget(sip_uri="sip:a@h?x=y"),
    DialTarget(sip_uri="sip:a b@h"),
    DialTarget(number="+1900,sofia/gateway/x/1", trunk_id="t1"),
    DialTarget(number="+1900:_:loopback/1", trunk_id="t1"),
    DialTarget(number="+31612345678", trunk_id="t1/../x"),
    DialTarget(number="+1900|user/1000", route="sofia/gateway/carrier/{number}"),
    DialTarget(number="+31612345678", route="sofia/gateway/carrier/{number},user/1000"),
    DialTarget(number="+31612345678", route="{absolute_codec_string=PCMU}sofia/gw/{number}"),
    DialTarget(number="+31612345678", route="sofia/${evil}/{number}"),
    DialTarget(number="+31612345678", route="sofia/gw/{number}/{number}"),
    DialTarget(),
]


@pytest.mark.parametrize("target", FORGED, ids=range(len(FORGED)))
def test_forged_targets_are_refused_whole(target: DialTarget) -> None:
    with pytest.raises(UnsafeDialString) as info:
        dial_string(target, "callbridge")
    assert isinstance(info.value, PbxCommandFailed)  # the adapter's typed error family


def test_plain_targets_build_the_expected_strings() -> None:
    assert dial_string(DialTarget(number="+316", trunk_id="t1"), "p") == (
        "sofia/gateway/cb-trunk-t1/+316"
    )
    assert dial_string(DialTarget(sip_uri="sip:bob@example.org:5080;user=phone"), "p") == (
        "sofia/p/bob@example.org:5080;user=phone"
    )
    assert dial_string(DialTarget(number="+316", route="sofia/gateway/gw1/{number}"), "p") == (
        "sofia/gateway/gw1/+316"
    )
    with pytest.raises(UnsafeDialString):
        dial_string(DialTarget(sip_uri="sip:bob@example.org"), "bad profile")
    assert refer_uri(DialTarget(sip_uri="sip:bob@example.org")) == "sip:bob@example.org"
    with pytest.raises(UnsafeDialString):
        refer_uri(DialTarget(sip_uri="sip:x&y@example.org"))
    with pytest.raises(UnsafeDialString):
        refer_uri(DialTarget(number="+316", trunk_id="t1"))


# --- against the fake event socket ----------------------------------------------------------


class _Sink:
    def __init__(self) -> None:
        self.events: list[PbxEvent] = []
        self.restored = asyncio.Event()

    async def __call__(self, event: PbxEvent) -> None:
        self.events.append(event)
        if isinstance(event, ConnectionRestored):
            self.restored.set()


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[FakeEslServer, FreeswitchAdapter]]:
    server = FakeEslServer("pw")
    await server.start()
    server.gateway_dir = tmp_path / "gw"
    sink = _Sink()
    adapters: list[FreeswitchAdapter] = []

    async def make(**kw: object) -> FreeswitchAdapter:
        adapter = FreeswitchAdapter(
            "127.0.0.1",
            server.port,
            "pw",
            gateway_dir=tmp_path / "gw",
            unicast_ports=(25410, 25419),
            client_options={"backoff_initial": 0.05, "backoff_max": 0.2},
            **kw,  # type: ignore[arg-type]
        )
        await adapter.start(sink)
        await asyncio.wait_for(sink.restored.wait(), 5)
        adapters.append(adapter)
        return adapter

    server.make = make  # type: ignore[attr-defined]
    yield server, await make()
    for adapter in adapters:
        await adapter.stop()
    await server.stop()


def _commands(server: FakeEslServer) -> list[str]:
    return [c for c in server.commands if not c.startswith(("auth", "event", "api global_getvar"))]


async def test_originate_refuses_before_sending_anything(
    parts: tuple[FakeEslServer, FreeswitchAdapter],
) -> None:
    server, adapter = parts
    before = list(server.commands)
    for i, target in enumerate(FORGED[:-1]):
        with pytest.raises(UnsafeDialString):
            await adapter.originate(f"cbleg-{i}", target, caller_number=None, ring_timeout=5)
    assert [c for c in server.commands if c not in before and "originate" in c] == []
    await adapter.originate(
        "cbleg-ok", DialTarget(sip_uri="sip:5555@h"), caller_number=None, ring_timeout=5
    )
    sent = [c for c in server.commands if "originate" in c]
    assert len(sent) == 1 and "sofia/callbridge/5555@h &park()" in sent[0]


async def test_blind_transfer_refuses_and_leaves_the_caller_ours(
    parts: tuple[FakeEslServer, FreeswitchAdapter],
) -> None:
    server, adapter = parts
    uuid = await server.call_arrives(answered=True)
    for target in FORGED[:-1]:
        with pytest.raises(UnsafeDialString):
            await adapter.blind_transfer(uuid, target, 20)
    chan = server.channels[uuid]
    assert "callbridge_dial" not in chan.variables
    assert "transfer_destination" not in chan.variables  # never sent to the blind context
    assert chan.variables.get("callbridge")  # still marked as our caller
    assert not any(c.startswith("api uuid_transfer") for c in server.commands)


async def test_deflect_refuses_a_forged_refer_target(
    parts: tuple[FakeEslServer, FreeswitchAdapter],
) -> None:
    server, _ = parts
    adapter = await server.make(blind_method="deflect")  # type: ignore[attr-defined]
    uuid = await server.call_arrives(answered=True)
    with pytest.raises(UnsafeDialString):
        await adapter.blind_transfer(uuid, DialTarget(sip_uri="sip:x&y@h"), 20)
    assert not any("uuid_deflect" in c for c in server.commands)
    assert server.channels[uuid].variables.get("callbridge")  # not handed off
