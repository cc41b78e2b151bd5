"""The agent's configuration: built once at start-up from a TOML file and flags, then frozen.

Example ``agent.toml``::

    broker = "mqtts://broker.example:8883"
    device_id = "pi-kitchen-01"
    data_dir = "/var/lib/edge-agent"
    root = "/etc/edge-agent/root.json"      # the signed root of trust shipped with the device
    accelerators = ["cuda"]                 # optional: what bundles' target constraints may require
    heartbeat_s = 60                        # optional: seconds between heartbeats (not retained)
    metrics_every_s = 300                   # optional: a metrics report of each active bundle every
                                            # 300 s, re-measured with metrics_runs timed runs (default 10);
                                            # off unless set
    identity_key = "/etc/edge-agent/identity.key"  # optional: a provisioned key that signs what it
                                            # reports; else made at first start in data_dir/identity/

    [labels]                                # optional: where and what this device is, for selectors
    site = "depot-3"                        # (or labels = ["site=depot-3", "hw=pi5"])
    hw = "pi5"

    [tls]
    ca_file = "/etc/edge-agent/ca.pem"
    cert_file = "/etc/edge-agent/client.pem"
    key_file = "/etc/edge-agent/client.key"

    # MQTT username/password, where the broker wants them (the password in its own file):
    username = "pi-kitchen-01"
    password_file = "/etc/edge-agent/broker.password"

    # MQTT 5 where the broker speaks it, else 3.1.1 ("auto"; or pin "5" / "3.1.1"), and how
    # long the broker keeps this device's session and queued messages while it is away:
    mqtt_protocol = "auto"
    session_expiry_s = 3600

    # Field devices: hold installs while this file exists or this command says no.
    update_gate_file = "/run/edge-agent/hold"
    update_gate_command = ["/usr/local/bin/may-update"]

Flags given on the command line override the file. The broker connection's settings (TLS
files, ``username``, ``password_file``) may also come from the environment, between the
two: flag > environment > file (names in :mod:`edge_sdk.broker_connection`). A value of the wrong type (a number
in quotes, a single string where a list is wanted) is refused with the key's name and the
type it wants, before anything else is checked.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.transport import DEFAULT_INBOUND_MAX, DEFAULT_INBOUND_MAX_BYTES
from edge_sdk.broker_connection import CONNECTION_SETTINGS, resolve_connection
from edge_sdk.bundle import BundleLimits
from edge_sdk.bundle.manifest import EXECUTIONS
from edge_sdk.errors import ConfigError, KeyStoreError, UntrustedInputError
from edge_sdk.mqtt import MAX_SESSION_EXPIRY_S, PROTOCOLS, parse_broker_url
from edge_sdk.protocol.labels import check_labels, parse_labels
from edge_sdk.protocol.messages import MAX_HEARTBEAT_S
from edge_sdk.protocol.topics import check_device_id
from edge_sdk.trust import load_root

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 devices
    import tomli as tomllib

__all__ = ["CRASH_POINTS", "MAX_METRICS_RUNS", "AgentConfig", "load_config"]

#: Named steps of an install where ``debug_crash_at`` makes the agent SIGKILL itself, for
#: crash-safety tests. In order: a chunk half-way through the transfer was written; the
#: whole file arrived, every chunk matching the signed index; the verified slot is on disk; state.json says
#: active-but-pending; the health check and benchmark passed; state.json says confirmed;
#: the installed event was published.
CRASH_POINTS = ("receiving", "received", "staged", "activated", "profiled", "confirmed", "reported")
#: Smallest inbound queue: a command, a transfer end and a few chunks must fit.
_MIN_INBOUND = 16
#: Smallest inbound byte bound: a few 1 MiB chunks must fit.
_MIN_INBOUND_BYTES = 4 << 20
#: Largest clock offset the test hook accepts (a year).
_MAX_CLOCK_OFFSET_S = 366 * 86400.0
#: Most timed runs of a periodic measurement: it runs on the agent's worker, between messages.
MAX_METRICS_RUNS = 100


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs, validated.

    Attributes:
        broker: MQTT broker URL.
        device_id: this device's id (a topic segment).
        data_dir: slots, staging and state live here.
        root: the signed root of trust this device ships with (``edgectl keys init`` writes
            it). It names the keys that may sign bundles and commands; later roots arrive
            over MQTT and are kept in ``data_dir/trust/``.
        accelerators: accelerators this device has (``cuda``, ``npu``...), for bundles'
            target constraints.
        ca_file, cert_file, key_file: TLS material for ``mqtts://`` brokers.
        username, password: MQTT credentials (the password is read from ``password_file``
            or the environment, and never shown in this object's ``repr``).
        reconnect_max_s: upper bound of the reconnect backoff.
        keepalive_s: the MQTT keepalive: the broker drops a connection silent for 1.5 times it.
        connack_timeout_s: how long a connection attempt waits for the broker's answer.
        mqtt_protocol: ``auto`` (MQTT 5, or 3.1.1 where the broker does not speak 5), ``5``
            or ``3.1.1``.
        session_expiry_s: how long the broker keeps this device's session (subscriptions
            and queued QoS 1 messages) after the device goes away, so that a short outage
            delays what was sent meanwhile instead of losing it; 0 asks for a clean session
            on every connect.
        transfer_idle_timeout_s: a transfer without a chunk for this long is reported to the
            host as lacking what it lacks (once per period), so a host that lost track of it
            sends only the rest.
        staging_max_age_s: a partial transfer kept on disk without a chunk for this long is
            removed (at start and while running); until then a new offer of the same bundle
            resumes it.
        sysfs_root: root for platform, power and thermal probes (tests pass a fake tree).
        limits: bundle size and count limits.
        update_gate_file: while this file exists, installs are deferred (see device_agent/gate.py).
        update_gate_command: argv run before each install; non-zero exit defers it.
        update_gate_timeout_s: how long the gate command may take.
        update_gate_retry_s: how often a deferred install asks the gate again.
        outbox_max_bytes: bound of the on-disk buffer of events and metrics kept while offline.
        inbound_queue_max: most inbound messages waiting for the agent's worker; more are
            dropped, counted and logged (see :mod:`device_agent.transport`).
        inbound_max_bytes: the memory bound for inbound messages: most payload bytes held
            between the network and the worker (in the worker's queue, which the network thread
            fills directly); a flood beyond it is dropped and counted, whatever its size.
        execution: how to run bundles with sparse layers: ``auto`` (measure and pick the
            fastest), or ``dense``/``dense_int8``/``sparse`` to pin it, overriding the
            manifest's choice.
        identity_key: a provisioned PEM Ed25519 key the device signs its messages with;
            None: made at first start under ``data_dir/identity`` (see device_agent/identity.py).
        labels: this device's labels (``key=value``, see :mod:`edge_sdk.protocol.labels`),
            carried by its status; a table, or a list of ``key=value`` strings.
        heartbeat_s: seconds between heartbeats (1 s to a day); the host lists a device it
            has not heard from within a few of them as ``stale``.
        metrics_every_s: seconds between periodic metrics reports (1 s to a day), each active
            bundle measured again (:mod:`device_agent.telemetry`); None (the default): only the
            report after each install.
        metrics_runs: timed runs of each periodic measurement (1 to :data:`MAX_METRICS_RUNS`),
            after one warm-up run.
        debug_crash_at: test-only: SIGKILL the agent at this step of an install (:data:`CRASH_POINTS`).
        debug_clock_offset_s: test-only, config file only: seconds added to the device's
            clock (mounts a clock set back or forward, as after a reboot without RTC).
    """

    broker: str
    device_id: str
    data_dir: Path
    root: Path | None = None
    accelerators: tuple[str, ...] = ()
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    reconnect_max_s: float = 30.0
    keepalive_s: int = 30
    connack_timeout_s: float = 10.0
    mqtt_protocol: str = "auto"
    session_expiry_s: int = 3600
    transfer_idle_timeout_s: float = 60.0
    staging_max_age_s: float = 7 * 86400.0
    sysfs_root: Path = Path("/")
    limits: BundleLimits = field(default_factory=BundleLimits)
    update_gate_file: Path | None = None
    update_gate_command: tuple[str, ...] | None = None
    update_gate_timeout_s: float = 10.0
    update_gate_retry_s: float = 30.0
    outbox_max_bytes: int = 8 << 20
    inbound_queue_max: int = DEFAULT_INBOUND_MAX
    inbound_max_bytes: int = DEFAULT_INBOUND_MAX_BYTES
    execution: str = "auto"
    identity_key: Path | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    heartbeat_s: float = 60.0
    metrics_every_s: float | None = None
    metrics_runs: int = 10
    debug_crash_at: str | None = None
    debug_clock_offset_s: float = 0.0

    def __post_init__(self) -> None:
        parse_broker_url(self.broker)
        check_device_id(self.device_id)
        if self.root is None:
            raise ConfigError("no root of trust: pass --root root.json or set root in the config file")
        object.__setattr__(self, "accelerators", tuple(self.accelerators))
        labels: object = self.labels  # a list of key=value from flags or the file, or a table
        object.__setattr__(
            self, "labels", parse_labels(labels) if isinstance(labels, (list, tuple)) else check_labels(labels)
        )
        if not _is_number(self.heartbeat_s) or not 1 <= self.heartbeat_s <= MAX_HEARTBEAT_S:
            raise ConfigError(
                f"heartbeat_s must be a number of seconds from 1 to {MAX_HEARTBEAT_S:g}, got {self.heartbeat_s!r}",
                key="heartbeat_s",
            )
        every = self.metrics_every_s
        if every is not None and (not _is_number(every) or not 1 <= every <= MAX_HEARTBEAT_S):
            raise ConfigError(
                f"metrics_every_s must be a number of seconds from 1 to {MAX_HEARTBEAT_S:g}, got {every!r}",
                key="metrics_every_s",
            )
        if not _is_int_at_least(self.metrics_runs, 1) or self.metrics_runs > MAX_METRICS_RUNS:
            raise ConfigError(
                f"metrics_runs must be an integer from 1 to {MAX_METRICS_RUNS}, got {self.metrics_runs!r}",
                key="metrics_runs",
            )
        if self.transfer_idle_timeout_s <= 0:
            raise ConfigError(
                f"transfer_idle_timeout_s must be positive (seconds), got {self.transfer_idle_timeout_s!r}",
                key="transfer_idle_timeout_s",
            )
        if self.staging_max_age_s <= 0:
            raise ConfigError(
                f"staging_max_age_s must be positive (seconds), got {self.staging_max_age_s!r}", key="staging_max_age_s"
            )
        if self.reconnect_max_s < 1:
            raise ConfigError(
                f"reconnect_max_s must be at least 1 (seconds), got {self.reconnect_max_s!r}", key="reconnect_max_s"
            )
        if not _is_int_at_least(self.keepalive_s, 5) or self.keepalive_s > 65535:
            raise ConfigError(f"keepalive_s must be an integer of seconds in 5..65535, got {self.keepalive_s!r}")
        if not (_is_number(self.connack_timeout_s) and self.connack_timeout_s > 0):
            raise ConfigError(f"connack_timeout_s must be positive (seconds), got {self.connack_timeout_s!r}")
        if self.mqtt_protocol not in PROTOCOLS:
            raise ConfigError(
                f"mqtt_protocol must be one of {', '.join(PROTOCOLS)}, got {self.mqtt_protocol!r}", key="mqtt_protocol"
            )
        if not _is_int_at_least(self.session_expiry_s, 0) or self.session_expiry_s > MAX_SESSION_EXPIRY_S:
            raise ConfigError(
                f"session_expiry_s must be an integer of seconds in 0..{MAX_SESSION_EXPIRY_S}, "
                f"got {self.session_expiry_s!r}",
                key="session_expiry_s",
            )
        if isinstance(self.update_gate_command, str):
            object.__setattr__(self, "update_gate_command", tuple(shlex.split(self.update_gate_command)) or None)
        elif self.update_gate_command is not None:
            if not all(isinstance(a, str) for a in self.update_gate_command) or not self.update_gate_command:
                raise ConfigError("update_gate_command must be a command line or a non-empty list of strings")
            object.__setattr__(self, "update_gate_command", tuple(self.update_gate_command))
        for key in ("update_gate_timeout_s", "update_gate_retry_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive (seconds), got {getattr(self, key)!r}", key=key)
        if not _is_int_at_least(self.outbox_max_bytes, 1024):
            raise ConfigError("outbox_max_bytes must be an integer of at least 1024")
        if not _is_int_at_least(self.inbound_queue_max, _MIN_INBOUND):
            raise ConfigError(f"inbound_queue_max must be an integer of at least {_MIN_INBOUND}")
        if not _is_int_at_least(self.inbound_max_bytes, _MIN_INBOUND_BYTES):
            raise ConfigError(f"inbound_max_bytes must be an integer of at least {_MIN_INBOUND_BYTES}")
        if not _is_number_within(self.debug_clock_offset_s, _MAX_CLOCK_OFFSET_S):
            raise ConfigError(f"debug_clock_offset_s must be a number of seconds within ±{_MAX_CLOCK_OFFSET_S:g}")
        if self.execution not in EXECUTIONS:
            raise ConfigError(f"execution must be one of {', '.join(EXECUTIONS)}, got {self.execution!r}")
        if self.debug_crash_at is not None and self.debug_crash_at not in CRASH_POINTS:
            raise ConfigError(f"debug_crash_at must be one of {', '.join(CRASH_POINTS)}, got {self.debug_crash_at!r}")

    def load_root(self) -> bytes:
        """Read the shipped root of trust and check its own signatures.

        Returns:
            The signed root document's bytes.

        Raises:
            KeyStoreError: the file is missing, unreadable, or not a validly signed root.
        """
        assert self.root is not None
        try:
            data = Path(self.root).read_bytes()
        except OSError as exc:
            raise KeyStoreError(f"cannot read root of trust {self.root}: {exc.strerror}") from exc
        try:
            load_root(data)
        except UntrustedInputError as exc:
            raise KeyStoreError(f"root of trust {self.root}: {exc.message}") from exc
        return data


