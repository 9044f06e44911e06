"""The database file: private permissions, and the CLI and the daemon agreeing on which file it
is (a key created by `callbridge api-key create` must be a key the daemon accepts)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bridge import config
from bridge.api.keys import verify_api_key
from bridge.cli import main
from bridge.config import load_settings
from bridge.store.db import Database, DatabaseRefused


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("CALLBRIDGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", tmp_path / "etc" / "callbridge.toml")
    monkeypatch.setattr(config, "SYSTEM_DATA_DIR", tmp_path / "var-lib")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_new_database_is_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "cb.sqlite3"
    db = await Database.open(path)
    await db.close()
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700


async def test_an_existing_database_with_loose_permissions_is_fixed(tmp_path: Path) -> None:
    path = tmp_path / "cb.sqlite3"
    db = await Database.open(path)
    await db.close()
    os.chmod(path, 0o644)
    wal = path.with_name("cb.sqlite3-wal")
    wal.touch()
    os.chmod(wal, 0o664)
    with capture_logs() as logs:
        db = await Database.open(path)
    try:
        assert _mode(path) == 0o600
        assert _mode(wal) == 0o600  # SQLite removes it on close
    finally:
        await db.close()
    fixed = [e for e in logs if e["event"] == "database.permissions_fixed"]
    assert [(e["file"], e["was"]) for e in fixed] == [(str(path), "0o644"), (str(wal), "0o664")]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
async def test_a_database_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cb.sqlite3"
    path.touch(mode=0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(DatabaseRefused, match="belongs to uid 65534"):
        await Database.open(path)


def _has_key(path: Path, key: str) -> bool:
    async def check() -> bool:
        db = await Database.open(path)
        try:
            return await verify_api_key(db, key)
        finally:
            await db.close()

    return asyncio.run(check())


def test_api_key_create_without_config_uses_the_daemons_default_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The operator creates the key from their home directory...
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(home)
    assert main(["api-key", "create", "--name", "ops"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    # ...the daemon (started by systemd from /) resolves the same file.
    monkeypatch.chdir("/")
    daemon_db = load_settings().database
    assert daemon_db == tmp_path / "xdg" / "callbridge" / "callbridge.sqlite3"
    assert f"key stored in the database {daemon_db}" in err
    assert _has_key(daemon_db, key)
    assert not (home / "callbridge.sqlite3").exists()


def test_api_key_create_with_a_config_file_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    conf = etc / "callbridge.toml"
    conf.write_text('database = "callbridge.sqlite3"\n')
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", conf)  # /etc/callbridge/callbridge.toml
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["api-key", "create"]) == 0
    out, err = capsys.readouterr()
    assert f"key stored in the database {etc / 'callbridge.sqlite3'}" in err
    assert _has_key(etc / "callbridge.sqlite3", out.strip())


def test_cli_refuses_a_database_it_cannot_keep_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file to another user")
    path = tmp_path / "cb.sqlite3"
    path.touch(mode=0o600)
    os.chown(path, 65534, 65534)
    monkeypatch.setenv("CALLBRIDGE_DATABASE", str(path))
    with pytest.raises(SystemExit) as info:
        main(["api-key", "create"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"callbridge: database file {path} belongs to uid 65534, not to the daemon's user"
        " (uid 0): refusing to keep trunk passwords in it"
    ]


def test_run_that_cannot_start_exits_with_one_line(tmp_path: Path) -> None:
    """A port in use: exit status 1, one line, no traceback, and the process really ends (the
    database thread it had opened does not keep it alive)."""
    import socket
    import subprocess
    import sys

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    nobody = socket.socket()
    nobody.bind(("127.0.0.1", 0))  # bound, not listening: ARI connections are refused
    conf = tmp_path / "callbridge.toml"
    conf.write_text(
        f'database = "cb.sqlite3"\n[api]\nport = {busy.getsockname()[1]}\n'
        f'[ari]\nurl = "http://127.0.0.1:{nobody.getsockname()[1]}"\n'
        "[agent]\nenabled = false\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HOME": str(tmp_path)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bridge", "--config", str(conf), "run"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        busy.close()
        nobody.close()
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("callbridge: cannot start: ") and "address already in use" in last
