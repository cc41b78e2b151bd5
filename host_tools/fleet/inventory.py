"""What the fleet looks like now: devices and their latest metrics, brought up to date
from the broker's retained messages before they are read from the registry.

``edgectl devices`` and ``edgectl metrics`` call these; the CLI opens the registry and
the connection, and :mod:`host_tools.report.fleet` renders what comes back.

Whether a device is online is only known from the broker it is connected to: its
retained status there is ``online`` from its birth message until its clean goodbye or
its last will replaces it. The registry only remembers what was last read. So
:func:`current_devices` marks a device ``confirmed`` only when this command read its
status from this broker just now; every other row (seen on another broker, or whose
retained status is gone, as when the broker that saw it has stopped) is shown with its
last known state and when that was, never as plainly online. Every message
passes a :class:`~host_tools.fleet.enrolment.ReportGate` built from the registry's
enrolments; what it drops is counted in the registry, and an unenrolled device's signed
status is recorded as an enrolment request only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_sdk.errors import ConfigError
from edge_sdk.mqtt import MqttClient
from edge_sdk.protocol import Channel, DeviceStatus, DeviceTopics, fleet_filter
from host_tools.fleet.collector import collect_retained, record_message
from host_tools.fleet.enrolment import ReportGate
from host_tools.fleet.registry import DeviceRecord, ForgetResult, MetricsRecord, Registry

__all__ = ["DeviceView", "current_devices", "forget_device", "latest_metrics", "require_known"]


@dataclass(frozen=True)
class DeviceView:
    """One registry row as ``edgectl devices`` shows it.

    Args:
        record: the registry's row (its ``status`` is the last one recorded).
        confirmed: this command read the device's retained status from its broker just
            now, so ``record.status`` is what that broker says at present.
        checked_broker: the broker this command read (``mqtt://host:port``).
    """

    record: DeviceRecord
    confirmed: bool
    checked_broker: str

    @property
    def status(self) -> str:
        """``online`` or ``offline`` as the broker says now; ``unknown`` when not confirmed."""
        return self.record.status if self.confirmed else "unknown"

    def to_dict(self) -> dict[str, Any]:
        """The record's dict, with ``status`` as :attr:`status`, ``last_status`` (the
        registry's) and ``status_confirmed``."""
        return {
            **self.record.to_dict(),
            "status": self.status,
            "last_status": self.record.status,
            "status_confirmed": self.confirmed,
        }


def current_devices(
    registry: Registry,
    client: MqttClient,
    wait_s: float = 1.0,
    clock: Callable[[], float] = time.time,
    *,
    allow_unsigned: bool = False,
) -> list[DeviceView]:
    """Record every device's retained status on this broker, then list the registry's devices.

    Args:
        registry: where device status is recorded.
        client: a connected client; its broker's address is recorded with each device.
        wait_s: how long to listen for retained status after the last one arrived.
        clock: wall clock, for when each status was received.
        allow_unsigned: believe unsigned statuses (migration period only).

    Returns:
        Every device row the registry holds, ordered by id then broker, each marked
        confirmed when its status was read from this broker now.

    Raises:
        StorageError: the registry cannot be read or written.
    """
    broker = str(client.address)
    seen: set[str] = set()
    gate = ReportGate.from_registry(registry, allow_unsigned=allow_unsigned)
    for verified in collect_retained(client, [fleet_filter(Channel.STATUS)], gate, quiet_s=wait_s, wall_clock=clock):
        msg = verified.msg
        record_message(registry, msg, clock(), broker)  # a status heard again records the same row again
        if isinstance(msg, DeviceStatus):
            seen.add(msg.device_id)
    gate.flush(registry, clock())
    return [
        DeviceView(record, record.broker == broker and record.device_id in seen, broker)
        for record in registry.list_devices()
    ]


def require_known(registry: Registry, device_id: str) -> None:
    """Check that the registry has seen a device, before anything is done to it.

    Raises:
        ConfigError: it has not; the message lists the devices it knows.
        StorageError: the registry cannot be read.
    """
    if registry.get_device(device_id) is None:
        known = sorted({r.device_id for r in registry.list_devices()})
        listed = (", ".join(known[:20]) + (" ..." if len(known) > 20 else "")) if known else "none"
        raise ConfigError(
            f"no device {device_id!r} in registry {registry.name} (known devices: {listed})", device_id=device_id
        )


def forget_device(registry: Registry, client: MqttClient, device_id: str) -> ForgetResult:
    """Delete a device's registry rows and clear its retained status and metrics on this broker.

    The retained messages are cleared by publishing an empty retained payload to the
    device's status and metrics topics (MQTT's way to delete a retained message). A
    running agent announces itself again when it next connects.

    Args:
        registry: the registry.
        client: a connected client on the broker to clear.
        device_id: the device to forget.

    Returns:
        What the registry deleted.

    Raises:
        ConfigError: the registry has never seen the device.
        TransportError: the broker did not acknowledge a clearing publish.
        StorageError: the registry cannot be read or written.
    """
    require_known(registry, device_id)
    topics = DeviceTopics(device_id)
    for topic in (topics.status, topics.metrics):
        client.publish_wait(topic, b"", retain=True)
    return registry.forget_device(device_id)


def latest_metrics(
    registry: Registry,
    client: MqttClient | None = None,
    device_id: str | None = None,
    clock: Callable[[], float] = time.time,
    *,
    allow_unsigned: bool = False,
) -> list[MetricsRecord]:
    """The newest metrics report per device and bundle version.

    Args:
        registry: where reports are recorded.
        client: a connected client: record the broker's retained reports first; ``None``
            reads the registry only.
        device_id: only this device; every device when ``None``.
        clock: wall clock, for when each report was received.
        allow_unsigned: believe unsigned reports (migration period only).

    Returns:
        The reports, as the registry stores them.

    Raises:
        StorageError: the registry cannot be read or written.
    """
    if client is not None:
        topic = DeviceTopics(device_id).metrics if device_id else fleet_filter(Channel.METRICS)
        gate = ReportGate.from_registry(registry, allow_unsigned=allow_unsigned)
        for verified in collect_retained(client, [topic], gate, wall_clock=clock):
            if verified.fresh:
                record_message(registry, verified.msg, clock())
        gate.flush(registry, clock())
    return registry.latest_metrics(device_id=device_id)
