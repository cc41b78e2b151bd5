"""``edgectl``'s settings: one table, four layers, and where each value came from.

Every setting may come from a flag, the environment, a config file or a default, and
the first of those that gives it wins, setting by setting::

    flag  >  environment  >  config file  >  default

==========================  =========================  ==================================  ==========================
setting                     flag                       environment                         config file
==========================  =========================  ==================================  ==========================
home                        ``--home``                 ``EDGE_SDK_HOME``                   ``home``
registry                    ``--registry``             ``EDGE_SDK_REGISTRY``               ``registry``
keys_dir                    ``--keys-dir``             ``EDGE_SDK_KEYS_DIR``               ``keys_dir``
mqtt_protocol               ``--mqtt-protocol``        ``EDGE_SDK_MQTT_PROTOCOL``          ``mqtt_protocol``
allow_unsigned_reports      ``--allow-unsigned-...``   ``EDGE_SDK_ALLOW_UNSIGNED_REPORTS`` ``allow_unsigned_reports``
broker                      ``--broker``               ``EDGE_SDK_BROKER``                 ``[broker] url``
ca_file, cert_file,         ``--ca-file`` ...          ``EDGE_SDK_BROKER_CA_FILE`` ...     ``[broker.tls] ca_file`` ...
key_file
username, password_file     ``--username`` ...         ``EDGE_SDK_BROKER_USERNAME`` ...    ``[broker] username`` ...
password                    (never a flag)             ``EDGE_SDK_BROKER_PASSWORD``        (never in a file)
==========================  =========================  ==================================  ==========================

The config file is ``--config``, else ``EDGE_SDK_CONFIG``, else ``HOME/config.toml`` when it
exists (HOME from ``--home``, ``EDGE_SDK_HOME`` or ``~/.edge-sdk``). Relative paths in it are
relative to the file's directory. The broker connection's settings come from one file: a
broker config file (``--broker-config``, ``EDGE_SDK_BROKER_CONFIG`` or ``HOME/broker.toml``,
see :mod:`edge_sdk.broker_connection`) where there is one, else this file's ``[broker]`` table.

:func:`resolve_settings` is the one place the layering happens; it is pure (the caller
reads files and passes the environment in). :func:`parse_config_file` turns a file's text
into settings, naming the file, line and key of anything wrong; :func:`render_config_file`
writes the commented file ``edgectl init`` makes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_sdk.broker_connection import ENVIRONMENT as CONNECTION_ENVIRONMENT
from edge_sdk.broker_connection import PASSWORD_ENV, PROTOCOLS
from edge_sdk.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib

__all__ = [
    "CONFIG_ENV",
    "CONFIG_FILE_NAME",
    "CONNECTION",
    "MASK",
    "SETTINGS",
    "ConfigFile",
    "Resolved",
    "Setting",
    "connection_file",
    "file_layers",
    "parse_config_file",
    "read_toml",
    "render_config_file",
    "resolve_settings",
]

#: The environment variable naming the config file.
CONFIG_ENV = "EDGE_SDK_CONFIG"
#: The config file's name in HOME, where it is looked for by default.
CONFIG_FILE_NAME = "config.toml"
#: What ``config show`` prints instead of a secret's value.
MASK = "********"
#: Largest config file read (settings, not a document).
_MAX_CONFIG_BYTES = 1 << 20
#: Environment values click (and so ``edgectl``) takes as true / false for a boolean.
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off", ""})


@dataclass(frozen=True)
class Setting:
    """One setting: its name, where each layer spells it, its type and its comment in the file.

    Attributes:
        name: the setting's name (``config show`` and ``--json`` use it).
        file_key: its place in the config file: ``("registry",)``, ``("broker", "tls", "ca_file")``;
            empty for a setting never read from a file (the password).
        env: its environment variable, if any.
        flag: its flag, if any (said in ``config show``).
        kind: ``path``, ``text``, ``url``, ``bool`` or ``choice``.
        help: the comment above it in the file ``edgectl init`` writes.
        choices: the values a ``choice`` takes.
        secret: never printed (``config show`` masks it).
    """

    name: str
    file_key: tuple[str, ...]
    env: str | None
    flag: str | None
    kind: str
    help: str
    choices: tuple[str, ...] = ()
    secret: bool = False


#: The settings, in the order the file and ``config show`` list them.
SETTINGS: tuple[Setting, ...] = (
    Setting("home", ("home",), "EDGE_SDK_HOME", "--home", "path", "where keys and the registry live"),
    Setting(
        "registry",
        ("registry",),
        "EDGE_SDK_REGISTRY",
        "--registry",
        "url",
        "the registry: a SQLite file or a postgresql:// URL (default HOME/registry.db)",
    ),
    Setting(
        "keys_dir", ("keys_dir",), "EDGE_SDK_KEYS_DIR", "--keys-dir", "path", "signing keys and root.json (HOME/keys)"
    ),
    Setting(
        "mqtt_protocol",
        ("mqtt_protocol",),
        "EDGE_SDK_MQTT_PROTOCOL",
        "--mqtt-protocol",
        "choice",
        "MQTT version: auto (5, or 3.1.1 where the broker does not speak 5), 5 or 3.1.1",
        choices=tuple(PROTOCOLS),
    ),
    Setting(
        "allow_unsigned_reports",
        ("allow_unsigned_reports",),
        "EDGE_SDK_ALLOW_UNSIGNED_REPORTS",
        "--allow-unsigned-reports",
        "bool",
        "also believe unsigned device messages (only while migrating older agents)",
    ),
    Setting(
        "broker",
        ("broker", "url"),
        "EDGE_SDK_BROKER",
        "--broker",
        "url",
        "mqtt://host[:port] or mqtts://host[:port]; without a port, 1883 (8883 for mqtts)",
    ),
    Setting(
        "username", ("broker", "username"), CONNECTION_ENVIRONMENT["username"], "--username", "text", "MQTT username"
    ),
    Setting(
        "password_file",
        ("broker", "password_file"),
        CONNECTION_ENVIRONMENT["password_file"],
        "--password-file",
        "path",
        "file whose first line is the MQTT password (a password is never written here)",
    ),
    Setting("password", (), PASSWORD_ENV, None, "text", "the MQTT password itself", secret=True),
    Setting(
        "ca_file",
        ("broker", "tls", "ca_file"),
        CONNECTION_ENVIRONMENT["ca_file"],
        "--ca-file",
        "path",
        "CA certificate that signed the broker's",
    ),
    Setting(
        "cert_file",
        ("broker", "tls", "cert_file"),
        CONNECTION_ENVIRONMENT["cert_file"],
        "--cert-file",
        "path",
        "edgectl's client certificate, e.g. HOME/ca/edge-host.pem",
    ),
    Setting(
        "key_file",
        ("broker", "tls", "key_file"),
        CONNECTION_ENVIRONMENT["key_file"],
        "--key-file",
        "path",
        "its private key",
    ),
)
_BY_NAME = {s.name: s for s in SETTINGS}
#: The broker connection's settings (those a broker config file may give instead).
CONNECTION = frozenset({"ca_file", "cert_file", "key_file", "username", "password_file"})


@dataclass(frozen=True)
class ConfigFile:
    """A parsed config file: its path and the settings it gives (paths already made absolute)."""

    path: Path
    values: Mapping[str, object]


@dataclass(frozen=True)
class Resolved:
    """A setting's value and where it came from.

    Attributes:
        name: the setting.
        value: its value (``None``: not set anywhere and no default).
        source: ``flag --home``, ``env EDGE_SDK_HOME``, ``file /path/config.toml`` or ``default``.
        secret: whether :meth:`shown` masks it.
    """

    name: str
    value: object
    source: str
    secret: bool = False

    @property
    def layer(self) -> str:
        """``flag``, ``env``, ``file`` or ``default``."""
        return self.source.split(" ", 1)[0]

    def shown(self) -> object:
        """The value for display: a secret as :data:`MASK`, a path as a string."""
        if self.secret and self.value is not None:
            return MASK
        return str(self.value) if isinstance(self.value, Path) else self.value

    def to_dict(self) -> dict[str, Any]:
        """``name``, ``value`` (masked if secret), ``source``, ``layer`` and ``secret``."""
        return {
            "name": self.name,
            "value": self.shown(),
            "source": self.source,
            "layer": self.layer,
            "secret": self.secret,
        }


def resolve_settings(
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    files: Sequence[ConfigFile],
    user_home: Path,
    cwd: Path,
) -> dict[str, Resolved]:
    """Pick each setting from a flag, else the environment, else the first file that gives it, else its default.

    Pure: no file is read and no environment is consulted but ``environ``.

    Args:
        flags: setting name -> the value given on the command line (absent or ``None``: not given).
        environ: the environment (``os.environ``).
        files: parsed config files, the one that wins first (a broker config file before
            the edgectl config file, for the connection settings it gives).
        user_home: the user's home directory, for the default HOME (``~/.edge-sdk``) and ``~`` in values.
        cwd: the directory relative paths in flags and the environment are relative to.

    Returns:
        Setting name -> :class:`Resolved`, for every setting of :data:`SETTINGS`.

    Raises:
        ConfigError: an environment value that is not one the setting takes (a boolean, a choice).
    """
    out: dict[str, Resolved] = {}
    for setting in SETTINGS:
        out[setting.name] = _resolve_one(setting, flags, environ, files, user_home, cwd)
    home = Path(str(out["home"].value))
    defaults: dict[str, object] = {
        "registry": str(home / "registry.db"),
        "keys_dir": home / "keys",
        "mqtt_protocol": "auto",
        "allow_unsigned_reports": False,
    }
    for name, default in defaults.items():
        if out[name].value is None:
            out[name] = Resolved(name, default, "default")
    return out


def _resolve_one(
    setting: Setting,
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    files: Sequence[ConfigFile],
    user: Path,
    cwd: Path,
) -> Resolved:
    name, secret = setting.name, setting.secret
    flag = flags.get(name)
    if flag is not None and flag != "" and setting.flag is not None:
        return Resolved(name, _typed(setting, flag, user, cwd), f"flag {setting.flag}", secret)
    if setting.env is not None and environ.get(setting.env, "") != "":
        value = _from_text(setting, environ[setting.env], f"environment variable {setting.env}", user, cwd)
        return Resolved(name, value, f"env {setting.env}", secret)
    for file in files:
        if name in file.values:
            return Resolved(name, file.values[name], f"file {file.path}", secret)
    if name == "home":
        return Resolved(name, user / ".edge-sdk", "default")
    return Resolved(name, None, "default", secret)


def _typed(setting: Setting, value: object, user: Path, base: Path) -> object:
    """A flag's or file's value as the setting's type (paths absolute: ``~`` expanded, relative to ``base``)."""
    if setting.kind == "path" or (setting.kind == "url" and setting.name == "registry" and "://" not in str(value)):
        path = Path(str(value))
        if path.parts and path.parts[0] == "~":
            path = user.joinpath(*path.parts[1:])
        if not path.is_absolute():
            path = base / path
        return path if setting.kind == "path" else str(path)
    return value


