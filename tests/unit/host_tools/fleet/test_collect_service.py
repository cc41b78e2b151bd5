"""The collector's worker: batches, commits, then acknowledges (a fake client, a real SQLite registry)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from report_stream import ReportingDevice

from edge_sdk.errors import ConfigError, StorageError, TransportError
from edge_sdk.mqtt import ConnectionChange, Incoming, parse_broker_url
from edge_sdk.protocol import DeviceTopics, Event, seal
from host_tools.fleet.collect_service import CollectOptions, Collector, collect_filters
from host_tools.fleet.registry import Registry, open_registry

NOW = 1_700_000_000.0


class FakeClient:
    """The part of MqttClient a collector uses; records acknowledgements and subscriptions."""

    def __init__(self) -> None:
        self.address = parse_broker_url("mqtt://127.0.0.1:1")
        self.inbox: queue.Queue[Incoming | ConnectionChange] = queue.Queue()
        self.acked: list[int] = []
        self.subscribed: list[str] = []
        self.epoch = 1
        self.inbox_dropped = 0
        self.options = CollectOptions(client_id="unit").mqtt_options()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.subscribed.append(topic_filter)

    def ack(self, message: Incoming) -> bool:
        if message.link_epoch != self.epoch:
            return False
        self.acked.append(message.mid)
        return True


def _message(device: ReportingDevice, mid: int, ts: float = NOW) -> Incoming:
    return Incoming(DeviceTopics(device.device_id).metrics, device.report(ts), False, 1, mid, 1)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = open_registry(tmp_path / "registry.db")
    yield reg
    reg.close()


def _run_until(collector: Collector, done: Callable[[], bool], limit_s: float = 5.0) -> None:
    """Run the collector on this thread (it owns the registry) until ``done()`` or the limit."""
    stop = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + limit_s
        while not done() and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    collector.run(stop)
    watcher.join()


def test_a_batch_is_acknowledged_only_after_it_is_committed_and_a_refused_one_is_kept(registry: Registry) -> None:
    device = ReportingDevice("pi-01")
    registry.enroll(device.device_id, device.key.public_key.raw.hex(), NOW)
    client = FakeClient()
    options = CollectOptions(client_id="unit", group="g", batch_wait_s=0.01, retry_s=0.05)
    collector = Collector(client, registry, options, wall_clock=lambda: NOW)  # type: ignore[arg-type]
    refusals = []
    real_batch = registry.batch

    def batch_refused_once():  # type: ignore[no-untyped-def]
        if not refusals:
            refusals.append(client.acked[:])  # nothing acknowledged before the first commit
            raise StorageError("database went away")
        return real_batch()

    registry.batch = batch_refused_once  # type: ignore[method-assign]
    messages = [_message(device, mid, NOW - 10 + mid) for mid in (1, 2, 3)]
    for m in [*messages, messages[1]]:  # the second one delivered again: one row
        client.inbox.put(m)
    _run_until(collector, lambda: len(client.acked) == 4)

    assert refusals == [[]] and client.acked == [1, 2, 3, 2]
    assert collector.counts.retries == 1 and collector.counts.stored == 4
    assert len(registry.latest_metrics()) == 1
    assert len(registry._conn.execute("SELECT id FROM metrics").fetchall()) == 3
    assert client.subscribed == collect_filters("g")


def test_a_message_from_an_ended_connection_is_stored_and_left_for_the_broker_to_send_again(
    registry: Registry,
) -> None:
    device = ReportingDevice("pi-02")
    registry.enroll(device.device_id, device.key.public_key.raw.hex(), NOW)
    client = FakeClient()
    collector = Collector(client, registry, CollectOptions(client_id="unit", batch_wait_s=0.01), wall_clock=lambda: NOW)  # type: ignore[arg-type]
    client.inbox.put(_message(device, 5))
    client.epoch = 2  # the connection it came on ended before the commit
    client.inbox.put(ConnectionChange(False, "lost"))
    _run_until(collector, lambda: collector.counts.redelivered == 1)
    assert client.acked == [] and collector.counts.stored == 1 and collector.counts.reconnects == 1


def test_a_batch_refused_after_it_was_judged_is_stored_whole_on_the_retry(registry: Registry) -> None:
    # The batch is judged once; its write fails at the last statement (the drop counts),
    # after the gate raised the devices' sequence numbers and counted a forgery. The retry
    # must store every report, the forgery's count and the sequence numbers all the same.
    device = ReportingDevice("pi-01")
    registry.enroll(device.device_id, device.key.public_key.raw.hex(), NOW)
    forged = ReportingDevice("pi-01")  # another key for the enrolled id
    client = FakeClient()
    options = CollectOptions(client_id="unit", batch_wait_s=0.05, retry_s=0.05)
    collector = Collector(client, registry, options, wall_clock=lambda: NOW)  # type: ignore[arg-type]
    real_count = registry.count_drops
    refusals: list[object] = []

    def count_refused_once(drops, at):  # type: ignore[no-untyped-def]
        if not refusals:
            refusals.append(dict(drops))
            raise StorageError("database went away")
        return real_count(drops, at)

    registry.count_drops = count_refused_once  # type: ignore[method-assign]
    for mid in (1, 2, 3):
        client.inbox.put(_message(device, mid, NOW - 10 + mid))
    client.inbox.put(Incoming(DeviceTopics("pi-01").metrics, forged.report(NOW - 0.5), False, 1, 4, 1))
    _run_until(collector, lambda: len(client.acked) == 4)

    assert refusals == [{("pi-01", "bad_signature"): 1}] and collector.counts.retries == 1
    assert collector.counts.stored == 3 and collector.counts.dropped == 1
    assert len(registry.query("SELECT id FROM metrics", what="count")) == 3
    assert registry.drop_counts() == {"pi-01": {"bad_signature": 1}}
    assert registry.get_enrolment("pi-01").sequences == {"metrics": 3}  # type: ignore[union-attr]


def test_events_and_forged_messages(registry: Registry) -> None:
    device, stranger = ReportingDevice("pi-03"), ReportingDevice("pi-04")
    registry.enroll(device.device_id, device.key.public_key.raw.hex(), NOW)
    client = FakeClient()
    collector = Collector(client, registry, CollectOptions(client_id="unit", batch_wait_s=0.01), wall_clock=lambda: NOW)  # type: ignore[arg-type]
    event = seal(Event(device.device_id, "progress", NOW - 1), device.key, 99, NOW - 1)
    client.inbox.put(Incoming(DeviceTopics(device.device_id).events, event, False, 1, 1, 1))
    forged = seal(Event(device.device_id, "installed", NOW - 1), stranger.key, 100, NOW - 1)
    client.inbox.put(Incoming(DeviceTopics(device.device_id).events, forged, False, 1, 2, 1))
    _run_until(collector, lambda: len(client.acked) == 2)
    assert collector.counts.stored == 1 and collector.counts.dropped == 1
    assert registry.count_events(device.device_id) == 1
    assert registry.drop_counts() == {device.device_id: {"bad_signature": 1}}


def test_an_overflowing_inbox_ends_the_run_after_committing_what_it_holds(registry: Registry) -> None:
    device = ReportingDevice("pi-05")
    registry.enroll(device.device_id, device.key.public_key.raw.hex(), NOW)
    client = FakeClient()
    collector = Collector(client, registry, CollectOptions(client_id="unit", batch_wait_s=0.01), wall_clock=lambda: NOW)  # type: ignore[arg-type]
    client.inbox.put(_message(device, 1))
    client.inbox_dropped = 3  # a backlog larger than the inbox: three never acknowledged
    with pytest.raises(TransportError, match="dropped 3 messages") as caught:
        collector.run(threading.Event())
    assert caught.value.exit_code == 4 and client.acked == [1] and collector.counts.stored == 1


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"client_id": ""}, "fixed client id"),
        ({"client_id": "c", "group": "a/b"}, "bad shared-subscription group"),
        ({"client_id": "c", "batch_max": 0}, "batch_max must be a positive integer"),
        ({"client_id": "c", "retry_s": 0}, "retry_s must be a positive number"),
    ],
)
def test_collect_options_are_checked(options: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        CollectOptions(**options)  # type: ignore[arg-type]


def test_a_collector_keeps_a_session_and_acknowledges_itself() -> None:
    mqtt = CollectOptions(client_id="collect-1", session_expiry_s=600, receive_maximum=200).mqtt_options()
    assert (mqtt.client_id, mqtt.protocol, mqtt.session_expiry_s) == ("collect-1", "5", 600)
    assert mqtt.manual_ack and mqtt.receive_maximum == 200 and mqtt.inbox_max == 200_000
    assert collect_filters(None) == [
        "edge/v1/devices/+/status",
        "edge/v1/devices/+/heartbeat",
        "edge/v1/devices/+/events",
        "edge/v1/devices/+/metrics",
    ]
    assert collect_filters("g")[0] == "$share/g/edge/v1/devices/+/status"


def test_a_backlog_is_checked_with_the_pool_and_stored_once(registry: Registry) -> None:
    devices = [ReportingDevice(f"pool-{i}") for i in range(4)]
    for d in devices:
        registry.enroll(d.device_id, d.key.public_key.raw.hex(), NOW)
    forged = ReportingDevice("pool-0")  # another key for an enrolled id
    client = FakeClient()
    options = CollectOptions(client_id="unit", batch_wait_s=0.2, verify_workers=1, pool_min=8)
    collector = Collector(client, registry, options, wall_clock=lambda: NOW)  # type: ignore[arg-type]
    for i in range(40):
        client.inbox.put(_message(devices[i % 4], i + 1, NOW - 40 + i))
    client.inbox.put(Incoming(DeviceTopics("pool-0").metrics, forged.report(NOW - 0.5), False, 1, 41, 1))
    _run_until(collector, lambda: len(client.acked) == 41, limit_s=60)
    assert sorted(client.acked) == list(range(1, 42))
    assert collector.counts.stored == 40 and collector.counts.dropped == 1
    assert len(registry.query("SELECT id FROM metrics", what="count")) == 40
    assert registry.drop_counts() == {"pool-0": {"bad_signature": 1}}
