"""ConsulSettings: the consul CLI's environment variables, validated once, token redacted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshd.consul import ConsulSettings, ConsulSettingsError
from meshd.consul.settings import normalise_address

SECRET = "0b6c1f6e-2d3a-4c55-8f1e-secret-token"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("127.0.0.1:8500", "http://127.0.0.1:8500"),
        ("http://127.0.0.1:8500", "http://127.0.0.1:8500"),
        ("HTTPS://consul.example:8501/", "https://consul.example:8501"),
        ("https://consul.example", "https://consul.example:8501"),
        ("localhost", "http://localhost:8500"),
        ("[::1]:8500", "http://[::1]:8500"),
        ("https://[::1]:9000", "https://[::1]:9000"),
        ("  10.0.0.1:18500 ", "http://10.0.0.1:18500"),
    ],
)
def test_address_is_normalised(raw: str, expected: str) -> None:
    assert normalise_address(raw, "CONSUL_HTTP_ADDR") == expected
    assert ConsulSettings(address=raw).address == expected


@pytest.mark.parametrize(
    "raw",
    [
        "unix:///var/run/consul.sock",
        "ftp://127.0.0.1:21",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:port",
        "http://127.0.0.1:8500/v1",
        "http://user:pw@127.0.0.1:8500",
        "http://:8500",
        "",
    ],
)
def test_bad_address_names_the_variable(raw: str) -> None:
    with pytest.raises(ConsulSettingsError, match="CONSUL_HTTP_ADDR"):
        ConsulSettings.from_env({"CONSUL_HTTP_ADDR": raw or "http://"})


def test_defaults_when_environment_is_empty() -> None:
    settings = ConsulSettings.from_env({})
    assert settings == ConsulSettings()
    assert settings.address == "http://127.0.0.1:8500"
    assert settings.token is None
    assert settings.verify is True


def test_from_env_reads_every_variable(tmp_path: Path) -> None:
    settings = ConsulSettings.from_env(
        {
            "CONSUL_HTTP_ADDR": "10.1.2.3:8501",
            "CONSUL_HTTP_SSL": "true",
            "CONSUL_HTTP_TOKEN": SECRET,
            "CONSUL_CACERT": str(tmp_path / "ca.pem"),
            "CONSUL_CAPATH": str(tmp_path),
            "CONSUL_CLIENT_CERT": str(tmp_path / "c.pem"),
            "CONSUL_CLIENT_KEY": str(tmp_path / "k.pem"),
            "CONSUL_HTTP_SSL_VERIFY": "false",
        }
    )
    assert settings.address == "https://10.1.2.3:8501"
    assert settings.scheme == "https"
    assert settings.token == SECRET
    assert settings.ca_file == tmp_path / "ca.pem"
    assert settings.ca_path == tmp_path
    assert settings.client_cert == tmp_path / "c.pem"
    assert settings.client_key == tmp_path / "k.pem"
    assert settings.verify is False


def test_token_file_is_read_and_token_wins(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(SECRET + "\n")
    from_file = ConsulSettings.from_env({"CONSUL_HTTP_TOKEN_FILE": str(token_file)})
    assert from_file.token == SECRET
    both = ConsulSettings.from_env(
        {"CONSUL_HTTP_TOKEN_FILE": str(token_file), "CONSUL_HTTP_TOKEN": "other"}
    )
    assert both.token == "other"


@pytest.mark.parametrize("content", [b"", b"\n", "caf\u00e9-token".encode()])
def test_bad_token_file_is_named_but_never_echoed(tmp_path: Path, content: bytes) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(content)
    with pytest.raises(ConsulSettingsError, match="CONSUL_HTTP_TOKEN_FILE") as caught:
        ConsulSettings.from_env({"CONSUL_HTTP_TOKEN_FILE": str(token_file)})
    assert str(token_file) in str(caught.value)
    assert "caf" not in str(caught.value)


def test_missing_token_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConsulSettingsError, match=r"CONSUL_HTTP_TOKEN_FILE.*missing"):
        ConsulSettings.from_env({"CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "missing")})


def test_token_never_in_repr_or_str() -> None:
    settings = ConsulSettings(token=SECRET)
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert SECRET not in repr(settings.with_token(SECRET))
    assert settings.with_token(None).token is None


@pytest.mark.parametrize("token", ["", "with space", "line\nbreak", "t\u00f6ken"])
def test_malformed_token_rejected_without_echo(token: str) -> None:
    with pytest.raises(ConsulSettingsError, match="token") as caught:
        ConsulSettings(token=token)
    if token:
        assert token not in str(caught.value)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CONSUL_HTTP_SSL": "maybe"}, "CONSUL_HTTP_SSL"),
        ({"CONSUL_HTTP_SSL_VERIFY": "2"}, "CONSUL_HTTP_SSL_VERIFY"),
        ({"CONSUL_CLIENT_CERT": "/c.pem"}, "CONSUL_CLIENT_KEY"),
    ],
)
def test_bad_variables_are_named(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConsulSettingsError, match=needle):
        ConsulSettings.from_env(env)


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ConsulSettingsError, match="timeout_s"):
        ConsulSettings(timeout_s=0)


def test_settings_are_frozen() -> None:
    settings = ConsulSettings()
    with pytest.raises(AttributeError):
        settings.address = "http://10.0.0.1:8500"  # type: ignore[misc]


def test_from_config_reads_a_private_token_file_and_overrides_the_environment(
    tmp_path, monkeypatch
) -> None:
    from meshd.config import ConfigError, ConsulConfig

    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.9:1")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    token_file = tmp_path / "consul.token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"s3cr3t-token\n")
    os.close(fd)
    cfg = ConsulConfig(address="http://127.0.0.1:8500", token_file=token_file)
    settings = ConsulSettings.from_config(cfg, file="agent.toml")
    assert (settings.address, settings.token) == ("http://127.0.0.1:8500", "s3cr3t-token")
    assert "s3cr3t" not in repr(settings)
    no_file = ConsulSettings.from_config(ConsulConfig(address="http://127.0.0.1:8500"), file="f")
    assert no_file.token == "from-env"
    # An address the file does not give is the environment's, as documented (it used to
    # be the built-in default whatever CONSUL_HTTP_ADDR said).
    assert ConsulSettings.from_config(ConsulConfig(), file="f").address == "http://127.0.0.9:1"
    monkeypatch.delenv("CONSUL_HTTP_ADDR")
    assert ConsulSettings.from_config(ConsulConfig(), file="f").address == "http://127.0.0.1:8500"
    token_file.chmod(0o644)
    with pytest.raises(ConfigError, match=r"agent.toml: consul.token_file: .*group"):
        ConsulSettings.from_config(cfg, file="agent.toml")
