"""Settings: defaults, a TOML file, the environment winning over the file, and a configuration
that cannot weaken silently (unknown keys, wrong types, credentials in the ARI URL)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bridge import config
from bridge.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CALLBRIDGE_* from the caller's shell, no system config or data directory."""
    import os

    for name in list(os.environ):
        if name.startswith("CALLBRIDGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", tmp_path / "absent" / "callbridge.toml")
    monkeypatch.setattr(config, "SYSTEM_DATA_DIR", tmp_path / "absent")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


def _toml(tmp_path: Path, text: str) -> Path:
    conf = tmp_path / "callbridge.toml"
    conf.write_text(text)
    return conf


def test_defaults_are_safe() -> None:
    s = load_settings()
    assert s.api.host == "127.0.0.1"  # loopback unless told otherwise
    assert s.transfer.mode == "bridge"


def test_toml_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = _toml(
        tmp_path,
        'database = "/tmp/x.sqlite3"\n[ari]\nurl = "http://10.0.0.1:8088"\npassword = "file"\n'
        "[transfer]\nring_timeout = 20\n",
    )
    monkeypatch.setenv("CALLBRIDGE_CONFIG", str(conf))
    monkeypatch.setenv("CALLBRIDGE_ARI__PASSWORD", "env")
    s = load_settings()
    assert s.ari.url == "http://10.0.0.1:8088"
    assert s.ari.password.get_secret_value() == "env"
    assert s.transfer.ring_timeout == 20
    assert str(s.database) == "/tmp/x.sqlite3"


def test_bad_values_are_refused(tmp_path: Path) -> None:
    conf = _toml(tmp_path, "[transfer]\nmode = 'teleport'\n")
    with pytest.raises(ConfigError, match=r"\[transfer\] mode: Input should be"):
        load_settings(conf)


# --- unknown keys ------------------------------------------------------------------------


def _sections() -> list[str]:
    return sorted(config._sections())


