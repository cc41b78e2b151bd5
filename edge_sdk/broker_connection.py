"""How a client proves who it is to the broker: TLS files and a username/password, from three places.

``edgectl`` and ``edge-agent`` take the same settings, each from a flag, the environment
or a config file, in that order of precedence (a flag wins over the environment, the
environment over the file), setting by setting:

=============  ===================  ==========================================  ======================
setting        flag                 environment                                 config file
=============  ===================  ==========================================  ======================
ca_file        ``--ca-file``        ``EDGE_SDK_BROKER_CA_FILE``                 ``[tls] ca_file``
cert_file      ``--cert-file``      ``EDGE_SDK_BROKER_CERT_FILE``               ``[tls] cert_file``
key_file       ``--key-file``       ``EDGE_SDK_BROKER_KEY_FILE``                ``[tls] key_file``
username       ``--username``       ``EDGE_SDK_BROKER_USERNAME``                ``username``
password       ``--password-file``  ``EDGE_SDK_BROKER_PASSWORD`` (the value),   ``password_file``
                                    or ``EDGE_SDK_BROKER_PASSWORD_FILE``
=============  ===================  ==========================================  ======================

A password is never taken from a command line (``ps`` shows it to every user) and never
printed: :class:`BrokerConnection` leaves it out of its ``repr`` and ``to_dict``. A file
named by any of these settings that is missing or unreadable is refused with its setting,
its path and where the setting came from, before any connection is tried.

Pure apart from :func:`resolve_connection` reading the password file and checking that the
named files can be read; the caller passes the environment in (library code reads none).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk.errors import ConfigError

if TYPE_CHECKING:  # the client (and paho) loads only where a connection is made
    from edge_sdk.mqtt import MqttOptions

__all__ = [
    "CONNECTION_SETTINGS",
    "ENVIRONMENT",
    "PASSWORD_ENV",
    "PROTOCOLS",
    "TLS_SETTINGS",
    "BrokerConnection",
    "connection_file_settings",
    "resolve_connection",
]

#: The MQTT versions a client may ask for (``MqttOptions.protocol``, ``--mqtt-protocol``): here,
#: beside the other settings, so that a program reads its settings without loading the client.
PROTOCOLS = ("auto", "5", "3.1.1")
#: The TLS settings, as named in config files (under ``[tls]``) and in ``MqttOptions``.
TLS_SETTINGS = ("ca_file", "cert_file", "key_file")
#: Every setting of a broker connection a flag, the environment or a config file may give.
CONNECTION_SETTINGS = (*TLS_SETTINGS, "username", "password_file")
#: The environment variable of each setting.
ENVIRONMENT: Mapping[str, str] = {
    "ca_file": "EDGE_SDK_BROKER_CA_FILE",
    "cert_file": "EDGE_SDK_BROKER_CERT_FILE",
    "key_file": "EDGE_SDK_BROKER_KEY_FILE",
    "username": "EDGE_SDK_BROKER_USERNAME",
    "password_file": "EDGE_SDK_BROKER_PASSWORD_FILE",
}
#: The environment variable holding the password itself (it wins over ``EDGE_SDK_BROKER_PASSWORD_FILE``).
PASSWORD_ENV = "EDGE_SDK_BROKER_PASSWORD"
#: Largest password file read (a password, not a document).
_MAX_PASSWORD_BYTES = 4096


@dataclass(frozen=True)
class BrokerConnection:
    """TLS material and credentials for one MQTT client, resolved and checked.

    Attributes:
        ca_file: the CA that signed the broker's certificate (default: the system's CAs).
        cert_file, key_file: this client's certificate and private key (mutual TLS).
        username, password: MQTT credentials; the password never appears in ``repr``.

    Raises:
        ConfigError: a key without its certificate, a password without a username, or an
            empty username.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("a TLS key_file needs its cert_file (the client certificate)", key="cert_file")
        if self.username is not None and not self.username:
            raise ConfigError("the broker username is empty", key="username")
        if self.password is not None and self.username is None:
            raise ConfigError("a broker password needs a username (--username)", key="username")

    def mqtt_options(self, base: MqttOptions) -> MqttOptions:
        """``base`` with this connection's TLS files and credentials.

        Args:
            base: the client's other options (id, timeouts, will).

        Returns:
            A copy of ``base`` carrying these settings.
        """
        return dataclasses.replace(
            base,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            username=self.username,
            password=self.password,
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings for display: paths as strings, and only whether a password is set."""
        return {
            "ca_file": str(self.ca_file) if self.ca_file else None,
            "cert_file": str(self.cert_file) if self.cert_file else None,
            "key_file": str(self.key_file) if self.key_file else None,
            "username": self.username,
            "password_set": self.password is not None,
        }


def connection_file_settings(raw: Mapping[str, object], where: str) -> dict[str, str]:
    """The connection settings of a parsed TOML config file (``[tls]`` table and top level).

    Args:
        raw: the parsed file; keys other than the connection settings are refused.
        where: the file's name, for messages.

    Returns:
        Setting name -> value (a string) for each setting the file gives.

    Raises:
        ConfigError: an unknown key, a ``[tls]`` that is not a table, or a value that is
            not a string.
    """
    values = dict(raw)
    tls = values.pop("tls", {})
    if not isinstance(tls, Mapping):
        raise ConfigError(f"{where}: [tls] must be a table")
    unknown_tls = set(tls) - set(TLS_SETTINGS)
    unknown = (set(values) - set(CONNECTION_SETTINGS)) | {f"tls.{k}" for k in unknown_tls}
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    values.update(tls)
    for key, value in values.items():
        if not isinstance(value, str):
            name = f"[tls] {key}" if key in tls else key
            raise ConfigError(f"{where}: {name} must be a string, not {value!r}", key=key)
    return {key: str(value) for key, value in values.items()}


def resolve_connection(
    flags: Mapping[str, object], environ: Mapping[str, str], file_values: Mapping[str, object], file_label: str
) -> BrokerConnection:
    """Pick each setting from a flag, else the environment, else the config file; check the files.

    Args:
        flags: setting name -> flag value (``None`` or missing: not given).
        environ: the process environment (``os.environ``), read for :data:`ENVIRONMENT`
            and :data:`PASSWORD_ENV`.
        file_values: setting name -> value from the config file (empty without one).
        file_label: the config file's name, said in messages about its settings.

    Returns:
        The connection, with the password read from its file.

    Raises:
        ConfigError: a named file is missing, not a file or unreadable (with its setting,
            path and source), an empty password file, or an inconsistent combination.
    """
    chosen: dict[str, tuple[str, str]] = {}  # setting -> (value, where it came from)
    for key in CONNECTION_SETTINGS:
        flag, env = flags.get(key), environ.get(ENVIRONMENT[key])
        if flag is not None and flag != "":
            chosen[key] = (str(flag), f"--{key.replace('_', '-')}")
        elif env:
            chosen[key] = (env, ENVIRONMENT[key])
        elif file_values.get(key) is not None:
            chosen[key] = (str(file_values[key]), file_label)
    password: str | None = None
    password_from_flag = flags.get("password_file") not in (None, "")
    if environ.get(PASSWORD_ENV) and not password_from_flag:
        password = environ[PASSWORD_ENV]
        chosen.pop("password_file", None)
    paths: dict[str, Path] = {}
    for key in (*TLS_SETTINGS, "password_file"):
        if key in chosen:
            value, source = chosen[key]
            paths[key] = _readable(key, Path(value).expanduser(), source)
    if "password_file" in paths:
        password = _read_password(paths["password_file"], chosen["password_file"][1])
    username = chosen["username"][0] if "username" in chosen else None
    return BrokerConnection(
        paths.get("ca_file"), paths.get("cert_file"), paths.get("key_file"), username=username, password=password
    )


def _readable(key: str, path: Path, source: str) -> Path:
    """``path``, once it is known to be a file this user can read; else a ConfigError naming all three."""
    what = "TLS" if key in TLS_SETTINGS else "broker"
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"{what} {key} {path} {state} (from {source})", key=key, path=str(path), source=source)
    if not os.access(path, os.R_OK):
        raise ConfigError(
            f"{what} {key} {path} is not readable by this user (from {source})", key=key, path=str(path), source=source
        )
    return path


def _read_password(path: Path, source: str) -> str:
    """The password in ``path``: its first line, without the line end."""
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_PASSWORD_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read broker password_file {path} (from {source}): {exc.strerror}") from exc
    if len(data) > _MAX_PASSWORD_BYTES:
        raise ConfigError(f"broker password_file {path} is larger than {_MAX_PASSWORD_BYTES} bytes (from {source})")
    try:
        lines = data.decode().splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"broker password_file {path} is not UTF-8 text (from {source})") from exc
    if not lines or not lines[0]:
        raise ConfigError(f"broker password_file {path} is empty (from {source})", key="password_file")
    return lines[0]
