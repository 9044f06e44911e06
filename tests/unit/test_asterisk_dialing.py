"""Asterisk dial strings (bridge.pbx.asterisk.dialing): the final `PJSIP/...` string is
checked whole, and a blind transfer hands the dialplan separate parts, never a dial string."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.errors import PbxCommandFailed, UnsafeDialString
from bridge.pbx.asterisk.adapter import AsteriskAdapter
from bridge.pbx.asterisk.dialing import blind_variables, dial_string
from bridge.pbx.ports import DialTarget

FORGED = [
    DialTarget(sip_uri="sip:x&Local/+19005550206,,,@pbx.example.com"),
    DialTarget(sip_uri="sip:x&PJSIP/+19005550206@cb-trunk-t1"),
    DialTarget(sip_uri="sip:x,30,D(1)@pbx.example.com"),
    DialTarget(sip_uri="sip:$(SHELL)@pbx.example.com"),
    DialTarget(sip_uri="sip:a@h;x=a,b"),
    DialTarget(sip_uri="sip:a@h?Route=x"),
    DialTarget(sip_uri="sip:a b@h"),
    DialTarget(number="+1900&Local/1", trunk_id="t1"),
    DialTarget(number="+1900,30", trunk_id="t1"),
    DialTarget(number="+31612345678", trunk_id="t1&PJSIP/x"),
    DialTarget(number="1900", trunk_id="t1@x"),
    DialTarget(number="+1900&Local/1", route="PJSIP/{number}@carrier"),
    DialTarget(number="+31612345678", route="PJSIP/{number}@carrier&Local/+1900@x"),
    DialTarget(number="+31612345678", route="PJSIP/{number}@carrier,30"),
    DialTarget(number="+31612345678", route="PJSIP/${EVIL}{number}@carrier"),
    DialTarget(number="+31612345678", route="PJSIP/{number}@{number}"),
    DialTarget(number="+31612345678", route="{number}"),
    DialTarget(),
]


@pytest.mark.parametrize("target", FORGED, ids=range(len(FORGED)))
def test_forged_targets_are_refused_whole(target: DialTarget) -> None:
    with pytest.raises(UnsafeDialString) as info:
        dial_string(target)
    assert isinstance(info.value, PbxCommandFailed)
    with pytest.raises(UnsafeDialString):
        blind_variables(target)


def test_plain_targets() -> None:
    assert dial_string(DialTarget(sip_uri="sip:alice@pbx.example.com:5070;user=phone")) == (
        "PJSIP/cb-direct/sip:alice@pbx.example.com:5070;user=phone"
    )
    assert dial_string(DialTarget(number="+31612345678", trunk_id="abc-1")) == (
        "PJSIP/+31612345678@cb-trunk-abc-1"
    )
    assert dial_string(DialTarget(number="+31612345678", route="PJSIP/{number}@carrier")) == (
        "PJSIP/+31612345678@carrier"
    )
    assert dial_string(DialTarget(number="+316", route="Local/{number}@outbound/n")) == (
        "Local/+316@outbound/n"
    )


def test_blind_variables_are_separate_filtered_parts() -> None:
    empty = {
        "CALLBRIDGE_NUMBER": "",
        "CALLBRIDGE_ENDPOINT": "",
        "CALLBRIDGE_URI": "",
        "CALLBRIDGE_ROUTE_HEAD": "",
        "CALLBRIDGE_ROUTE_TAIL": "",
    }
    assert blind_variables(DialTarget(number="+31612345678", trunk_id="abc")) == empty | {
        "CALLBRIDGE_DIAL_KIND": "trunk",
        "CALLBRIDGE_NUMBER": "+31612345678",
        "CALLBRIDGE_ENDPOINT": "cb-trunk-abc",
    }
    assert blind_variables(DialTarget(sip_uri="sip:a@h;user=phone")) == empty | {
        "CALLBRIDGE_DIAL_KIND": "uri",
        "CALLBRIDGE_URI": "sip:a@h;user=phone",
    }
    assert blind_variables(DialTarget(number="+316", route="PJSIP/{number}@carrier")) == empty | {
        "CALLBRIDGE_DIAL_KIND": "route",
        "CALLBRIDGE_ROUTE_HEAD": "PJSIP/",
        "CALLBRIDGE_NUMBER": "+316",
        "CALLBRIDGE_ROUTE_TAIL": "@carrier",
    }


class _Recorder:
    """Stands in for the ARI client: records requests, answers nothing."""

    app = "callbridge"

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.bodies: list[Any] = []

    async def request(self, method: str, path: str, params: Any = None, body: Any = None) -> Any:
        self.requests.append((method, path, dict(params or {})))
        self.bodies.append(body)
        return {}

    async def delete(self, path: str) -> None:
        self.requests.append(("DELETE", path, {}))

    async def put(self, path: str, body: Any) -> None:
        self.requests.append(("PUT", path, body))


async def test_blind_transfer_never_sets_a_dial_string_and_refuses_before_any_request() -> None:
    ari = _Recorder()
    adapter = AsteriskAdapter(ari)  # type: ignore[arg-type]
    with pytest.raises(UnsafeDialString):
        await adapter.blind_transfer("chan", FORGED[0], 20)
    with pytest.raises(UnsafeDialString):
        await adapter.originate("cbleg-1", FORGED[1], caller_number=None, ring_timeout=20)
    assert ari.requests == []
    await adapter.blind_transfer("chan", DialTarget(number="+31612345678", trunk_id="abc"), 20)
    variables = {p["variable"]: p["value"] for _, path, p in ari.requests if "variable" in path}
    assert "CALLBRIDGE_DIAL" not in variables
    assert variables["CALLBRIDGE_DIAL_KIND"] == "trunk"
    assert variables["CALLBRIDGE_NUMBER"] == "+31612345678"
    assert variables["CALLBRIDGE_ENDPOINT"] == "cb-trunk-abc"
    assert variables["CALLBRIDGE_RING_TIMEOUT"] == "20"
    _, path, params = ari.requests[-1]
    assert path == "/channels/chan/continue"
    assert params["context"] == "callbridge-blind-transfer"


async def test_cb_direct_is_provisioned_outbound_only() -> None:
    ari = _Recorder()
    adapter = AsteriskAdapter(ari)  # type: ignore[arg-type]
    await adapter._provision_direct()
    (method, path, _), *_ = ari.requests
    assert (method, path) == ("PUT", "/asterisk/config/dynamic/res_pjsip/endpoint/cb-direct")
    body = ari.bodies[0]
    fields = {f["attribute"]: f["value"] for f in body["fields"]}
    assert fields["context"] == "callbridge-outbound-only"
    assert fields["identify_by"] == "ip"
