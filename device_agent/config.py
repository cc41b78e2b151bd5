"""The agent's configuration: built once at start-up from a TOML file and flags, then frozen.

Example ``agent.toml``::

    broker = "mqtts://broker.example:8883"
    device_id = "pi-kitchen-01"
    data_dir = "/var/lib/edge-agent"
    trusted_keys = ["/etc/edge-agent/bundle-signing.pub"]

    [tls]
    ca_file = "/etc/edge-agent/ca.pem"
    cert_file = "/etc/edge-agent/device.pem"
    key_file = "/etc/edge-agent/device.key"

Flags given on the command line override the file.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edge_sdk.bundle import BundleLimits
from edge_sdk.errors import ConfigError, KeyStoreError
from edge_sdk.mqtt import parse_broker_url
from edge_sdk.protocol.topics import check_device_id
from edge_sdk.trust import PublicKey, TrustedKeys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 devices
    import tomli as tomllib

__all__ = ["AgentConfig", "load_config"]


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs, validated.

    Attributes:
        broker: MQTT broker URL.
        device_id: this device's id (a topic segment).
        data_dir: slots, staging and state live here.
        trusted_keys: public key files whose signatures install bundles.
        threshold: how many of them must sign.
        ca_file, cert_file, key_file: TLS material for ``mqtts://`` brokers.
        reconnect_max_s: upper bound of the reconnect backoff.
        transfer_idle_timeout_s: drop a transfer after this long without a chunk.
        sysfs_root: root for platform, power and thermal probes (tests pass a fake tree).
        limits: bundle size and count limits.
    """

    broker: str
    device_id: str
    data_dir: Path
    trusted_keys: tuple[Path, ...]
    threshold: int = 1
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    reconnect_max_s: float = 30.0
    transfer_idle_timeout_s: float = 60.0
    sysfs_root: Path = Path("/")
    limits: BundleLimits = field(default_factory=BundleLimits)

    def __post_init__(self) -> None:
        parse_broker_url(self.broker)
        check_device_id(self.device_id)
        if not self.trusted_keys:
            raise ConfigError("no trusted key: pass --trusted-key or set trusted_keys in the config file")
        if self.transfer_idle_timeout_s <= 0 or self.reconnect_max_s < 1:
            raise ConfigError("timeouts must be positive")

    def load_trusted(self) -> TrustedKeys:
        """Read the trusted public keys.

        Raises:
            KeyStoreError: a key file is missing or not a PEM Ed25519 public key.
        """
        keys = []
        for path in self.trusted_keys:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise KeyStoreError(f"cannot read trusted key {path}: {exc.strerror}") from exc
            try:
                keys.append(PublicKey.from_pem(data))
            except KeyStoreError as exc:
                raise KeyStoreError(f"trusted key {path}: {exc.message}") from exc
        return TrustedKeys(tuple(keys), self.threshold)


_PATH_FIELDS = {"data_dir", "ca_file", "cert_file", "key_file", "sysfs_root"}


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
    values["trusted_keys"] = tuple(Path(p) for p in values.get("trusted_keys", ()))
    try:
        return AgentConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid agent configuration: {exc}") from exc
