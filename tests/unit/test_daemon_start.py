"""What a starting daemon tells its operator: the toll-fraud policy in force (issue 7 §2), logged
by the daemon itself at start, not only by `TransferPolicy.log_start` in isolation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from bridge.app import Daemon
from bridge.config import Settings
from tests.support.esl_server import FakeEslServer


@pytest.mark.parametrize(
    ("transfer", "level", "event", "mode"),
    [
        ({"allowed_prefixes": ["+31"]}, "info", "transfer.policy", "allow_lists"),
        ({}, "info", "transfer.policy", "assistant_destinations"),
        ({"allow_any": True}, "warning", "transfer.policy_open", "allow_any"),
    ],
)
async def test_the_daemon_logs_the_policy_in_force_at_start(
    tmp_path: Path, transfer: dict[str, Any], level: str, event: str, mode: str
) -> None:
    server = FakeEslServer("pw")
    await server.start()
    settings = Settings(
        database=tmp_path / "callbridge.sqlite3",
        api={"host": "127.0.0.1", "port": 0},
        pbx="freeswitch",
        freeswitch={
            "host": "127.0.0.1",
            "port": server.port,
            "password": "pw",
            "gateway_dir": tmp_path / "gw",
        },
        agent={"enabled": False},
        transfer=transfer,
    )
    daemon = Daemon(settings)
    try:
        with capture_logs() as logs:
            await daemon.start()
    finally:
        await daemon.stop()
        await server.stop()
    policy = [e for e in logs if e["event"].startswith("transfer.policy")]
    assert [(e["event"], e["log_level"], e["mode"]) for e in policy] == [(event, level, mode)]
