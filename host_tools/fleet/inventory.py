"""What the fleet looks like now: devices and their latest metrics, brought up to date
from the broker's retained messages before they are read from the registry.

``edgectl devices`` and ``edgectl metrics`` call these; the CLI opens the registry and
the connection, and :mod:`host_tools.report.fleet` renders what comes back.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edge_sdk.mqtt import MqttClient
from edge_sdk.protocol import Channel, DeviceTopics, fleet_filter
from host_tools.fleet.collector import collect_retained, record_message
from host_tools.fleet.registry import DeviceRecord, MetricsRecord, Registry

__all__ = ["current_devices", "latest_metrics"]


def current_devices(
    registry: Registry, client: MqttClient, wait_s: float = 1.0, clock: Callable[[], float] = time.time
) -> list[DeviceRecord]:
    """Record every device's retained status from the broker, then list the registry's devices.

    Args:
        registry: where device status is recorded.
        client: a connected client.
        wait_s: how long to listen for retained status after the last one arrived.
        clock: wall clock, for when each status was received.

    Returns:
        Every device the registry knows, ordered by id.

    Raises:
        StorageError: the registry cannot be read or written.
    """
    for msg in collect_retained(client, [fleet_filter(Channel.STATUS)], quiet_s=wait_s):
        record_message(registry, msg, clock())
    return registry.list_devices()


def latest_metrics(
    registry: Registry,
    client: MqttClient | None = None,
    device_id: str | None = None,
    clock: Callable[[], float] = time.time,
) -> list[MetricsRecord]:
    """The newest metrics report per device and bundle version.

    Args:
        registry: where reports are recorded.
        client: a connected client: record the broker's retained reports first; ``None``
            reads the registry only.
        device_id: only this device; every device when ``None``.
        clock: wall clock, for when each report was received.

    Returns:
        The reports, as the registry stores them.

    Raises:
        StorageError: the registry cannot be read or written.
    """
    if client is not None:
        topic = DeviceTopics(device_id).metrics if device_id else fleet_filter(Channel.METRICS)
        for msg in collect_retained(client, [topic]):
            record_message(registry, msg, clock())
    return registry.latest_metrics(device_id=device_id)
