"""The daemon's event loop (`event_loop`): uvloop by default, the standard loop on request,
and a clear start-up error when the configured loop cannot be had."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bridge import cli, eventloop
from bridge.config import Settings


async def _which() -> str:
    return eventloop.running_loop_name()


def test_the_daemon_runs_on_uvloop_by_default() -> None:
    assert Settings().event_loop == "uvloop"
    assert eventloop.run(_which(), "uvloop") == "uvloop"


def test_asyncio_runs_the_standard_loop() -> None:
    assert Settings(event_loop="asyncio").event_loop == "asyncio"
    assert eventloop.run(_which(), "asyncio") == "asyncio"


def test_an_unknown_loop_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="event_loop"):
        Settings(event_loop="tokio")  # type: ignore[arg-type]


def test_run_without_uvloop_fails_with_one_line_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    config = tmp_path / "callbridge.toml"
    config.write_text(f'database = "{tmp_path / "db.sqlite3"}"\n')
    with pytest.raises(SystemExit) as exited:
        cli.main(["--config", str(config), "run"])
    assert exited.value.code == cli.EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "uvloop cannot be imported" in err and 'event_loop = "asyncio"' in err
    assert not (tmp_path / "db.sqlite3").exists()  # nothing started


def test_run_sets_the_gil_switch_interval() -> None:
    """Threads that hand work back to the loop (the database's, STT's) wait up to this per
    GIL take while the loop runs Python: the daemon shortens Python's 5 ms default."""
    assert Settings().gil_switch_interval_ms == 1.0
    before = sys.getswitchinterval()
    try:
        eventloop.run(_which(), "asyncio", switch_interval_ms=1.0)
        assert sys.getswitchinterval() == pytest.approx(0.001)
    finally:
        sys.setswitchinterval(before)
