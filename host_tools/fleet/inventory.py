"""What the fleet looks like now: devices and their latest metrics, read from the registry
(:func:`list_devices`), or first brought up to date from a broker's retained messages
(:func:`current_devices`).

The registry is kept current by the collector (``edgectl collect``), so a listing reads it
and nothing else: no wait for retained messages, any number of devices, paged by key. Each
device's state (``online``, ``stale``, ``offline``) is computed at read time from the times
stored (:func:`host_tools.fleet.liveness.liveness`), and its labels are its own (from its
status) overridden key by key by the operator's (``edgectl devices label``).

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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from edge_sdk.errors import ConfigError
from host_tools.fleet.liveness import DEFAULT_STALE_FACTOR, LivenessState, liveness
from host_tools.fleet.registry import DEVICE_PAGE, DeviceRecord, DeviceRow, ForgetResult, MetricsRecord, Registry
from host_tools.fleet.selectors import Selector

if TYPE_CHECKING:
    from edge_sdk.mqtt import MqttClient

# What reads a broker (the MQTT client, the protocol, the report gate) is imported by the
# functions that read one: `edgectl devices` lists the registry without paying for them.

__all__ = [
    "DeviceView",
    "ListingQuery",
    "current_devices",
    "cursor_of",
    "forget_device",
    "label_device",
    "latest_metrics",
    "list_device_rows",
    "list_devices",
    "parse_cursor",
    "require_known",
]


@dataclass(frozen=True)
class DeviceView:
    """One registry row as ``edgectl devices`` shows it.

    Args:
        record: the registry's row (its ``status`` is the last one recorded).
        confirmed: this command read the device's retained status from its broker just
            now, so ``record.status`` is what that broker says at present.
        checked_broker: the broker this command read (``mqtt://host:port``); ``""`` when
            the listing read the registry only.
        state: ``online``, ``stale`` or ``offline``, computed when listed.
        operator_labels: the labels the operator set on this device.
    """

    record: DeviceRecord
    confirmed: bool
    checked_broker: str
    state: LivenessState = "online"
    operator_labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """The registry's status when no broker was read; else ``online`` or ``offline`` as
        the broker says now, ``unknown`` when not confirmed."""
        if not self.checked_broker:
            return self.record.status
        return self.record.status if self.confirmed else "unknown"

    @property
    def labels(self) -> dict[str, str]:
        """The labels selectors see: the device's own, overridden key by key by the operator's."""
        return {**(self.record.labels or {}), **self.operator_labels}

    def label_sources(self) -> dict[str, str]:
        """Each label's source: ``device`` or ``operator`` (the operator's wins on a shared key)."""
        return {k: ("operator" if k in self.operator_labels else "device") for k in self.labels}

    def to_dict(self) -> dict[str, Any]:
        """The record's dict, with ``status`` as :attr:`status`, ``last_status`` (the
        registry's), ``status_confirmed``, ``state``, and the labels (effective, with their
        sources, and the operator's)."""
        labels = dict(sorted(self.labels.items()))
        operator = self.operator_labels
        return {
            **self.record.to_dict(),
            "status": self.status,
            "last_status": self.record.status,
            "status_confirmed": self.confirmed,
            "state": self.state,
            "labels": labels,
            "label_sources": {k: ("operator" if k in operator else "device") for k in labels},
            "operator_labels": dict(operator),
        }


@dataclass(frozen=True)
class ListingQuery:
    """Which devices a listing returns.

    Args:
        selector: only devices it selects (by effective labels and id).
        state: only devices in this state.
        limit: at most this many (None: all).
        after: start after this ``(device_id, broker)`` (:func:`parse_cursor`).
        stale_factor: heartbeat intervals a device may go unheard before it is stale.
    """

    selector: Selector = field(default_factory=Selector)
    state: LivenessState | None = None
    limit: int | None = None
    after: tuple[str, str] | None = None
    stale_factor: float = DEFAULT_STALE_FACTOR

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")


def cursor_of(view: DeviceView | DeviceRow) -> str:
    """The ``--after`` cursor that continues a listing after ``view`` (or a row): ``DEVICE/BROKER``."""
    record = view.record if isinstance(view, DeviceView) else view
    return f"{record.device_id}/{record.broker}"


def parse_cursor(text: str) -> tuple[str, str]:
    """``DEVICE/BROKER`` (as :func:`cursor_of` writes it) as ``(device_id, broker)``.

    Raises:
        ConfigError: not a cursor.
    """
    device_id, sep, broker = text.partition("/")
    if not sep or not device_id:
        raise ConfigError(f"bad cursor {text[:120]!r}: expected DEVICE/BROKER as a listing printed it")
    return device_id, broker


