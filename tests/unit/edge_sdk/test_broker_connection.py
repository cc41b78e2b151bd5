"""edge_sdk.broker_connection: flag > environment > file, files named with their source, password hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.broker_connection import (
    ENVIRONMENT,
    PASSWORD_ENV,
    BrokerConnection,
    connection_file_settings,
    resolve_connection,
)
from edge_sdk.errors import ConfigError
from edge_sdk.mqtt import MqttOptions


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("flag", "env", "file"):
        for key in ("ca_file", "cert_file", "key_file", "password_file"):
            path = tmp_path / f"{name}-{key}"
            path.write_text(f"{name}-secret\n" if key == "password_file" else "pem")
            out[f"{name}-{key}"] = path
    return out


def _all(files: dict[str, Path], source: str) -> dict[str, str]:
    values = {k: str(files[f"{source}-{k}"]) for k in ("ca_file", "cert_file", "key_file", "password_file")}
    return {**values, "username": f"{source}-user"}


def test_a_flag_wins_over_the_environment_which_wins_over_the_file(files: dict[str, Path]) -> None:
    env = {ENVIRONMENT[k]: v for k, v in _all(files, "env").items()}
    file_values = _all(files, "file")
    for key in ("ca_file", "cert_file", "key_file", "username"):
        alone = resolve_connection({}, {}, file_values, "broker.toml")
        assert str(getattr(alone, key)) == file_values[key]
        over_file = resolve_connection({}, env, file_values, "broker.toml")
        assert str(getattr(over_file, key)) == env[ENVIRONMENT[key]]
        flag = _all(files, "flag")[key]
        over_env = resolve_connection({key: flag}, env, file_values, "broker.toml")
        assert str(getattr(over_env, key)) == flag
    assert resolve_connection({}, {}, file_values, "f").password == "file-secret"
    assert resolve_connection({}, env, file_values, "f").password == "env-secret"
    assert resolve_connection({}, {**env, PASSWORD_ENV: "plain"}, file_values, "f").password == "plain"
    flagged = resolve_connection({"password_file": files["flag-password_file"]}, {**env, PASSWORD_ENV: "p"}, {}, "f")
    assert flagged.password == "flag-secret"


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file", "password_file"])
@pytest.mark.parametrize("source", ["flag", "env", "file"])
def test_a_missing_file_is_named_with_its_setting_path_and_source(key: str, source: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    flags = {key: str(missing)} if source == "flag" else {}
    env = {ENVIRONMENT[key]: str(missing)} if source == "env" else {}
    file_values = {key: str(missing)} if source == "file" else {}
    extra = {"username": "u"} if key == "password_file" else {}
    if key == "key_file":
        (tmp_path / "cert.pem").write_text("pem")
        extra["cert_file"] = str(tmp_path / "cert.pem")
    with pytest.raises(ConfigError) as caught:
        resolve_connection({**flags, **extra}, env, file_values, "/etc/x/broker.toml")
    where = {"flag": f"--{key.replace('_', '-')}", "env": ENVIRONMENT[key], "file": "/etc/x/broker.toml"}[source]
    assert f"{key} {missing} does not exist (from {where})" in caught.value.message
    assert caught.value.details["path"] == str(missing)


def test_a_directory_or_empty_password_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a file"):
        resolve_connection({"ca_file": str(tmp_path)}, {}, {}, "f")
    (tmp_path / "pw").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        resolve_connection({"username": "u", "password_file": str(tmp_path / "pw")}, {}, {}, "f")


def test_inconsistent_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="needs a username"):
        resolve_connection({}, {PASSWORD_ENV: "secret"}, {}, "f")
    with pytest.raises(ConfigError, match="needs its cert_file"):
        BrokerConnection(key_file=Path("k"))
    with pytest.raises(ConfigError, match="username is empty"):
        BrokerConnection(username="")


def test_the_password_is_never_shown() -> None:
    connection = BrokerConnection(username="dev", password="hunter2-secret")
    options = connection.mqtt_options(MqttOptions(client_id="x"))
    assert options.username == "dev" and options.password == "hunter2-secret"
    for shown in (repr(connection), str(connection), repr(options), str(connection.to_dict())):
        assert "hunter2" not in shown
    assert connection.to_dict()["password_set"] is True


def test_file_settings_take_a_tls_table_and_refuse_unknown_keys_and_wrong_types() -> None:
    assert connection_file_settings({"tls": {"ca_file": "a"}, "username": "u"}, "f") == {
        "ca_file": "a",
        "username": "u",
    }
    with pytest.raises(ConfigError, match=r"f: unknown setting\(s\) password"):
        connection_file_settings({"password": "x"}, "f")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) tls.username"):
        connection_file_settings({"tls": {"username": "x"}}, "f")
    with pytest.raises(ConfigError, match=r"f: \[tls\] cert_file must be a string, not 3"):
        connection_file_settings({"tls": {"cert_file": 3}}, "f")
    with pytest.raises(ConfigError, match=r"\[tls\] must be a table"):
        connection_file_settings({"tls": "x"}, "f")