def _is_int_at_least(value: object, minimum: int) -> bool:
    """True for an integer (not a bool) of at least ``minimum``; config files can hold anything."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass(frozen=True)
class _Kind:
    """What a setting holds: its description for messages, and the test of a value."""

    wanted: str
    accepts: Callable[[object], bool]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_strings(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


_STRING = _Kind("a string", lambda v: isinstance(v, str))
_PATH = _Kind("a path (a string)", lambda v: isinstance(v, (str, Path)))
_NUMBER = _Kind("a number of seconds", _is_number)
_INTEGER = _Kind("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))
_STRINGS = _Kind("a list of strings", _is_strings)
_LABELS = _Kind(
    "a table of key = value strings, or a list of key=value strings",
    lambda v: _is_strings(v) or (isinstance(v, dict) and all(isinstance(x, str) for x in v.values())),
)
_COMMAND = _Kind("a command line (a string) or a list of strings", lambda v: isinstance(v, str) or _is_strings(v))

#: Every setting a config file or a flag may give, with the kind of value it takes.
_SETTINGS: dict[str, _Kind] = {
    "broker": _STRING,
    "device_id": _STRING,
    "data_dir": _PATH,
    "root": _PATH,
    "accelerators": _STRINGS,
    "ca_file": _PATH,
    "cert_file": _PATH,
    "key_file": _PATH,
    "username": _STRING,
    "password_file": _PATH,
    "reconnect_max_s": _NUMBER,
    "keepalive_s": _INTEGER,
    "connack_timeout_s": _NUMBER,
    "mqtt_protocol": _STRING,
    "session_expiry_s": _INTEGER,
    "transfer_idle_timeout_s": _NUMBER,
    "staging_max_age_s": _NUMBER,
    "sysfs_root": _PATH,
    "update_gate_file": _PATH,
    "update_gate_command": _COMMAND,
    "update_gate_timeout_s": _NUMBER,
    "update_gate_retry_s": _NUMBER,
    "outbox_max_bytes": _INTEGER,
    "inbound_queue_max": _INTEGER,
    "inbound_max_bytes": _INTEGER,
    "debug_clock_offset_s": _NUMBER,
    "execution": _STRING,
    "debug_crash_at": _STRING,
    "identity_key": _PATH,
    "labels": _LABELS,
    "heartbeat_s": _NUMBER,
    "metrics_every_s": _NUMBER,
    "metrics_runs": _INTEGER,
}
_PATH_FIELDS = {key for key, kind in _SETTINGS.items() if kind is _PATH} - set(CONNECTION_SETTINGS)


def _toml_type(value: object) -> str:
    """How a value read from TOML is called in a message: its TOML type and the value."""
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, int):
        kind = "an integer"
    elif isinstance(value, float):
        kind = "a float"
    elif isinstance(value, str):
        kind = "a string"
    elif isinstance(value, (list, tuple)):
        kind = "an array"
    elif isinstance(value, dict):
        kind = "a table"
    else:
        kind = "a date or time"
    return f"{kind} ({value!r})"


def _check_types(values: Mapping[str, object], where: str, tls: frozenset[str] = frozenset()) -> None:
    """Refuse a setting whose value is not of the type the agent wants, naming both.

    Args:
        values: setting name -> value, as read from the file (unknown names are not checked here).
        where: the file they came from, for the message.
        tls: the names that came from the file's ``[tls]`` table.

    Raises:
        ConfigError: the first setting, in file order, of the wrong type.
    """
    for key, value in values.items():
        kind = _SETTINGS.get(key)
        if kind is not None and not kind.accepts(value):
            name = f"[tls] {key}" if key in tls else key
            raise ConfigError(f"{where}: {name} must be {kind.wanted}, not {_toml_type(value)}", key=key)


def _is_number_within(value: object, bound: float) -> bool:
    """True for a number (not a bool) no further than ``bound`` from zero."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= bound


