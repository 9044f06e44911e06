"""A leg's first events may come before our application is subscribed to it, on the real
Asterisk: the adapter creates and dials a leg with one request (the INVITE leaves with it,
issue 8 section 4) and subscribes afterwards. A destination that answers 183 with SDP and never
180 (as carriers do) is only seen through the `Dial` event's PROGRESS; when that 183 comes
before the subscription it must still count (the transfer ends `no_answer`, not
`unreachable` "it never rang", blaming the destination). The race is made deterministic by
holding the daemon at the `before_subscribe` fault point until Asterisk has taken the 183, or
stopping it there (the next process subscribes at its connect)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bridge import faults
from tests.support.daemon import start_daemon, wait_for
from tests.support.flows import DESTINATION, LabCall, setup_directory, transfer_settled

pytestmark = pytest.mark.asterisk


def _made_progress(lab: Any, leg: str) -> bool:
    """Asterisk took the leg's 183: its dial logs "<channel> is making progress" (verbose 3,
    the lab's messages.log)."""
    status, channel = lab.ari("GET", f"/channels/{leg}")
    if status != 200:
        return False
    log = Path(lab.instance_dir) / "log" / "messages.log"
    return f"{channel['name']} is making progress" in log.read_text(errors="replace")


@pytest.mark.parametrize("how", ["held", "restarted"])
async def test_a_183_before_the_leg_subscription_still_counts_as_ringing(
    asterisk_lab: Any, tmp_path: Path, how: str
) -> None:
    """`held`: the daemon subscribes late; `restarted`: it dies before subscribing and the
    next process subscribes at its (re)connect."""
    daemon, api = await start_daemon(asterisk_lab, tmp_path)
    try:
        async with LabCall(asterisk_lab, api, "uas_early_media.xml") as lab_call:
            assert lab_call.uas is not None
            uas = lab_call.uas
            await setup_directory(api, uas, auth=False)
            call = await lab_call.dial(hold_ms=60000)
            if how == "held":
                reached, release = faults.hold("before_subscribe")
            else:
                reached, release = faults.arm("before_subscribe"), None
            # Long enough for a new daemon to be there before the ring timeout.
            ring_timeout = 4 if how == "held" else 10
            await api.ok(
                "POST",
                f"/calls/{call['id']}/control",
                {"type": "transfer", "destination": DESTINATION, "ring_timeout": ring_timeout},
            )
            await asyncio.wait_for(reached.wait(), 15)
            transfer = (await api.ok("GET", f"/calls/{call['id']}"))["transfers"][-1]
            leg = f"cbleg-{transfer['id']}"
            # The 183 reaches Asterisk before the subscription.
            await wait_for(lambda: _made_progress(asterisk_lab, leg), "Asterisk to take the 183")
            if release is not None:
                release.set()
            else:  # the daemon "dies" here; a new one takes over
                assert daemon.calls is not None
                await daemon.calls.stop()
                await api.close()
                await daemon.stop()
                daemon, api = await start_daemon(asterisk_lab, tmp_path)

            done = await transfer_settled(api, call["id"])
            last = done["transfers"][-1]
            assert (last["state"], last["outcome"], last["sip_code"]) == (
                "failed",
                "no_answer",
                None,
            ), last
            assert "transfer.progress" in [e["type"] for e in done["events"]]
            assert done["status"] == "active"  # the caller is back with the assistant
            assert len(uas.received_requests("INVITE")) == 1
    finally:
        faults.disarm()
        await api.close()
        await daemon.stop()
