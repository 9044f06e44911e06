"""DTMF after answer across a daemon restart (issue 9 §4): the digits go out once per
transfer. A fake PBX that records verbs, a real SQLite store shared by the two processes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bridge.calls.model import CallStatus
from bridge.calls.transfer import TransferState
from bridge.directory.models import Assistant
from bridge.pbx.ports import ConnectionRestored, LegAnswered, LegRinging
from tests.support.calls import DEST, CallEnv, FakePbx, open_env, until

DIGITS = "WWWW1234#"  # long enough that the first process is stopped before it bridges


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[CallEnv]:
    env = await open_env(tmp_path)
    now = datetime.now(UTC)
    env.directory.assistant = Assistant.model_validate(
        {
            "id": "a1",
            "name": "Acme",
            "created_at": now,
            "updated_at": now,
            "llm_config": {
                "tools": [
                    {
                        "type": "transfer_call",
                        "destinations": [
                            {"number": DEST, "description": "The IVR line", "dtmf": DIGITS}
                        ],
                    }
                ]
            },
        }
    )
    try:
        yield env
    finally:
        await env.close()


async def restart(env: CallEnv, leg: str, *, answered: bool) -> FakePbx:
    """The daemon stops (or dies) and a new one starts on the same database; the PBX still
    has the caller and the leg."""
    await env.service.stop()
    pbx = FakePbx()
    env.service = env.new_service(pbx)
    await env.service.start()
    await env.push(ConnectionRestored("", callers=(env.arrival(),), legs=((leg, answered),)))
    return pbx


async def bridged(env: CallEnv, call_id: str) -> dict[str, Any]:
    data = await env.wait_status(call_id, CallStatus.TRANSFERRED)
    assert data["transfers"][-1]["state"] == TransferState.BRIDGED.value
    return data


async def placed(env: CallEnv) -> tuple[Any, Any, str]:
    """A caller, and its transfer to the IVR line with the leg placed."""
    session = await env.arrive()
    transfer = await env.transfer(session)
    assert transfer.leg_id is not None
    return session, transfer, transfer.leg_id


async def test_dtmf_sent_before_a_restart_is_not_sent_again(env: CallEnv) -> None:
    session, _, leg = await placed(env)
    await env.push(LegAnswered(leg))
    await until(lambda: env.pbx.verbs("send_dtmf") == [(leg, DIGITS)], "the DTMF sent")

    async def recorded() -> bool:
        kinds = [e["type"] for e in (await env.stored(session.call.id))["events"]]
        return "transfer.dtmf_sent" in kinds

    await until(recorded, "transfer.dtmf_sent recorded")
    pbx = await restart(env, leg, answered=True)
    data = await bridged(env, session.call.id)
    assert pbx.verbs("send_dtmf") == []  # the new process did not send the digits again
    assert pbx.verbs("connect") == [("ch1", leg)]
    sent = [e for e in data["events"] if e["type"] == "transfer.dtmf_sent"]
    assert len(sent) == 1


async def test_dtmf_not_sent_before_a_restart_is_sent_once_after_it(env: CallEnv) -> None:
    _, transfer, leg = await placed(env)
    await env.push(LegRinging(leg))
    await until(lambda: transfer.state is TransferState.RINGING, "ringing")
    pbx = await restart(env, leg, answered=True)  # it answered while we were away
    await until(lambda: pbx.verbs("send_dtmf") == [(leg, DIGITS)], "the DTMF sent once")
    assert pbx.verbs("connect") == []  # the bridge waits for the digits to play