def load_config(
    config_file: Path | None, overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> AgentConfig:
    """Merge a TOML file (optional) with flag values (``None`` means "not given").

    Args:
        config_file: the TOML file, or ``None``.
        overrides: flag values by setting name; they win over the file.
        environ: the process environment, for the broker connection's settings (see
            :mod:`edge_sdk.broker_connection`); they win over the file and lose to flags.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: unreadable or invalid file, unknown keys, a value of the wrong type
            (named with its key and the type wanted), missing required values, or a TLS or
            password file that cannot be read (named with where it was set).
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            raw = tomllib.loads(Path(config_file).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from exc
        tls = raw.pop("tls", {})
        if not isinstance(tls, dict):
            raise ConfigError(f"{config_file}: [tls] must be a table")
        raw.update(tls)
        unknown = set(raw) - set(_SETTINGS)
        if unknown:
            raise ConfigError(f"{config_file}: unknown setting(s) {', '.join(sorted(unknown))}")
        _check_types(raw, str(config_file), frozenset(tls))
        values.update(raw)
    file_connection = {k: values.pop(k) for k in CONNECTION_SETTINGS if k in values}
    flag_connection = {k: overrides.get(k) for k in CONNECTION_SETTINGS}
    values.update({k: v for k, v in overrides.items() if v is not None and v != () and k not in CONNECTION_SETTINGS})
    missing = [k for k in ("broker", "device_id", "data_dir") if k not in values]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join(missing)} (flags or config file)")
    for key in _PATH_FIELDS & set(values):
        values[key] = Path(values[key])
    connection = resolve_connection(flag_connection, environ or {}, file_connection, str(config_file or "config file"))
    values.update(
        ca_file=connection.ca_file,
        cert_file=connection.cert_file,
        key_file=connection.key_file,
        username=connection.username,
        password=connection.password,
    )
    try:
        return AgentConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid agent configuration: {exc}") from exc
