"""Turn what devices publish (status, metrics) into registry rows.

Several collectors may run against one broker and one PostgreSQL registry: subscribe
through :func:`edge_sdk.protocol.shared` and every message is handled by exactly one of
them; every registry write is a single atomic statement.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterable

from edge_sdk.errors import MessageError
from edge_sdk.mqtt import Incoming, MqttClient
from edge_sdk.protocol import CodecLimits, DeviceStatus, Message, MetricsReport, decode
from host_tools.fleet.registry import BundleRef, DeviceRecord, Registry

__all__ = ["active_bundles", "collect_retained", "record_message"]

log = logging.getLogger(__name__)


def active_bundles(msg: DeviceStatus) -> tuple[BundleRef, ...] | None:
    """Every active bundle a status lists; ``None`` when it lists none at all (a will message).

    A status with ``active: {"bundles": []}`` says the device runs nothing, which is an
    empty tuple; an entry without a valid name and version is logged and skipped, so one
    device's odd status cannot stop the collector.
    """
    if msg.active is None or not isinstance(msg.active.get("bundles"), list):
        return None
    out = []
    for entry in msg.active["bundles"]:
        try:
            out.append(BundleRef.from_dict(entry))
        except (ValueError, TypeError) as exc:
            log.warning("device %s reports an active bundle without a valid name and version: %s", msg.device_id, exc)
    return tuple(sorted(out, key=lambda ref: (ref.name, ref.version)))


def record_message(registry: Registry, msg: Message, received_at: float, broker: str = "") -> None:
    """Store one device message in the registry (other message types are ignored).

    Args:
        registry: where to store it.
        msg: the decoded message.
        received_at: unix seconds it was received (a status without a time gets this one).
        broker: the address of the broker it came from (``mqtt://host:port``); ``""`` when unknown.
    """
    if isinstance(msg, DeviceStatus):
        registry.upsert_device(
            DeviceRecord(
                device_id=msg.device_id,
                status="online" if msg.state == "online" else "offline",  # the message allows no other
                last_seen=msg.ts or received_at,
                platform=msg.platform or None,
                runtimes=msg.runtimes or None,
                agent_version=msg.agent_version or None,
                active_bundles=active_bundles(msg),
                broker=broker,
            )
        )
    elif isinstance(msg, MetricsReport):
        registry.add_metrics(msg, received_at)


def collect_retained(
    client: MqttClient,
    filters: Iterable[str],
    quiet_s: float = 0.5,
    max_wait_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
) -> list[Message]:
    """Subscribe and gather the retained messages the broker sends straight away.

    Returns after ``quiet_s`` without a new message (or ``max_wait_s`` in all).
    Malformed messages are logged and skipped: one bad device must not hide the fleet.
    """
    for f in filters:
        client.subscribe(f, qos=1)
    out: list[Message] = []
    deadline = clock() + max_wait_s
    limits = CodecLimits()
    while True:
        remaining = min(quiet_s, deadline - clock())
        if remaining <= 0:
            break
        try:
            item = client.inbox.get(timeout=remaining)
        except queue.Empty:
            break
        if not isinstance(item, Incoming):
            continue
        try:
            out.append(decode(item.payload, limits))
        except MessageError as exc:
            log.warning("skipping malformed message on %s: %s", item.topic, exc.message)
    return out