def list_devices(registry: Registry, now: float, query: ListingQuery | None = None) -> Iterator[DeviceView]:
    """The registry's devices, ordered by id then broker, read page by page (nothing else is read).

    Args:
        registry: the registry.
        now: unix seconds now, for each device's state.
        query: selector, state, limit and cursor; everything when None.

    Yields:
        One view per device row that the query selects, at most ``query.limit``.

    Raises:
        StorageError: the registry cannot be read.
    """
    for row, state, mine in list_device_rows(registry, now, query):
        yield DeviceView(registry.device_record(row), False, "", state, mine)


def list_device_rows(
    registry: Registry, now: float, query: ListingQuery | None = None
) -> Iterator[tuple[DeviceRow, LivenessState, Mapping[str, str]]]:
    """What :func:`list_devices` lists, as stored rows: for a listing that writes them out
    (``edgectl devices --json``) without building a record and a view per device.

    Args:
        registry: the registry.
        now: unix seconds now, for each device's state.
        query: selector, state, limit and cursor; everything when None.

    Yields:
        ``(row, state, operator labels)`` per device row that the query selects, at most
        ``query.limit``, ordered by id then broker.

    Raises:
        StorageError: the registry cannot be read.
    """
    query = query or ListingQuery()
    operator = registry.operator_labels()
    only_ids = query.selector.device_ids()
    by_labels = bool(query.selector.terms)
    wanted, factor = query.state, query.stale_factor
    left = query.limit
    none: Mapping[str, str] = {}
    # A page of --limit N unfiltered rows holds the N that will be listed: read no more.
    unfiltered = only_ids is None and not by_labels and wanted is None
    pages = {"page": min(left, DEVICE_PAGE)} if left is not None and unfiltered else {}
    for row in registry.iter_device_rows(after=query.after, **pages):
        device_id = row.device_id
        if only_ids is not None and device_id not in only_ids:
            continue
        state = liveness(row.status, row.last_seen, row.last_heard, row.heartbeat_s, now, factor)
        if wanted is not None and state != wanted:
            continue
        mine = operator.get(device_id, none)
        if by_labels and not query.selector.matches(device_id, {**(row.device_labels() or {}), **mine}):
            continue
        yield row, state, mine
        if left is not None:
            left -= 1
            if left == 0:
                return


def label_device(
    registry: Registry, device_id: str, labels: Mapping[str, str], remove: tuple[str, ...], at: float
) -> DeviceView:
    """Set and remove operator labels on a device the registry knows.

    Returns:
        The device as listed now (its row seen last).

    Raises:
        ConfigError: the device is unknown, or the labels are bad or too many.
        StorageError: the registry cannot be read or written.
    """
    require_known(registry, device_id)
    operator = registry.set_operator_labels(device_id, labels, remove, at=at)
    record = registry.get_device(device_id)
    assert record is not None  # require_known saw it
    state = liveness(record.status, record.last_seen, record.last_heard, record.heartbeat_s, at)
    return DeviceView(record, False, "", state, operator)


def current_devices(
    registry: Registry,
    client: MqttClient,
    wait_s: float = 1.0,
    clock: Callable[[], float] = time.time,
    *,
    allow_unsigned: bool = False,
    query: ListingQuery | None = None,
) -> list[DeviceView]:
    """Record every device's retained status on this broker, then list the registry's devices.

    Args:
        registry: where device status is recorded.
        client: a connected client; its broker's address is recorded with each device.
        wait_s: how long to listen for retained status after the last one arrived.
        clock: wall clock, for when each status was received.
        allow_unsigned: believe unsigned statuses (migration period only).
        query: which devices to list (:func:`list_devices`); all when None.

    Returns:
        The device rows the registry holds (those ``query`` selects), ordered by id then
        broker, each marked confirmed when its status was read from this broker now.

    Raises:
        StorageError: the registry cannot be read or written.
    """
    from edge_sdk.protocol import Channel, DeviceStatus, fleet_filter
    from host_tools.fleet.collector import collect_retained, record_message
    from host_tools.fleet.enrolment import ReportGate

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
        replace(view, confirmed=view.record.broker == broker and view.record.device_id in seen, checked_broker=broker)
        for view in list_devices(registry, clock(), query)
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
    from edge_sdk.protocol import DeviceTopics

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
        from edge_sdk.protocol import Channel, DeviceTopics, fleet_filter
        from host_tools.fleet.collector import collect_retained, record_message
        from host_tools.fleet.enrolment import ReportGate

        topic = DeviceTopics(device_id).metrics if device_id else fleet_filter(Channel.METRICS)
        gate = ReportGate.from_registry(registry, allow_unsigned=allow_unsigned)
        for verified in collect_retained(client, [topic], gate, wall_clock=clock):
            if verified.fresh:
                record_message(registry, verified.msg, clock())
        gate.flush(registry, clock())
    return registry.latest_metrics(device_id=device_id)
