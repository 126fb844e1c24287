"""Config: precedence flag > CHATCTL_* > --config > ./chatctl.toml > user dir > default, and clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

import chatctl
from chatctl import ConfigError, load_config
from conftest import ROOT, run_cli


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_with_no_files(isolated_home):
    config = load_config("client")
    assert (config.host, config.port, config.user) == ("127.0.0.1", 7001, "")
    assert config.files == ()


def test_each_layer_overrides_the_one_below(isolated_home, tmp_path, monkeypatch):
    home = Path(isolated_home["HOME"])
    user_file = write(home / ".config" / "chatctl" / "chatctl.toml",
                      '[client]\nport = 7101\nhost = "from-user-dir"\nuser = "u1"\ntimeout = 1.5\n')
    assert load_config("client").port == 7101

    cwd_file = write(Path.cwd() / "chatctl.toml", "[client]\nport = 7102\nhost = \"from-cwd\"\n")
    config = load_config("client")
    assert (config.port, config.host, config.user, config.timeout) == (7102, "from-cwd", "u1", 1.5)

    explicit = write(tmp_path / "explicit.toml", "[client]\nport = 7103\n")
    config = load_config("client", config_file=explicit)
    assert (config.port, config.host) == (7103, "from-cwd")
    assert config.files == (user_file, cwd_file, explicit)

    monkeypatch.setenv("CHATCTL_PORT", "7104")
    assert load_config("client", config_file=explicit).port == 7104
    assert load_config("client", {"port": 7105}, config_file=explicit).port == 7105
    # None means "flag not given": the lower layers show through
    assert load_config("client", {"port": None}, config_file=explicit).port == 7104


def test_env_applies_to_the_section_the_command_reads(isolated_home, monkeypatch):
    monkeypatch.setenv("CHATCTL_PORT", "7200")
    monkeypatch.setenv("CHATCTL_SENDQ", "4096")
    assert load_config("server").port == 7200
    assert load_config("server").sendq == 4096
    assert load_config("client").port == 7200


@pytest.mark.parametrize(("text", "message"), [
    ("[client]\nprot = 1\n", "unknown key [client] prot"),
    ("[cleint]\nport = 1\n", "unknown section [cleint]"),
    ("[client]\nport = \"seven\"\n", "[client] port: expected a whole number"),
    ("[client]\nport = 70000\n", "[client] port: must be at most 65535"),
    ("[server]\nlog_level = \"loud\"\n", "[server] log_level: expected one of debug, info"),
    ("[server]\nsendq = true\n", "[server] sendq: expected a whole number"),
    ("[client\nport = 1\n", "invalid TOML"),
])
def test_config_errors_name_the_file_and_key(isolated_home, tmp_path, text, message):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config("client", config_file=path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_bad_environment_value_names_the_variable(isolated_home, monkeypatch):
    monkeypatch.setenv("CHATCTL_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="environment variable CHATCTL_TIMEOUT: expected a number"):
        load_config("client")


def test_missing_config_file(isolated_home):
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        load_config("client", config_file="nope.toml")


def test_shipped_config_lists_every_key_with_its_default():
    shipped = tomllib.loads((ROOT / "chatctl.toml").read_text())
    for section, cls in chatctl.CONFIG_SECTIONS.items():
        keys = chatctl.config_keys(cls)
        assert set(shipped[section]) == set(keys), section
        for name, f in keys.items():
            value = shipped[section][name]
            assert (tuple(value) if isinstance(value, list) else value) == f.default, f"[{section}] {name}"
    text = (ROOT / "chatctl.toml").read_text().splitlines()
    for i, line in enumerate(text):  # each key has its one-line comment above it
        if "=" in line and not line.startswith("#"):
            assert text[i - 1].startswith("# "), line


def test_cli_config_error_is_one_line_with_exit_code_3(isolated_home, tmp_path):
    path = write(tmp_path / "bad.toml", "[client]\nport = \"x\"\n")
    result = run_cli("who", "--config", str(path), env=isolated_home)
    assert result.returncode == chatctl.EXIT_CONFIG
    assert result.stderr.strip().count("\n") == 0
    assert "bad.toml: [client] port: expected a whole number" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_reads_cwd_config_and_flag_wins(isolated_home, server):
    write(Path.cwd() / "chatctl.toml", f"[client]\nhost = \"127.0.0.1\"\nport = {server.port}\n")
    assert run_cli("who", "--json", env=isolated_home).stdout.strip() == "[]"
    result = run_cli("who", "--json", "--port", "1", env=isolated_home)
    assert result.returncode == chatctl.EXIT_CONNECT
    assert "127.0.0.1:1" in result.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "1e400"])
def test_numbers_must_be_finite(isolated_home, value):
    result = run_cli("who", env={**isolated_home, "CHATCTL_TIMEOUT": value})
    assert result.returncode == chatctl.EXIT_CONFIG
    assert "expected a finite number" in result.stderr and "Traceback" not in result.stderr


def test_a_huge_timeout_is_a_config_error(isolated_home):
    result = run_cli("who", env={**isolated_home, "CHATCTL_TIMEOUT": "1e12"})
    assert result.returncode == chatctl.EXIT_CONFIG
    assert "must be at most" in result.stderr and "Traceback" not in result.stderr
