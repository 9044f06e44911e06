"""Destinations inside the PBX (issue 9 §1) on FreeSWITCH, through the behaviour suite's
FreeSWITCH backend (the protocol-faithful fake ESL server in CI, a real FreeSWITCH with
CALLBRIDGE_TEST_FREESWITCH): an extension is dialled as `user/<extension>`, a dialplan target
as `loopback/<exten>/<context>/XML`, a queue through `loopback/<queue>/callbridge-queue/XML`;
the same code path in `bridge.calls` as on Asterisk (tests/integration/test_asterisk_internal.py),
the same outcomes and records."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.behaviour.backends import FakeCaller, FreeswitchBackend
from tests.support.daemon import Api, wait_for
from tests.support.esl_server import FakeChannel
from tests.support.flows import DID, active_call, transfer_settled

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("CALLBRIDGE_TEST_FREESWITCH")),
    reason="asserts on the fake ESL server's command log (validated by hand on a real one)",
)

DESTINATIONS = [
    {"type": "extension", "extension": "1001", "description": "Alice's desk phone"},
    {"type": "extension", "extension": "1002", "description": "Bob's desk phone"},
    {"type": "dialplan", "context": "ringgroups", "extension": "600", "description": "Sales"},
    {"type": "queue", "queue": "support", "description": "The support queue"},
    {
        "type": "dialplan",
        "context": "ivr",
        "extension": "700",
        "description": "The billing IVR",
        "dtmf": "ww12w34#",
    },
]


@pytest.fixture
async def fs(tmp_path: Path) -> AsyncIterator[tuple[FreeswitchBackend, Api]]:
    backend = FreeswitchBackend(tmp_path, None)
    daemon, api = await backend.start_daemon()
    assert backend.server is not None
    backend.server.register_user("1001")  # Alice's phone is registered; Bob's (1002) is not
    try:
        assistant = await api.ok(
            "POST",
            "/assistants",
            {
                "name": "Front desk",
                "first_message": "Welcome to Acme, how can I help you?",
                "llm_config": {"tools": [{"type": "transfer_call", "destinations": DESTINATIONS}]},
            },
        )
        await api.ok("POST", "/numbers", {"number": DID, "assistant_id": assistant["id"]})
        yield backend, api
    finally:
        await api.close()
        await daemon.stop()
        await backend.close()


def originates(backend: FreeswitchBackend) -> list[str]:
    assert backend.server is not None
    return [c for c in backend.server.commands if c.startswith("bgapi originate")]


async def transfer(api: Api, call_id: str, destination: str, **extra: Any) -> dict[str, Any]:
    body = {"type": "transfer", "destination": destination, "ring_timeout": 5, **extra}
    await api.ok("POST", f"/calls/{call_id}/control", body)
    return await transfer_settled(api, call_id)


@pytest.mark.parametrize(
    ("destination", "dial"),
    [
        ("extension:1001", "user/1001"),
        ("dialplan:600@ringgroups", "loopback/600/ringgroups/XML"),
        ("queue:support", "loopback/support/callbridge-queue/XML"),
    ],
)
async def test_internal_destination_is_bridged(
    fs: tuple[FreeswitchBackend, Api], destination: str, dial: str
) -> None:
    backend, api = fs
    caller = await backend.caller(DID)
    assert isinstance(caller, FakeCaller)
    call = await active_call(api)
    done = await transfer(api, call["id"], destination)
    t = done["transfers"][-1]
    assert (t["state"], t["outcome"], t["destination"]) == ("bridged", "answered", destination)
    (command,) = originates(backend)
    assert re.search(r"\}" + re.escape(dial) + r" &park\(\)$", command), command
    assert "CALLBRIDGE_TRANSFER_ID=" + t["id"] in command
    # Context into FreeSWITCH's artefacts (issue 9 §6): INVITE headers on every leg (a
    # loopback leg's reach the INVITE its dialplan sends), the outcome as the caller's
    # channel variables (its CDR). A loopback leg lets sofia offer its profile's codecs.
    assert "sip_h_X-CallBridge-Call-Id=" + call["id"] in command
    mixed = "export_vars=media_mix_inbound_outbound_codecs" in command
    assert mixed == dial.startswith("loopback/"), command
    assert backend.server is not None and caller.chan is not None
    await wait_for(
        lambda: (
            f"api uuid_setvar {caller.chan.uuid} callbridge_outcome answered"  # type: ignore[union-attr]
            in backend.server.commands
        ),  # type: ignore[union-attr]
        "the outcome in the caller's variables",
    )
    assert caller.chan is not None and backend.server is not None
    leg = backend.server.channels.get(caller.chan.bridged_with or "")
    assert leg is not None and leg.direction == "outbound" and leg.answered


async def test_busy_internal_destination_returns_the_caller(
    fs: tuple[FreeswitchBackend, Api],
) -> None:
    backend, api = fs
    assert backend.server is not None
    backend.server.set_originate_outcome("600", "busy")
    await backend.caller(DID)
    call = await active_call(api)
    done = await transfer(api, call["id"], "dialplan:600@ringgroups")
    t = done["transfers"][-1]
    assert (t["state"], t["outcome"]) == ("failed", "busy") and done["status"] == "active"

    async def told() -> bool:  # the assistant says why, after the failure
        kinds = [e["type"] for e in (await api.ok("GET", f"/calls/{call['id']}"))["events"]]
        return "assistant.said" in kinds[kinds.index("transfer.failed") :]

    await wait_for(told, "the assistant to tell the caller")


async def test_blind_transfer_to_an_extension(fs: tuple[FreeswitchBackend, Api]) -> None:
    backend, api = fs
    await backend.caller(DID)
    call = await active_call(api)
    done = await transfer(api, call["id"], "extension:1001", mode="blind")
    assert done["transfers"][-1]["state"] == "handed_off"
    assert backend.server is not None
    sets = [c for c in backend.server.commands if "callbridge_dial" in c]
    assert any(c.endswith("callbridge_dial user/1001") for c in sets), sets
    await wait_for(
        lambda: any(c.startswith("api uuid_transfer") for c in backend.server.commands),  # type: ignore[union-attr]
        "the caller handed to the blind context",
    )


async def test_unconfigured_internal_destination_is_refused(
    fs: tuple[FreeswitchBackend, Api],
) -> None:
    backend, api = fs
    await backend.caller(DID)
    call = await active_call(api)
    status, body = await api.request(
        "POST", f"/calls/{call['id']}/control", {"type": "transfer", "destination": "queue:vip"}
    )
    assert status == 403 and body["error"]["details"]["rule"] == "assistant.destinations"
    assert originates(backend) == []


async def test_dtmf_after_answer_before_the_bridge(fs: tuple[FreeswitchBackend, Api]) -> None:
    """Issue 9 §4 on FreeSWITCH: the destination's `dtmf` goes to the answered leg with
    `uuid_send_dtmf` (w/W are FreeSWITCH's own pauses), before `uuid_bridge`; recorded."""
    backend, api = fs
    caller = await backend.caller(DID)
    assert isinstance(caller, FakeCaller)
    call = await active_call(api)
    done = await transfer(api, call["id"], "dialplan:700@ivr")
    t = done["transfers"][-1]
    assert (t["state"], t["outcome"], t["dtmf"]) == ("bridged", "answered", "ww12w34#")
    assert backend.server is not None and caller.chan is not None
    leg = backend.server.channels.get(caller.chan.bridged_with or "")
    assert leg is not None and leg.sent_dtmf == ["ww12w34#"]
    commands = backend.server.commands
    sent = commands.index(f"api uuid_send_dtmf {leg.uuid} ww12w34#")
    assert sent < next(i for i, c in enumerate(commands) if "uuid_bridge" in c)
    kinds = [e["type"] for e in done["events"]]
    assert kinds.index("transfer.answered") < kinds.index("transfer.dtmf_sent")
    assert kinds.index("transfer.dtmf_sent") < kinds.index("transfer.completed")


# --- fallback chains and the registration check (issue 9 §3) ------------------------------

ANNOUNCEMENT = "One moment, I am putting you through."


async def chain_settled(api: Api, call_id: str, attempts: int) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        call = await api.ok("GET", f"/calls/{call_id}")
        rows = call["transfers"]
        done = len(rows) == attempts and rows[-1]["state"] in ("bridged", "failed")
        return call if done and call["status"] != "transferring" else None

    return await wait_for(check, f"{attempts} attempts settled", timeout=20)


async def test_chain_moves_on_from_a_busy_target_with_one_announcement(
    fs: tuple[FreeswitchBackend, Api],
) -> None:
    backend, api = fs
    assert backend.server is not None
    backend.server.set_originate_outcome("600", "busy")
    await backend.caller(DID)
    call = await active_call(api)
    body = {
        "type": "transfer",
        "destination": "dialplan:600@ringgroups",
        "message": ANNOUNCEMENT,
        "fallbacks": ["extension:1001"],
        "ring_timeout": 5,
    }
    await api.ok("POST", f"/calls/{call['id']}/control", body)
    done = await chain_settled(api, call["id"], 2)
    first, second = done["transfers"]
    assert (first["outcome"], second["state"]) == ("busy", "bridged")
    assert first["chain_id"] == second["chain_id"] == first["id"] and second["attempt"] == 1
    dials = [re.search(r"\}(\S+) &park\(\)$", c)[1] for c in originates(backend)]  # type: ignore[index]
    assert dials == ["loopback/600/ringgroups/XML", "user/1001"]
    said = [e["text"] for e in done["events"] if e["type"] == "assistant.said"]
    assert said.count(ANNOUNCEMENT) == 1 and not any("I'm still here" in t for t in said)


async def test_unregistered_and_busy_extensions_are_skipped_without_an_originate(
    fs: tuple[FreeswitchBackend, Api],
) -> None:
    """Bob (1002) is not registered (`sofia_contact` says error/user_not_registered); Alice
    (1001) is registered but on a call (a channel with her presence_id): neither is
    originated; the ring group answers."""
    backend, api = fs
    server = backend.server
    assert server is not None
    busy = FakeChannel("alice-on-a-call", "outbound", "1001", "+3120555", answered=True)
    busy.variables["presence_id"] = f"1001@{server.DOMAIN}"
    server.channels[busy.uuid] = busy
    try:
        await backend.caller(DID)
        call = await active_call(api)
        body = {
            "type": "transfer",
            "destination": "extension:1002",
            "fallbacks": ["extension:1001", "dialplan:600@ringgroups"],
            "ring_timeout": 5,
        }
        await api.ok("POST", f"/calls/{call['id']}/control", body)
        done = await chain_settled(api, call["id"], 3)
    finally:
        server.channels.pop(busy.uuid, None)
    bob, alice, group = done["transfers"]
    assert (bob["outcome"], bob["skipped"]) == (
        "unreachable",
        "extension 1002 is offline (not registered): not rung",
    )
    assert (alice["outcome"], alice["skipped"]) == (
        "busy",
        "extension 1001 is busy (on a call): not rung",
    )
    assert group["state"] == "bridged"
    assert [c for c in originates(backend) if "user/" in c] == []
    assert {"api sofia_contact 1002", "api sofia_contact 1001"} <= set(server.commands)