def _from_text(setting: Setting, text: str, where: str, user: Path, cwd: Path) -> object:
    """An environment value as the setting's type; a value the setting does not take is a ConfigError."""
    if setting.kind == "bool":
        lowered = text.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise ConfigError(f"{where} is {text!r}: want true or false (1/0, yes/no)", key=setting.name)
        return lowered in _TRUE
    if setting.kind == "choice" and text not in setting.choices:
        raise ConfigError(f"{where} is {text!r}: want one of {', '.join(setting.choices)}", key=setting.name)
    return _typed(setting, text, user, cwd)


# --- the file ---------------------------------------------------------------------------


def read_toml(path: Path, what: str, source: str) -> tuple[str, dict[str, Any]]:
    """A TOML file's text and contents; anything wrong is a ConfigError naming the file (and its line).

    Args:
        path: the file.
        what: what the file is, for messages ("config file", "broker config file").
        source: who named it (``--config``, ``EDGE_SDK_CONFIG``...).

    Returns:
        The text and the parsed table.

    Raises:
        ConfigError: missing, unreadable, too large, not UTF-8 or not valid TOML (with the
            line, and the key written on that line where there is one).
    """
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path} does not exist (from {source})", path=str(path)) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}", path=str(path)) from exc
    if len(data) > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {path} is larger than {_MAX_CONFIG_BYTES} bytes", path=str(path))
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text", path=str(path)) from exc
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        line = int(found.group(1)) if found else None
        key = _key_written_on(text, line)
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        where = f"{path}" + (f", line {line}" if line else "") + (f", key {key!r}" if key else "")
        raise ConfigError(f"{what} {where}: not valid TOML: {reason}", path=str(path), line=line, key=key) from exc


