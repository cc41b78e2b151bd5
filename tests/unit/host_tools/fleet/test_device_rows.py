"""Devices in the registry: keyed by broker, every active bundle, cleared on remove, forgotten.

Also the collector's reading of a status message (every bundle; ``[]`` clears, a will
keeps) and the inventory's rule for "online": only what this broker said just now.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import pytest
from device_keys import TestDevice

from edge_sdk.errors import ConfigError
from edge_sdk.mqtt import BrokerAddress, Incoming
from edge_sdk.protocol import DeviceStatus, DeviceTopics, encode
from host_tools.fleet.collector import active_bundles, record_message
from host_tools.fleet.inventory import current_devices, forget_device
from host_tools.fleet.registry import BundleRef, DeviceRecord, Registry, open_registry

HERE = "mqtt://here:1883"
THERE = "mqtt://there:1883"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Registry]:
    with open_registry(tmp_path / "registry.db") as registry:
        yield registry


def _status(device_id: str, ts: float, bundles: list[dict] | None, state: str = "online") -> DeviceStatus:
    active = None if bundles is None else {"bundles": bundles}
    return DeviceStatus(device_id, state, ts, agent_version="1", active=active)


class FakeClient:
    """What inventory needs of an MqttClient: an address, subscribe, publish_wait and an inbox."""

    def __init__(self, url: str, retained: list[DeviceStatus], signer: TestDevice | None = None) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.address = BrokerAddress(host, int(port), False)
        self.inbox: queue.Queue[object] = queue.Queue()
        self.retained = retained
        self.signer = signer
        self.published: list[tuple[str, bytes, bool]] = []

    def subscribe(self, topic: str, qos: int = 1) -> None:
        for msg in self.retained:
            payload = encode(msg) if self.signer is None else self.signer.sign(msg)
            self.inbox.put(Incoming(DeviceTopics(msg.device_id).status, payload, True))

    def publish_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.published.append((topic, payload, retain))


def test_a_status_lists_every_bundle_and_an_empty_list_clears_what_a_will_keeps(db: Registry) -> None:
    two = [{"name": "beta", "version": 3}, {"name": "alpha", "version": 10}, {"name": "", "version": 1}]
    assert active_bundles(_status("d", 1, two)) == (BundleRef("alpha", 10), BundleRef("beta", 3))
    record_message(db, _status("d", 1.0, two), 1.0, HERE)
    got = db.get_device("d")
    assert got is not None and got.active_bundles == (BundleRef("alpha", 10), BundleRef("beta", 3))
    assert got.to_dict()["active_bundles"] == [{"name": "alpha", "version": 10}, {"name": "beta", "version": 3}]

    record_message(db, _status("d", 2.0, None, "offline"), 2.0, HERE)  # a will: says nothing of bundles
    got = db.get_device("d")
    assert got is not None and got.status == "offline" and len(got.active_bundles or ()) == 2

    record_message(db, _status("d", 3.0, []), 3.0, HERE)  # after `remove`: runs nothing
    got = db.get_device("d")
    assert got is not None and got.active_bundles == () and got.active_bundle is None


def test_a_will_signed_before_the_birth_still_marks_the_device_offline(db: Registry) -> None:
    # The agent signs its will when it connects, just before its birth: the will's own time
    # is older than the birth's, yet the broker publishes it later, when the link dies.
    record_message(db, _status("d", 100.0, []), 100.5, HERE)  # birth
    record_message(db, _status("d", 99.9, None, "offline"), 500.0, HERE)  # the will, heard at 500
    got = db.get_device("d")
    assert got is not None and got.status == "offline" and got.last_seen == 500.0
    record_message(db, _status("d", 600.0, []), 600.2, HERE)  # back
    got = db.get_device("d")
    assert got is not None and got.status == "online"


def test_one_device_id_on_two_brokers_is_two_rows(db: Registry) -> None:
    record_message(db, _status("d", 1.0, []), 1.0, HERE)
    record_message(db, _status("d", 5.0, [], "offline"), 5.0, THERE)
    rows = db.list_devices()
    assert [(r.broker, r.status, r.last_seen) for r in rows] == [(HERE, "online", 1.0), (THERE, "offline", 5.0)]
    assert db.get_device("d", HERE) == rows[0] and db.get_device("d") == rows[1]  # the one seen last


def test_a_row_from_before_brokers_were_known_is_adopted_once(db: Registry) -> None:
    db.upsert_device(DeviceRecord("d", "online", 1.0))  # broker "" (schema 2 rows)
    db.upsert_device(DeviceRecord("d", "online", 2.0, broker=HERE))
    db.upsert_device(DeviceRecord("d", "online", 3.0, broker=THERE))
    assert [(r.broker, r.first_seen) for r in db.list_devices()] == [(HERE, 1.0), (THERE, 3.0)]


def test_online_only_when_this_broker_says_so_now(db: Registry) -> None:
    record_message(db, _status("gone", 1.0, []), 1.0, THERE)  # its broker stopped; no will reached it
    record_message(db, _status("cleared", 1.0, []), 1.0, HERE)  # this broker no longer holds its status
    live = TestDevice("live")
    db.enroll("live", live.public_hex, 1.0)  # only an enrolled device's signed status is believed
    client = FakeClient(HERE, [_status("live", 9.0, [{"name": "m", "version": 2}])], live)
    views = {(v.record.device_id, v.record.broker): v for v in current_devices(db, client, wait_s=0.05)}  # type: ignore[arg-type]
    assert views[("live", HERE)].status == "online" and views[("live", HERE)].confirmed
    for key in (("gone", THERE), ("cleared", HERE)):
        assert views[key].status == "unknown" and views[key].record.status == "online"
        assert views[key].to_dict()["last_status"] == "online" and not views[key].to_dict()["status_confirmed"]


def test_forget_deletes_every_row_and_clears_retained_messages(db: Registry) -> None:
    record_message(db, _status("d", 1.0, []), 1.0, HERE)
    record_message(db, _status("d", 2.0, []), 2.0, THERE)
    db.record_deployment("d", "m", 1, "ab" * 32, started_at=1.0)
    db.record_deployment("other", "m", 1, "ab" * 32, started_at=1.0)
    client = FakeClient(HERE, [])
    result = forget_device(db, client, "d")  # type: ignore[arg-type]
    assert (result.devices, result.deployments, result.metrics, result.brokers) == (2, 1, 0, (HERE, THERE))
    topics = DeviceTopics("d")
    assert client.published == [(topics.status, b"", True), (topics.metrics, b"", True)]
    assert db.get_device("d") is None and [d.device_id for d in db.list_deployments()] == ["other"]

    with pytest.raises(ConfigError, match="no device 'd' in registry"):
        forget_device(db, client, "d")  # type: ignore[arg-type]
    assert len(client.published) == 2  # nothing published for an unknown device
