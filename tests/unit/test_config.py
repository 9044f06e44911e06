"""Settings: defaults, a TOML file, and the environment winning over the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bridge.config import load_settings


def test_defaults_are_safe() -> None:
    s = load_settings()
    assert s.api.host == "127.0.0.1"  # loopback unless told otherwise
    assert s.transfer.mode == "bridge"


def test_toml_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "callbridge.toml"
    conf.write_text(
        'database = "/tmp/x.sqlite3"\n[ari]\nurl = "http://10.0.0.1:8088"\npassword = "file"\n'
        "[transfer]\nring_timeout = 20\n"
    )
    monkeypatch.setenv("CALLBRIDGE_CONFIG", str(conf))
    monkeypatch.setenv("CALLBRIDGE_ARI__PASSWORD", "env")
    s = load_settings()
    assert s.ari.url == "http://10.0.0.1:8088"
    assert s.ari.password.get_secret_value() == "env"
    assert s.transfer.ring_timeout == 20
    assert str(s.database) == "/tmp/x.sqlite3"


def test_bad_values_are_refused(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text("[transfer]\nmode = 'teleport'\n")
    with pytest.raises(ValidationError, match=r"transfer\.mode"):
        load_settings(conf)
