"""SIP trunks from the API become PJSIP objects in the running Asterisk, and go away again."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bridge.lab.asterisk import AsteriskLab
from bridge.lab.rtp import RtpPeer
from bridge.lab.sipp import SippUas
from tests.support.daemon import start_daemon, wait_for
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.asterisk


async def test_trunk_lifecycle_registration_and_removal(asterisk_lab: Any, tmp_path: Path) -> None:
    registrar = SippUas(
        "uas_register.xml", keys={"auth_user": "hms-sovereign", "auth_pass": "secure-password"}
    )
    await registrar.start()
    daemon, api = await start_daemon(asterisk_lab, tmp_path)
    try:
        trunk = await api.ok(
            "POST",
            "/sip-trunks",
            {
                "name": "Carrier",
                "host": "127.0.0.1",
                "port": registrar.local_port,
                "username": "hms-sovereign",
                "password": "secure-password",
                "registration": True,
            },
        )
        assert "password" not in trunk and trunk["has_password"] is True
        endpoint = f"cb-trunk-{trunk['id']}"
        shown = asterisk_lab.cli(f"pjsip show endpoint {endpoint}")
        assert endpoint in shown and f"{endpoint}-auth" in shown
        assert f"sip:127.0.0.1:{registrar.local_port}" in asterisk_lab.cli(
            f"pjsip show aor {endpoint}"
        )
        # Asterisk staggers the first REGISTER by up to ~10 s; ask for it now.
        asterisk_lab.cli(f"pjsip send register {endpoint}")
        assert await asyncio.wait_for(registrar.wait(), 15) == 0, registrar.output()
        sent_ok = [
            m for m in registrar.messages() if m.direction == "sent" and m.status_code == 200
        ]
        assert sent_ok, "the registrar refused the trunk's credentials"

        # PATCH moves the trunk: the aor follows at once.
        await api.ok("PATCH", f"/sip-trunks/{trunk['id']}", {"port": 5999})
        assert "sip:127.0.0.1:5999" in asterisk_lab.cli(f"pjsip show aor {endpoint}")

        status, _ = await api.request("DELETE", f"/sip-trunks/{trunk['id']}")
        assert status == 204
        assert "Unable to find object" in asterisk_lab.cli(f"pjsip show endpoint {endpoint}")
    finally:
        await registrar.stop()
        await api.close()
        await daemon.stop()


async def test_trunks_are_provisioned_again_on_connect(asterisk_lab: Any, tmp_path: Path) -> None:
    daemon, api = await start_daemon(asterisk_lab, tmp_path)
    trunk = await api.ok("POST", "/sip-trunks", {"name": "Office", "host": "127.0.0.1"})
    endpoint = f"cb-trunk-{trunk['id']}"
    await api.close()
    await daemon.stop()
    # Memory objects vanish with an Asterisk restart; remove it by hand to stand for one.
    status, _ = asterisk_lab.ari(
        "DELETE", f"/asterisk/config/dynamic/res_pjsip/endpoint/{endpoint}"
    )
    assert status == 204
    assert "Unable to find object" in asterisk_lab.cli(f"pjsip show endpoint {endpoint}")
    daemon, api = await start_daemon(asterisk_lab, tmp_path)
    try:
        # The trunk reconciler provisions in the background after the connect.
        await wait_for(
            lambda: endpoint in asterisk_lab.cli(f"pjsip show endpoint {endpoint}"),
            "the trunk to be provisioned again",
        )
    finally:
        await api.close()
        await daemon.stop()


@pytest.mark.parametrize(
    ("scenario", "outcome", "sip_code"),
    [("uas_answer.xml", "answered", 200), ("uas_busy.xml", "busy", 486)],
)
async def test_destination_test_call_reports_the_outcome(
    asterisk_lab: Any, tmp_path: Path, scenario: str, outcome: str, sip_code: int
) -> None:
    peer = await RtpPeer().start()
    uas = SippUas(scenario, rtp_port=peer.port)
    await uas.start()
    # The number has no assistant: only an allow-list lets the test call out (fail-closed).
    daemon, api = await start_daemon(asterisk_lab, tmp_path, transfer={"allowed_prefixes": ["+31"]})
    try:
        trunk = await api.ok(
            "POST", "/sip-trunks", {"name": "t", "host": "127.0.0.1", "port": uas.local_port}
        )
        number = await api.ok(
            "POST", "/numbers", {"number": "+31201234567", "transfer_trunk_id": trunk["id"]}
        )
        result = await api.ok(
            "POST",
            "/destinations/test",
            {"destination": "+31612345678", "number_id": number["id"], "ring_timeout": 5},
        )
        assert (result["outcome"], result["sip_code"]) == (outcome, sip_code), result
        assert "+31612345678 via trunk" in result["route"]
        assert "+31612345678" in (uas.invite.request_uri or "")
        if outcome == "answered":  # answered, then released at once
            assert await asyncio.wait_for(uas.wait(), 10) == 0
            assert uas.received_requests("BYE")
        status, error = await api.request(
            "POST", "/destinations/test", {"destination": "0800-CALL-ME"}
        )
        assert (status, error["error"]["field"]) == (422, "destination")
    finally:
        peer.close()
        await uas.stop()
        await api.close()
        await daemon.stop()


async def test_a_restarted_asterisk_gets_every_trunk_again(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    """A real Asterisk restart (its memory objects are gone): the daemon reconnects and the
    trunk reconciler provisions every trunk again. A lab of its own, behind a proxy the test
    points at the restarted instance (a restart picks new ports)."""
    lab = AsteriskLab().start()
    proxy = await TcpProxy("127.0.0.1", lab.http_port).start()
    daemon, api = await start_daemon(lab, tmp_path, ari_url=proxy.url)
    try:
        ids = [
            (await api.ok("POST", "/sip-trunks", {"name": n, "host": "127.0.0.1"}))["id"]
            for n in ("one", "two")
        ]
        endpoints = {f"cb-trunk-{i}" for i in ids}

        def provisioned() -> bool:
            status, found = lab.ari("GET", "/endpoints/PJSIP")
            return status == 200 and endpoints <= {e["resource"] for e in found}

        assert provisioned()
        lab.stop()
        await wait_for(lambda: not daemon.calls.connected, "the daemon to see Asterisk go", 10)
        lab.start()
        assert not provisioned()  # a fresh Asterisk: nothing of ours
        proxy.target = ("127.0.0.1", lab.http_port)
        await wait_for(lambda: daemon.calls.connected, "the daemon to reconnect", 15)
        await wait_for(provisioned, "every trunk to be provisioned again", 15)
    finally:
        await api.close()
        await daemon.stop()
        await proxy.close()
        lab.stop()
