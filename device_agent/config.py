"""The agent's configuration: built once at start-up from a TOML file and flags, then frozen.

Example ``agent.toml``::

    broker = "mqtts://broker.example:8883"
    device_id = "pi-kitchen-01"
    data_dir = "/var/lib/edge-agent"
    root = "/etc/edge-agent/root.json"      # the signed root of trust shipped with the device
    accelerators = ["cuda"]                 # optional: what bundles' target constraints may require
    identity_key = "/etc/edge-agent/identity.key"  # optional: a provisioned key that signs what it
                                            # reports; else made at first start in data_dir/identity/

    [tls]
    ca_file = "/etc/edge-agent/ca.pem"
    cert_file = "/etc/edge-agent/device.pem"
    key_file = "/etc/edge-agent/device.key"

    # Field devices: hold installs while this file exists or this command says no.
    update_gate_file = "/run/edge-agent/hold"
    update_gate_command = ["/usr/local/bin/may-update"]

Flags given on the command line override the file.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from device_agent.transport import DEFAULT_INBOUND_MAX
from edge_sdk.bundle import BundleLimits
from edge_sdk.bundle.manifest import EXECUTIONS
from edge_sdk.errors import ConfigError, KeyStoreError, UntrustedInputError
from edge_sdk.mqtt import parse_broker_url
from edge_sdk.protocol.topics import check_device_id
from edge_sdk.trust import load_root

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 devices
    import tomli as tomllib

__all__ = ["CRASH_POINTS", "AgentConfig", "load_config"]

#: Named steps of an install where ``debug_crash_at`` makes the agent SIGKILL itself, for
#: crash-safety tests. In order: a chunk half-way through the transfer was written; the
#: whole file arrived and its hash matched; the verified slot is on disk; state.json says
#: active-but-pending; the health check and benchmark passed; state.json says confirmed;
#: the installed event was published.
CRASH_POINTS = ("receiving", "received", "staged", "activated", "profiled", "confirmed", "reported")
#: Smallest inbound queue: a command, a transfer end and a few chunks must fit.
_MIN_INBOUND = 16


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
        reconnect_max_s: upper bound of the reconnect backoff.
        transfer_idle_timeout_s: drop a transfer after this long without a chunk.
        sysfs_root: root for platform, power and thermal probes (tests pass a fake tree).
        limits: bundle size and count limits.
        update_gate_file: while this file exists, installs are deferred (see device_agent/gate.py).
        update_gate_command: argv run before each install; non-zero exit defers it.
        update_gate_timeout_s: how long the gate command may take.
        update_gate_retry_s: how often a deferred install asks the gate again.
        outbox_max_bytes: bound of the on-disk buffer of events and metrics kept while offline.
        inbound_queue_max: most inbound messages waiting for the agent's worker; more are
            dropped, counted and logged (see :mod:`device_agent.transport`).
        execution: how to run bundles with sparse layers: ``auto`` (measure and pick the
            fastest), or ``dense``/``dense_int8``/``sparse`` to pin it, overriding the
            manifest's choice.
        identity_key: a provisioned PEM Ed25519 key the device signs its messages with;
            None: made at first start under ``data_dir/identity`` (see device_agent/identity.py).
        debug_crash_at: test-only: SIGKILL the agent at this step of an install (:data:`CRASH_POINTS`).
    """

    broker: str
    device_id: str
    data_dir: Path
    root: Path | None = None
    accelerators: tuple[str, ...] = ()
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    reconnect_max_s: float = 30.0
    transfer_idle_timeout_s: float = 60.0
    sysfs_root: Path = Path("/")
    limits: BundleLimits = field(default_factory=BundleLimits)
    update_gate_file: Path | None = None
    update_gate_command: tuple[str, ...] | None = None
    update_gate_timeout_s: float = 10.0
    update_gate_retry_s: float = 30.0
    outbox_max_bytes: int = 8 << 20
    inbound_queue_max: int = DEFAULT_INBOUND_MAX
    execution: str = "auto"
    identity_key: Path | None = None
    debug_crash_at: str | None = None

    def __post_init__(self) -> None:
        parse_broker_url(self.broker)
        check_device_id(self.device_id)
        if self.root is None:
            raise ConfigError("no root of trust: pass --root root.json or set root in the config file")
        object.__setattr__(self, "accelerators", tuple(self.accelerators))
        if self.transfer_idle_timeout_s <= 0 or self.reconnect_max_s < 1:
            raise ConfigError("timeouts must be positive")
        if isinstance(self.update_gate_command, str):
            object.__setattr__(self, "update_gate_command", tuple(shlex.split(self.update_gate_command)) or None)
        elif self.update_gate_command is not None:
            if not all(isinstance(a, str) for a in self.update_gate_command) or not self.update_gate_command:
                raise ConfigError("update_gate_command must be a command line or a non-empty list of strings")
            object.__setattr__(self, "update_gate_command", tuple(self.update_gate_command))
        if self.update_gate_timeout_s <= 0 or self.update_gate_retry_s <= 0:
            raise ConfigError("update gate timeout and retry interval must be positive")
        if not _is_int_at_least(self.outbox_max_bytes, 1024):
            raise ConfigError("outbox_max_bytes must be an integer of at least 1024")
        if not _is_int_at_least(self.inbound_queue_max, _MIN_INBOUND):
            raise ConfigError(f"inbound_queue_max must be an integer of at least {_MIN_INBOUND}")
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


_PATH_FIELDS = {
    "data_dir",
    "ca_file",
    "cert_file",
    "key_file",
    "sysfs_root",
    "update_gate_file",
    "root",
    "identity_key",
}


def load_config(config_file: Path | None, overrides: Mapping[str, Any]) -> AgentConfig:
    """Merge a TOML file (optional) with flag values (``None`` means "not given").

    Raises:
        ConfigError: unreadable or invalid file, unknown keys, or missing required values.
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
        known = {f.name for f in fields(AgentConfig)} - {"limits"}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{config_file}: unknown setting(s) {', '.join(sorted(unknown))}")
        values.update(raw)
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    missing = [k for k in ("broker", "device_id", "data_dir") if k not in values]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join(missing)} (flags or config file)")
    for key in _PATH_FIELDS & set(values):
        values[key] = Path(values[key])
    try:
        return AgentConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid agent configuration: {exc}") from exc
