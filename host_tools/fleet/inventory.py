"""What the fleet looks like now: devices and their latest metrics, brought up to date
from the broker's retained messages before they are read from the registry.

``edgectl devices`` and ``edgectl metrics`` call these; the CLI opens the registry and
the connection, and :mod:`host_tools.report.fleet` renders what comes back. Every message
passes a :class:`~host_tools.fleet.enrolment.ReportGate` built from the registry's
enrolments; what it drops is counted in the registry, and an unenrolled device's signed
status is recorded as an enrolment request only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edge_sdk.mqtt import MqttClient
from edge_sdk.protocol import Channel, DeviceTopics, fleet_filter
from host_tools.fleet.collector import collect_retained, record_message
from host_tools.fleet.enrolment import ReportGate
from host_tools.fleet.registry import DeviceRecord, MetricsRecord, Registry

__all__ = ["current_devices", "latest_metrics"]


def current_devices(
    registry: Registry,
    client: MqttClient,
    wait_s: float = 1.0,
    clock: Callable[[], float] = time.time,
    *,
    allow_unsigned: bool = False,
) -> list[DeviceRecord]:
    """Record every device's retained status from the broker, then list the registry's devices.

    Args:
        registry: where device status is recorded.
        client: a connected client.
        wait_s: how long to listen for retained status after the last one arrived.
        clock: wall clock, for when each status was received.
        allow_unsigned: believe unsigned statuses (migration period only).

    Returns:
        Every device the registry knows, ordered by id.

    Raises:
        StorageError: the registry cannot be read or written.
    """
    gate = ReportGate.from_registry(registry, allow_unsigned=allow_unsigned)
    for verified in collect_retained(client, [fleet_filter(Channel.STATUS)], gate, quiet_s=wait_s, wall_clock=clock):
        record_message(registry, verified.msg, clock())  # a status heard again records the same row again
    gate.flush(registry, clock())
    return registry.list_devices()


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
