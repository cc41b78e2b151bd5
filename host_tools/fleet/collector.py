"""Turn what devices publish (status, heartbeats, events, metrics) into registry rows.

Only what a :class:`~host_tools.fleet.enrolment.ReportGate` verified is recorded: a
message that is unsigned, from a device not enrolled, forged, replayed or dated in the
future is dropped and counted (see :mod:`host_tools.fleet.enrolment`). A device's time is
never trusted beyond the host's own: a row's ``last_seen`` is the earlier of the two.

Several collectors may run against one broker and one PostgreSQL registry: subscribe
through :func:`edge_sdk.protocol.shared` and every message is handled by exactly one of
them; every registry write is a single atomic statement, and a report or event stored
twice is one row. An install outcome a device reports (installed, failed, refused,
deferred) also brings its deployment row up to date (:func:`record_event`), however long
after the deploy command ended it arrives.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable, Iterable, Sequence

from edge_sdk.mqtt import Incoming, MqttClient
from edge_sdk.protocol import DeviceStatus, Event, EventKind, Heartbeat, Message, MetricsReport
from host_tools.fleet.enrolment import ReportGate, Verified
from host_tools.fleet.registry import BundleRef, DeploymentState, DeviceRecord, Registry, check_time

__all__ = ["active_bundles", "collect_retained", "record_event", "record_message", "record_messages"]

log = logging.getLogger(__name__)


def _seen_at(ts: float, received_at: float) -> float:
    """When the device was seen: its own time, unless that is later than ours or not a time."""
    try:
        return min(check_time(ts, "ts"), received_at) if ts else received_at
    except ValueError:
        return received_at


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
    """Store one verified device message in the registry (other message types are ignored).

    Args:
        registry: where it goes.
        msg: a status, heartbeat or metrics report the gate let through.
        received_at: the host's clock when it arrived.
        broker: the address of the broker it came from (``mqtt://host:port``); ``""`` when unknown.

    A report with an implausible time or a number that is not finite is not stored (logged):
    one device's odd report must not stop the collector or the command that heard it.

    Raises:
        StorageError: the registry cannot be written.
    """
    if isinstance(msg, DeviceStatus):
        # A will (offline, no bundles listed) is signed when the device connects, so its own
        # time is older than the birth after it; the broker sends it when the link dies. The
        # host's clock says when that was (the gate has already checked its order).
        is_will = msg.state != "online" and msg.active is None
        registry.upsert_device(
            DeviceRecord(
                device_id=msg.device_id,
                status="online" if msg.state == "online" else "offline",  # the message allows no other
                last_seen=received_at if is_will else _seen_at(msg.ts, received_at),
                platform=msg.platform or None,
                runtimes=msg.runtimes or None,
                agent_version=msg.agent_version or None,
                active_bundles=active_bundles(msg),
                broker=broker,
                labels=msg.labels,
                heartbeat_s=msg.heartbeat_s or None,
            )
        )
    elif isinstance(msg, Heartbeat):
        # Heard when the host heard it: a device clock running late must not make it look stale.
        registry.record_heartbeat(msg.device_id, broker, received_at, msg.heartbeat_s)
    elif isinstance(msg, MetricsReport):
        try:
            registry.add_metrics(msg, received_at)
        except ValueError as exc:
            log.warning("metrics report from %s not stored: %s", msg.device_id, exc)
    elif isinstance(msg, Event):
        record_event(registry, msg, received_at)


def record_messages(registry: Registry, msgs: Sequence[Message], received_at: float, broker: str = "") -> None:
    """Store verified device messages, as :func:`record_message` stores each, the metrics
    reports among them in one statement.

    Metrics rows are keyed by device and report time and merge with nothing, so writing
    them after the other messages of the batch stores the same rows; call it inside one
    :meth:`~host_tools.fleet.registry.Registry.batch` to keep the batch atomic.

    Raises:
        StorageError: the registry cannot be written.
    """
    reports: list[MetricsReport] = []
    # By device (a stable sort: each device's messages keep their order): every collector
    # writes the rows of a batch in one order, so two collectors' transactions that touch the
    # same devices wait for each other instead of deadlocking (PostgreSQL aborts one of a
    # deadlocked pair, and its batch waits for a retry).
    for msg in sorted(msgs, key=lambda m: str(getattr(m, "device_id", ""))):
        if isinstance(msg, MetricsReport):
            reports.append(msg)
        else:
            record_message(registry, msg, received_at, broker)
    for report, exc in registry.add_metrics_batch(reports, received_at) if reports else ():
        log.warning("metrics report from %s not stored: %s", report.device_id, exc)


#: What each install outcome a device reports makes of its deployment row.
_OUTCOMES: dict[str, DeploymentState] = {
    EventKind.INSTALLED: "installed",
    EventKind.FAILED: "failed",
    EventKind.REFUSED: "refused",
    EventKind.DEFERRED: "deferred",
}


def record_event(registry: Registry, event: Event, received_at: float) -> None:
    """Store one verified event; an install outcome also updates its deployment row.

    The row is found by the event's transfer (or the bundle name and version it names);
    see :meth:`~host_tools.fleet.registry.Registry.follow_deployment` for which rows may
    still change. Only an event stored now changes a row: one heard again (delivered
    twice, replayed) changes nothing. An event with an implausible time is not stored (logged).

    Raises:
        StorageError: the registry cannot be written.
    """
    try:
        stored = registry.add_event(event, received_at)
    except ValueError as exc:
        log.warning("event from %s not stored: %s", event.device_id, exc)
        return
    state = _OUTCOMES.get(event.kind)
    if state is None or not stored:
        return
    bundle = None
    with contextlib.suppress(ValueError, TypeError):
        bundle = BundleRef.from_dict(event.detail)
    error = event.error
    registry.follow_deployment(
        event.device_id,
        state,
        seen_at=_seen_at(event.ts, received_at),
        received_at=received_at,
        transfer_id=event.transfer_id,
        bundle=bundle,
        error_code=error.code if error else None,
        error_message=error.message if error else None,
    )


def collect_retained(
    client: MqttClient,
    filters: Iterable[str],
    gate: ReportGate,
    quiet_s: float = 0.5,
    max_wait_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> list[Verified]:
    """Subscribe and gather the retained messages the broker sends straight away, verified.

    Returns after ``quiet_s`` without a new message (or ``max_wait_s`` in all). What the
    gate drops is counted there and skipped: one bad device must not hide the fleet.

    Args:
        client: a connected client.
        filters: topic filters to subscribe.
        gate: verifies each message (its counts and enrolment requests are flushed by the caller).
        quiet_s: how long to wait for the next message.
        max_wait_s: how long to wait in all.
        clock: monotonic clock, for the waits.
        wall_clock: the host's clock, for judging devices' times.

    Returns:
        The messages the gate let through, in the order they came.
    """
    for f in filters:
        client.subscribe(f, qos=1)
    out: list[Verified] = []
    deadline = clock() + max_wait_s
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
        verified = gate.check(item.topic, item.payload, wall_clock())
        if isinstance(verified, Verified):
            out.append(verified)
    return out
