"""Dial safety on the real Asterisk: injection and routing tricks are refused in every mode,
and nothing reaches the "carrier" (a SIPp UAS behind a trunk).

Reproductions of issue 7 §1 (each answered 202 or placed a call on main): a SIP URI whose user
part forks `Dial()` (`&Local/...`, `&PJSIP/...@<endpoint>`), `;maddr=` past the domain list,
numbers and hosts outside the allow-lists, the same through `POST /destinations/test` and
through the assistant's path, channel variables that `[callbridge-blind-transfer]` must
filter, and an INVITE that claims to come from `cb-direct`.

"Nothing reached the carrier" is shown without waiting on time: the UAS takes one call, and
after the refusals an allowed transfer to the same UAS must be the first INVITE it sees.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bridge.calls.model import TransferCommand
from bridge.errors import DestinationNotAllowed
from bridge.lab.rtp import RtpPeer
from bridge.lab.sipp import SippCall, SippUas
from tests.support.daemon import start_daemon, wait_for
from tests.support.flows import (
    DESTINATION,
    DID,
    LabCall,
    active_call,
    setup_directory,
    transfer_settled,
)

pytestmark = pytest.mark.asterisk

# The policy: Dutch numbers, one SIP domain (and the lab's loopback for the UAS).
POLICY = {"allowed_prefixes": ["+31"], "allowed_sip_domains": ["pbx.example.com", "127.0.0.1"]}
PREMIUM = "+19005550206"


def forged_uris(trunk_id: str) -> list[str]:
    """Destinations the SIP URI grammar refuses (422 at the API)."""
    return [
        f"sip:x&Local/{PREMIUM},,,@pbx.example.com",
        f"sip:x&PJSIP/{PREMIUM}@cb-trunk-{trunk_id}",
        f"sip:x&PJSIP/{PREMIUM}@pbx.example.com",
        "sip:+19005550204@pbx.example.com:5060;maddr=127.0.0.1",
        "sip:+19005550204@pbx.example.com;transport=tcp",
        "sip:+19005550204@pbx.example.com?Route=%3Csip:127.0.0.1%3E",
        "sip:x$(SHELL)@pbx.example.com",
        "sip:x,30,D(1)@pbx.example.com",
    ]


# Well-formed destinations the policy refuses (403), with the rule it names.
POLICY_REFUSALS = [
    (PREMIUM, "transfer.allowed_prefixes"),
    ("sip:+19005550204@127.0.0.2", "transfer.allowed_sip_domains"),
    ("sip:+19005550204@pbx.example.com.evil.example", "transfer.allowed_sip_domains"),
]


@pytest.fixture
async def daemon_api(asterisk_lab: Any, tmp_path: Path):
    daemon, api = await start_daemon(
        asterisk_lab, tmp_path, transfer=POLICY, agent={"enabled": False}
    )
    try:
        yield daemon, api
    finally:
        await api.close()
        await daemon.stop()


async def _refused_everything(api: Any, path: str, body: dict[str, Any], trunk_id: str) -> None:
    for uri in forged_uris(trunk_id):
        status, error = await api.request("POST", path, body | {"destination": uri})
        assert status == 422, (uri, error)
        assert error["error"]["field"] == "destination", (uri, error)
    for destination, rule in POLICY_REFUSALS:
        status, error = await api.request("POST", path, body | {"destination": destination})
        assert status == 403, (destination, error)
        assert error["error"]["code"] == "destination-not-allowed"
        assert error["error"]["field"] == "destination"
        assert error["error"]["details"]["rule"] == rule, error


@pytest.mark.parametrize("mode", ["bridge", "blind"])
async def test_control_transfers_refuse_injection_and_unlisted_destinations(
    asterisk_lab: Any, daemon_api: Any, mode: str
) -> None:
    _, api = daemon_api
    async with LabCall(asterisk_lab, api) as lab_call:
        carrier = lab_call.uas
        assert carrier is not None
        world = await setup_directory(api, carrier, auth=False)
        call = await lab_call.dial()
        path = f"/calls/{call['id']}/control"
        await _refused_everything(
            api, path, {"type": "transfer", "mode": mode}, world["trunk"]["id"]
        )
        data = await api.ok("GET", f"/calls/{call['id']}")
        assert data["status"] == "active" and data["transfers"] == []
        refused = [e for e in data["events"] if e["type"] == "transfer.refused"]
        assert [(e["destination"], e["rule"]) for e in refused] == POLICY_REFUSALS
        assert all(e["source"] == "api" for e in refused)

        # The same carrier then gets the one allowed transfer: its first INVITE.
        await api.ok("POST", path, {"type": "transfer", "destination": DESTINATION, "mode": mode})
        await wait_for(lambda: carrier.invite is not None, "the INVITE at the carrier")
        invites = carrier.received_requests("INVITE")
        assert DESTINATION in (invites[0].request_uri or ""), invites[0].first_line
        assert not any(PREMIUM in (m.request_uri or "") for m in invites)
        done = await transfer_settled(api, call["id"])
        assert done["transfers"][-1]["state"] == ("bridged" if mode == "bridge" else "handed_off")


async def test_destination_test_refuses_injection_and_unlisted_destinations(
    asterisk_lab: Any, daemon_api: Any
) -> None:
    _, api = daemon_api
    async with RtpPeer() as dest_rtp:
        carrier = SippUas("uas_answer.xml", rtp_port=dest_rtp.port)
        await carrier.start()
        try:
            world = await setup_directory(api, carrier, auth=False)
            body = {"number_id": world["number"]["id"], "ring_timeout": 5}
            await _refused_everything(api, "/destinations/test", body, world["trunk"]["id"])
            result = await api.ok("POST", "/destinations/test", body | {"destination": DESTINATION})
            assert result["outcome"] == "answered", result
            invites = carrier.received_requests("INVITE")
            assert DESTINATION in (invites[0].request_uri or ""), invites[0].first_line
        finally:
            await carrier.stop()


async def test_assistant_destinations_are_held_to_the_grammar_and_the_policy(
    asterisk_lab: Any, daemon_api: Any
) -> None:
    daemon, api = daemon_api
    async with LabCall(asterisk_lab, api) as lab_call:
        carrier = lab_call.uas
        assert carrier is not None
        world = await setup_directory(api, carrier, auth=False)
        # Stored config: an assistant cannot be given such a destination.
        forged = forged_uris(world["trunk"]["id"])[0]
        status, error = await api.request(
            "PATCH",
            f"/assistants/{world['assistant']['id']}",
            {"llm_config": {"tools": [{"type": "transfer_call", "destinations": [
                {"type": "sip", "sip_uri": forged, "description": "premium"}]}]}},
        )  # fmt: skip
        assert status == 422, error
        assert "sip_uri" in error["error"]["field"], error
        call = await lab_call.dial(hold_ms=30000)
        session = daemon.calls._by_id[call["id"]]
        # The assistant's path (the transfer tool reaches the session like this): a
        # destination that escaped validation (an older database, a bug) is refused by the
        # policy, and each refusal is recorded with its rule.
        for destination, mode, rule in [
            (forged, "blind", "sip_uri.grammar"),
            ("sip:+19005550204@pbx.example.com;maddr=127.0.0.1", "bridge",
             "transfer.allowed_uri_params"),
            (PREMIUM, "blind", "transfer.allowed_prefixes"),
        ]:  # fmt: skip
            command = TransferCommand.model_construct(
                type="transfer", destination=destination, message=None, mode=mode,
                ring_timeout=None,
            )  # fmt: skip
            with pytest.raises(DestinationNotAllowed) as info:
                await session.command(command, source="assistant", label="premium")
            assert info.value.details["rule"] == rule
            assert "refused by the transfer policy" in info.value.message
        data = await api.ok("GET", f"/calls/{call['id']}")
        refused = [e for e in data["events"] if e["type"] == "transfer.refused"]
        assert [(e["rule"], e["source"]) for e in refused] == [
            ("sip_uri.grammar", "assistant"),
            ("transfer.allowed_uri_params", "assistant"),
            ("transfer.allowed_prefixes", "assistant"),
        ]
        assert refused[0]["destination"] == forged
        assert data["status"] == "active" and data["transfers"] == []
        # The assistant's own destination still goes through, and is the first INVITE.
        reply = await session.command(
            TransferCommand(type="transfer", destination=DESTINATION, mode="blind"),
            source="assistant",
        )
        assert reply["accepted"] == "transfer"
        await wait_for(lambda: carrier.invite is not None, "the INVITE at the carrier")
        assert DESTINATION in (carrier.received_requests("INVITE")[0].request_uri or "")


async def test_blind_transfer_to_a_sip_uri_is_dialled_from_filtered_parts(
    asterisk_lab: Any, daemon_api: Any
) -> None:
    _, api = daemon_api
    async with LabCall(asterisk_lab, api) as lab_call:
        uas = lab_call.uas
        assert uas is not None
        await setup_directory(api, None)
        call = await lab_call.dial(hold_ms=30000)
        uri = f"sip:alice.o'neil+1@127.0.0.1:{uas.local_port};user=phone"
        await api.ok(
            "POST",
            f"/calls/{call['id']}/control",
            {"type": "transfer", "destination": uri, "mode": "blind"},
        )
        await wait_for(lambda: uas.invite is not None, "the INVITE at the UAS")
        assert (uas.invite.request_uri or "") == uri
        await wait_for(
            lambda: any(m.direction == "sent" and m.status_code == 200 for m in uas.messages()),
            "the UAS to answer",
        )


@pytest.mark.parametrize(
    "variables",
    [
        {"CALLBRIDGE_DIAL_KIND": "trunk", "CALLBRIDGE_NUMBER": f"{PREMIUM}&Local/1"},
        {"CALLBRIDGE_DIAL_KIND": "uri", "CALLBRIDGE_URI": f"sip:x&PJSIP/{PREMIUM}@ENDPOINT"},
        {"CALLBRIDGE_DIAL_KIND": "uri", "CALLBRIDGE_URI": "sip:x,,,@127.0.0.1"},
    ],
    ids=["number", "uri-fork", "uri-args"],
)
async def test_blind_context_refuses_parts_it_would_have_to_filter(
    asterisk_lab: Any, daemon_api: Any, variables: dict[str, str]
) -> None:
    """Defence in depth: even if the daemon let a bad part through, the dialplan does not
    dial it (it plays the failure message and hangs up); and a whole dial string in
    CALLBRIDGE_DIAL (what main's context ran `Dial()` on) is never dialled."""
    _, api = daemon_api
    async with LabCall(asterisk_lab, api) as lab_call:
        carrier = lab_call.uas
        assert carrier is not None
        world = await setup_directory(api, carrier, auth=False)
        endpoint = f"cb-trunk-{world['trunk']['id']}"
        call = await lab_call.dial(hold_ms=60000)
        caller = lab_call.caller
        assert caller is not None
        channel = call["channel_id"]

        async def greeting_started() -> bool:  # media attached: the session is idle
            events = (await api.ok("GET", f"/calls/{call['id']}"))["events"]
            return any(e["type"] == "assistant.said" for e in events)

        await wait_for(greeting_started, "the greeting")
        status, info = asterisk_lab.ari("GET", f"/channels/{channel}")
        assert status == 200
        name = info["name"]  # how the dialplan log names this call
        parts = {
            "CALLBRIDGE_ENDPOINT": endpoint,
            "CALLBRIDGE_RING_TIMEOUT": "5",
            # What main's blind context dialled as is: it must be ignored now.
            "CALLBRIDGE_DIAL": f"PJSIP/cb-direct/sip:x&PJSIP/{PREMIUM}@{endpoint}",
        }
        parts |= {k: v.replace("ENDPOINT", endpoint) for k, v in variables.items()}
        for variable, value in parts.items():
            status, _ = asterisk_lab.ari(
                "POST", f"/channels/{channel}/variable", {"variable": variable, "value": value}
            )
            assert status == 204
        status, _ = asterisk_lab.ari(
            "POST",
            f"/channels/{channel}/continue",
            {"context": "callbridge-blind-transfer", "extension": "s", "priority": "1"},
        )
        assert status == 204
        # The failure branch plays "sorry, cannot complete as dialed" and hangs up.
        assert await asyncio.wait_for(caller.wait(), 30) == 0
        assert caller.got_bye()
        assert carrier.received_requests("INVITE") == []

        def failed_here() -> list[str] | None:  # Asterisk's logger writes asynchronously
            lines = [ln for ln in asterisk_lab.log_tail(400).splitlines() if f'"{name}"' in ln]
            done = any("callbridge blind transfer failed" in ln for ln in lines)
            return lines if done else None

        lines = await wait_for(failed_here, f"the blind context's failure branch for {name}")
        assert not any("Dial(" in ln for ln in lines), lines
        # The test moved the caller out of Stasis behind the daemon's back (its own blind
        # transfer releases its media first), so the daemon, unsubscribed from the caller,
        # never learns it hung up: release the media channel it still holds, which would
        # otherwise stay in the session's Asterisk.
        _, channels = asterisk_lab.ari("GET", "/channels")
        for media in [c["id"] for c in channels if c["id"].startswith(f"cbmedia-{channel}-")]:
            assert asterisk_lab.ari("DELETE", f"/channels/{media}")[0] == 204


async def test_an_invite_from_cb_direct_is_not_routed_into_callbridge(
    asterisk_lab: Any, daemon_api: Any
) -> None:
    _, api = daemon_api
    await setup_directory(api, None)
    shown = asterisk_lab.cli("pjsip show endpoint cb-direct")
    assert "callbridge-outbound-only" in shown, shown
    async with RtpPeer() as rtp:
        # cb-direct has no auth: on main, From: cb-direct landed in [callbridge-inbound].
        intruder = SippCall.to_lab(asterisk_lab, DID, rtp_port=rtp.port, from_user="cb-direct")
        await intruder.start()
        try:
            await asyncio.wait_for(intruder.wait(), 30)
            final = intruder.final_status()
            assert final is not None and 400 <= final < 500, intruder.output()
            assert not intruder.answered()
        finally:
            await intruder.terminate()
    assert (await api.ok("GET", "/calls"))["data"] == []


async def test_blind_transfer_through_the_default_route_is_assembled_by_the_dialplan(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    """The route kind: `transfer.default_route` split around {number}, filtered, dialled."""
    daemon, api = await start_daemon(
        asterisk_lab,
        tmp_path,
        transfer=POLICY | {"default_route": "PJSIP/{number}@sipp-uas"},  # a lab endpoint
        agent={"enabled": False},
    )
    try:
        async with RtpPeer() as caller_rtp, RtpPeer() as dest_rtp:
            uas = SippUas.for_lab(asterisk_lab, "uas_answer.xml", rtp_port=dest_rtp.port)
            await uas.start()
            await setup_directory(api, None)  # the number has no trunk: the route is used
            caller = SippCall.to_lab(asterisk_lab, DID, rtp_port=caller_rtp.port, hold_ms=30000)
            await caller.start()
            try:
                call = await active_call(api)
                await api.ok(
                    "POST",
                    f"/calls/{call['id']}/control",
                    {"type": "transfer", "destination": DESTINATION, "mode": "blind"},
                )
                await wait_for(lambda: uas.invite is not None, "the INVITE at the UAS")
                assert (uas.invite.request_uri or "").startswith(f"sip:{DESTINATION}@")
            finally:
                await caller.terminate()
                await uas.stop()
    finally:
        await api.close()
        await daemon.stop()


def refused_total(daemon: Any, source: str, rule: str) -> float:
    """`callbridge_transfers_refused_total{source, rule}` in the daemon's registry."""
    value = daemon.metrics.registry.get_sample_value(
        "callbridge_transfers_refused_total", {"source": source, "rule": rule}
    )
    return value or 0.0


async def test_caps_refuse_with_their_rule_recorded_and_counted(
    asterisk_lab: Any, tmp_path: Path
) -> None:
    """Issue 7 §1, "every refusal recorded with the rule that refused it": a trunk at
    `max_legs_per_trunk` (its one leg held by a destination test ringing at the carrier) and
    a call at `max_per_call` are refused with 403 naming the rule, a `transfer.refused` event
    on the call, and the refused counter; nothing more reaches the carrier."""
    daemon, api = await start_daemon(
        asterisk_lab,
        tmp_path,
        transfer={"max_legs_per_trunk": 1, "max_per_call": 1},
        agent={"enabled": False},
    )
    try:
        # The carrier takes two calls (SIPp's last `-m` wins): the test's and the transfer's.
        async with LabCall(
            asterisk_lab, api, "uas_noanswer.xml", extra_args=["-m", "2"]
        ) as lab_call:
            carrier = lab_call.uas
            assert carrier is not None
            world = await setup_directory(api, carrier, auth=False)
            call = await lab_call.dial()
            path = f"/calls/{call['id']}/control"
            test_body = {"destination": DESTINATION, "number_id": world["number"]["id"]}
            # A destination test rings at the carrier: the trunk's one leg is taken.
            probe = asyncio.create_task(
                api.request("POST", "/destinations/test", test_body | {"ring_timeout": 4})
            )
            await wait_for(lambda: carrier.invite is not None, "the test's INVITE")
            for request_path, body in [
                (path, {"type": "transfer", "destination": DESTINATION}),
                ("/destinations/test", test_body),
            ]:
                status, error = await api.request("POST", request_path, body)
                assert status == 403, error
                assert error["error"]["code"] == "destination-not-allowed"
                assert error["error"]["field"] == "destination"
                assert error["error"]["details"]["rule"] == "transfer.max_legs_per_trunk"
            status, tested = await probe
            assert (status, tested["outcome"]) == (200, "no_answer"), tested
            # The leg is free again: the call's one transfer goes out (and is not answered).
            await api.ok(
                "POST", path, {"type": "transfer", "destination": DESTINATION, "ring_timeout": 2}
            )
            done = await transfer_settled(api, call["id"])
            assert done["transfers"][-1]["outcome"] == "no_answer"
            status, error = await api.request(
                "POST", path, {"type": "transfer", "destination": DESTINATION}
            )
            assert status == 403, error
            assert error["error"]["details"]["rule"] == "transfer.max_per_call"
            data = await api.ok("GET", f"/calls/{call['id']}")
            refused = [e for e in data["events"] if e["type"] == "transfer.refused"]
            assert [(e["rule"], e["source"], e["destination"]) for e in refused] == [
                ("transfer.max_legs_per_trunk", "api", DESTINATION),
                ("transfer.max_per_call", "api", DESTINATION),
            ]
            assert data["status"] == "active" and len(data["transfers"]) == 1
            assert len(carrier.received_requests("INVITE")) == 2  # the test's and the transfer's
            assert refused_total(daemon, "api", "transfer.max_legs_per_trunk") == 1
            assert refused_total(daemon, "test", "transfer.max_legs_per_trunk") == 1
            assert refused_total(daemon, "api", "transfer.max_per_call") == 1
    finally:
        await api.close()
        await daemon.stop()