@pytest.mark.parametrize("section", _sections())
def test_every_section_refuses_an_unknown_key_from_toml(tmp_path: Path, section: str) -> None:
    conf = _toml(tmp_path, f'[{section}]\nno_such_key = "hunter2"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(conf)
    assert info.value.problems == [f"[{section}] no_such_key: unknown key"]
    assert "hunter2" not in str(info.value)


def test_misspelt_guard_and_password_are_refused(tmp_path: Path) -> None:
    # The two lines that started the daemon with the guard off and the default password on.
    conf = _toml(tmp_path, '[transfer]\nallowed_prefix = ["+31"]\n[ari]\npasword = "s3cret-pw"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(conf)
    assert sorted(info.value.problems) == [
        "[ari] pasword: unknown key",
        "[transfer] allowed_prefix: unknown key",
    ]
    assert "s3cret-pw" not in str(info.value)


def test_nested_llm_endpoint_refuses_an_unknown_key(tmp_path: Path) -> None:
    conf = _toml(tmp_path, '[llm.endpoints.ollama]\nbase_url = "http://x/v1"\napi_kye = "k"\n')
    with pytest.raises(ConfigError, match=r"\[llm\] endpoints\.ollama\.api_kye: unknown key"):
        load_settings(conf)


def test_environment_refuses_unknown_keys_and_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBRIDGE_ARI__PASWORD", "s3cret-pw")
    monkeypatch.setenv("CALLBRIDGE_TRANSFR__ALLOWED_PREFIXES", '["+31"]')
    monkeypatch.setenv("CALLBRIDGE_DATABSE", "/tmp/x.sqlite3")
    monkeypatch.setenv("CALLBRIDGE_ASTERISK_ROOT", "/opt/lab")  # another tool's: not ours
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert sorted(info.value.problems) == [
        "CALLBRIDGE_DATABSE: unknown setting (did you mean CALLBRIDGE_DATABASE?)",
        "CALLBRIDGE_TRANSFR__ALLOWED_PREFIXES: unknown section [transfr]",
        "[ari] pasword: unknown key",
    ]
    assert "s3cret-pw" not in str(info.value)


def test_a_named_config_file_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "typo.toml")
    monkeypatch.setenv("CALLBRIDGE_CONFIG", str(tmp_path / "typo.toml"))
    with pytest.raises(ConfigError, match="not found"):
        load_settings()


def test_wrong_types_are_reported_without_the_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = _toml(tmp_path, '[api]\nport = "s3cret-port"\n[ari]\npassword = 123456789\n')
    monkeypatch.setenv("CALLBRIDGE_TTS__API_KEY", '{"oops": "s3cret-key"}')
    monkeypatch.setenv("CALLBRIDGE_STT__TIMEOUT", "s3cret-timeout")
    with pytest.raises(ConfigError) as info:
        load_settings(conf)
    text = str(info.value)
    for secret in ("s3cret-port", "123456789", "s3cret-key", "s3cret-timeout"):
        assert secret not in text
    assert "[api] port: Input should be a valid integer" in text
    assert "[ari] password: Input should be a valid string" in text
    assert "[stt] timeout: Input should be a valid number" in text


# --- the ARI URL -------------------------------------------------------------------------


def test_ari_credentials_in_the_url_are_taken_from_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBRIDGE_ARI__URL", "http://asterisk:p%40ss%3Aw@10.0.0.1:8088/")
    s = load_settings()
    assert s.ari.url == "http://10.0.0.1:8088/"  # no credentials left for aiohttp to refuse
    assert s.ari.username == "asterisk"
    assert s.ari.password.get_secret_value() == "p@ss:w"


def test_ari_credentials_in_the_url_that_disagree_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CALLBRIDGE_ARI__URL", "http://asterisk:s3cret-a@10.0.0.1:8088")
    monkeypatch.setenv("CALLBRIDGE_ARI__PASSWORD", "s3cret-b")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.problems == ["[ari] url has a password that differs from password"]
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["10.0.0.1:8088", "ws://10.0.0.1:8088", "http://:8088", "http://h:port", "http://h?a=1"]
)
def test_ari_url_must_be_http(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("CALLBRIDGE_ARI__URL", url)
    with pytest.raises(ConfigError, match=r"\[ari\] url"):
        load_settings()


# --- the database ------------------------------------------------------------------------


def test_relative_database_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = _toml(tmp_path, 'database = "data/cb.sqlite3"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_settings(conf).database == tmp_path / "data" / "cb.sqlite3"


def test_default_database_is_absolute_and_independent_of_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings().database == tmp_path / "xdg" / "callbridge" / "callbridge.sqlite3"
    system = tmp_path / "var-lib-callbridge"
    system.mkdir()
    monkeypatch.setattr(config, "SYSTEM_DATA_DIR", system)
    assert load_settings().database == system / "callbridge.sqlite3"


def test_default_config_file_is_read_when_none_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = _toml(tmp_path, 'database = "cb.sqlite3"\n[transfer]\nring_timeout = 12\n')
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", conf)
    s = load_settings()
    assert s.transfer.ring_timeout == 12
    assert s.database == tmp_path / "cb.sqlite3"


def test_settings_constructed_directly_refuse_unknown_keys() -> None:
    with pytest.raises(ValueError, match="allowed_prefix"):
        Settings(transfer={"allowed_prefix": ["+31"]})  # type: ignore[arg-type]


# --- the command line --------------------------------------------------------------------


def test_run_with_a_bad_config_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    conf = _toml(tmp_path, '[transfer]\nallowed_prefix = ["+31"]\n[ari]\npasword = "s3cret"\n')
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "--config", str(conf), "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines == [
        "callbridge: invalid configuration: [ari] pasword: unknown key;"
        " [transfer] allowed_prefix: unknown key"
    ]
    assert "s3cret" not in proc.stderr


def test_a_short_metrics_token_is_refused_without_echoing_it(tmp_path: Path) -> None:
    """The scrape token is a bearer: a short one would be guessed."""
    conf = _toml(tmp_path, "[metrics]\ntoken = 'abc123'\n")
    with pytest.raises(ConfigError, match=r"\[metrics\] token: .*at least 16") as info:
        load_settings(conf)
    assert "abc123" not in str(info.value)
    long_enough = _toml(tmp_path, "[metrics]\ntoken = 'a-long-random-scrape-token'\n")
    token = load_settings(long_enough).metrics.token
    assert token is not None and token.get_secret_value() == "a-long-random-scrape-token"