def _key_written_on(text: str, line: int | None) -> str | None:
    """The key a line of TOML assigns (``name = ...``), if it looks like it assigns one."""
    if line is None or not 0 < line <= len(text.splitlines()):
        return None
    found = re.match(r"\s*([A-Za-z0-9_.\"'-]+)\s*=", text.splitlines()[line - 1])
    return found.group(1).strip("\"'") if found else None


def _line_of(text: str, table: tuple[str, ...], key: str) -> int | None:
    """The line that sets ``key`` in ``[table]`` (or a dotted ``table.key``), for messages."""
    current: tuple[str, ...] = ()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = re.match(r"\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$", line)
        if header:
            current = tuple(part.strip().strip("\"'") for part in header.group(1).split("."))
            continue
        assigned = re.match(r"([A-Za-z0-9_.\"' -]+?)\s*=", line)
        if assigned:
            dotted = tuple(part.strip().strip("\"'") for part in assigned.group(1).split("."))
            if current + dotted == (*table, key):
                return number
    return None


def parse_config_file(text: str, raw: Mapping[str, Any], path: Path, user_home: Path) -> ConfigFile:
    """The settings a parsed config file gives, checked against :data:`SETTINGS`.

    Args:
        text: the file's text (to find the line of a bad key).
        raw: the parsed TOML (:func:`read_toml`).
        path: the file, named in messages; relative paths in it are relative to its directory.
        user_home: for ``~`` in paths.

    Returns:
        The file's settings by name, typed (paths absolute).

    Raises:
        ConfigError: an unknown key, a table where a value belongs (or the reverse), a value
            of the wrong type or not among a setting's choices; named with the file, line and key.
    """
    wanted = {s.file_key: s for s in SETTINGS if s.file_key}
    tables = {key[:i] for key in wanted for i in range(1, len(key))}
    values: dict[str, object] = {}

    def fail(at: tuple[str, ...], message: str) -> ConfigError:
        line = _line_of(text, at[:-1], at[-1])
        dotted = ".".join(at)
        where = f"{path}" + (f", line {line}" if line else "") + f", key {dotted!r}"
        return ConfigError(f"config file {where}: {message}", path=str(path), line=line, key=dotted)

    def walk(table: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        for key, value in table.items():
            at = (*prefix, key)
            if at in tables:
                if not isinstance(value, Mapping):
                    raise fail(at, f"[{'.'.join(at)}] must be a table")
                walk(value, at)
                continue
            setting = wanted.get(at)
            if setting is None:
                known = ", ".join(".".join(k) for k in wanted)
                raise fail(at, f"unknown setting (known: {known})")
            values[setting.name] = _file_value(setting, value, path, user_home, lambda m, at=at: fail(at, m))

    walk(raw, ())
    return ConfigFile(path, values)


def _file_value(setting: Setting, value: object, path: Path, user: Path, fail: Any) -> object:
    if setting.kind == "bool":
        if not isinstance(value, bool):
            raise fail(f"must be true or false, not {value!r}")
        return value
    if not isinstance(value, str):
        raise fail(f"must be a string, not {value!r}")
    if not value:
        raise fail("is empty")
    if setting.kind == "choice" and value not in setting.choices:
        raise fail(f"is {value!r}: want one of {', '.join(setting.choices)}")
    return _typed(setting, value, user, path.parent)


def file_layers(config: ConfigFile | None, connection: ConfigFile | None) -> list[ConfigFile]:
    """The files :func:`resolve_settings` takes, in order: the broker connection's settings come
    from one file, a broker config file where there is one (``connection`` is not ``config``),
    else the config file's ``[broker]`` table.

    Args:
        config: the edgectl config file, if any.
        connection: the file the broker connection's settings come from (a broker config
            file, or ``config`` itself), if any.
    """
    if connection is None or connection is config:
        return [config] if config is not None else []
    rest = (
        []
        if config is None
        else [ConfigFile(config.path, {k: v for k, v in config.values.items() if k not in CONNECTION})]
    )
    return [connection, *rest]


def connection_file(file: ConfigFile) -> dict[str, str]:
    """The broker connection settings a config file gives (as ``resolve_connection`` takes them)."""
    return {name: str(value) for name, value in file.values.items() if name in CONNECTION}


def render_config_file(given: Mapping[str, Resolved]) -> str:
    """The commented config file ``edgectl init`` writes.

    Args:
        given: the resolved settings; those given by a flag or the environment are written
            as values, the others as commented-out defaults to edit. The password never is.

    Returns:
        TOML text that :func:`parse_config_file` reads back to the values written.
    """
    lines = [
        "# edgectl configuration.",
        "#",
        "# Each setting may also come from a flag or an environment variable; a flag wins over the",
        "# environment, the environment over this file, this file over the defaults.",
        "# `edgectl config show` prints every value and where it came from.",
        "# Relative paths are relative to this file's directory.",
        "",
    ]
    table: tuple[str, ...] = ()
    for setting in SETTINGS:
        if not setting.file_key or setting.secret:
            continue
        where = setting.file_key[:-1]
        if where != table:
            table = where
            lines += ["", f"[{'.'.join(where)}]"]
        resolved = given.get(setting.name)
        env = f" (env {setting.env})" if setting.env else ""
        lines.append(f"# {setting.help}{env}")
        key = setting.file_key[-1]
        if resolved is not None and resolved.layer in ("flag", "env") and resolved.value is not None:
            lines.append(f"{key} = {_toml_value(resolved.value)}")
        elif resolved is not None and resolved.value is not None:
            lines.append(f"# {key} = {_toml_value(resolved.value)}")
        else:
            lines.append(f'# {key} = ""')
        if setting.name == "password_file":
            lines.append(f"# The password itself only ever comes from the environment ({PASSWORD_ENV}).")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'
