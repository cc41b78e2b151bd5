"""The registry's fleet facts on SQLite and PostgreSQL: labels, heartbeats, installed and previous
versions, groups, keyset paging; and a schema-4 registry upgrading in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from test_registry import db, open_db  # noqa: F401  # the fixtures: each case runs on both backends

import host_tools.fleet.registry as registry_module
from edge_sdk.errors import ConfigError
from edge_sdk.protocol import DeviceStatus, Heartbeat
from host_tools.fleet.collector import record_message
from host_tools.fleet.registry import SCHEMA_VERSION, BundleRef, DeviceRecord, Registry, open_registry

BROKER = "mqtt://127.0.0.1:1"
T0 = 1_700_000_000.0


def _status(device_id: str, ts: float, bundles: dict[str, int] | None = None, **kw: object) -> DeviceStatus:
    active = None if bundles is None else {"bundles": [{"name": n, "version": v} for n, v in bundles.items()]}
    return DeviceStatus(device_id, "online", ts, active=active, **kw)  # type: ignore[arg-type]


def test_labels_and_heartbeats_of_a_status_and_a_heartbeat_are_recorded(db: Registry) -> None:  # noqa: F811
    record_message(db, _status("pi-1", T0, labels={"site": "depot-3"}, heartbeat_s=30.0), T0, BROKER)
    record_message(db, Heartbeat("pi-1", T0 + 30, 30.0), T0 + 31, BROKER)
    record_message(db, Heartbeat("pi-1", T0 + 30, 30.0), T0 + 31, BROKER)  # the same twice: one fact
    record_message(db, Heartbeat("pi-1", T0 + 10, 30.0), T0 + 12, BROKER)  # late: never moves it back
    got = db.get_device("pi-1")
    assert got is not None and got.labels == {"site": "depot-3"} and got.heartbeat_s == 30.0
    assert got.last_heard == T0 + 31 and got.last_seen == T0 and got.status == "online"
    # A will (no labels, no interval) keeps both; a status with labels {} clears them.
    record_message(db, DeviceStatus("pi-1", "offline", T0 + 40), T0 + 40, BROKER)
    got = db.get_device("pi-1")
    assert got is not None and got.labels == {"site": "depot-3"} and got.heartbeat_s == 30.0
    record_message(db, _status("pi-1", T0 + 50, labels={}), T0 + 50, BROKER)
    assert (got := db.get_device("pi-1")) is not None and got.labels == {}
    assert len(db.list_devices()) == 1


def test_a_heartbeat_before_any_status_makes_an_online_row(db: Registry) -> None:  # noqa: F811
    db.record_heartbeat("pi-2", BROKER, T0, 60.0)
    got = db.get_device("pi-2")
    assert got is not None and got.status == "online" and got.last_heard == T0 and got.platform is None
    with pytest.raises(ValueError):
        db.record_heartbeat("pi-2", BROKER, T0, 0)


def test_a_changed_active_version_becomes_previous(db: Registry) -> None:  # noqa: F811
    record_message(db, _status("pi-1", T0, {"digits": 1, "kws": 4}), T0, BROKER)
    record_message(db, _status("pi-1", T0 + 10, {"digits": 2, "kws": 4}), T0 + 10, BROKER)
    record_message(db, _status("pi-1", T0 + 10, {"digits": 2, "kws": 4}), T0 + 10, BROKER)  # again: no change
    record_message(db, _status("pi-1", T0 + 5, {"digits": 7}), T0 + 5, BROKER)  # older, out of order: ignored
    rows = {(v.bundle_name): (v.version, v.previous, v.changed_at) for v in db.installed_versions("pi-1")}
    assert rows == {"digits": (2, 1, T0 + 10), "kws": (4, None, T0)}
    record_message(db, _status("pi-1", T0 + 20, {"digits": 1}), T0 + 20, BROKER)  # rolled back, kws removed
    rows = {(v.bundle_name): (v.version, v.previous) for v in db.installed_versions("pi-1")}
    assert rows == {"digits": (1, 2), "kws": (None, 4)}
    record_message(db, DeviceStatus("pi-1", "offline", T0 + 30), T0 + 30, BROKER)  # a will lists nothing: kept
    assert {v.bundle_name: v.version for v in db.installed_versions()} == {"digits": 1, "kws": None}
    db.forget_device("pi-1")
    assert db.installed_versions() == []


def test_operator_labels_set_replace_remove_and_are_bounded(db: Registry) -> None:  # noqa: F811
    assert db.set_operator_labels("pi-1", {"site": "depot-4", "tier": "gold"}, at=T0) == {
        "site": "depot-4",
        "tier": "gold",
    }
    assert db.set_operator_labels("pi-1", {"site": "depot-4"}, at=T0 + 1) == {"site": "depot-4", "tier": "gold"}
    assert db.set_operator_labels("pi-1", {}, ["tier", "absent"], at=T0 + 2) == {"site": "depot-4"}
    assert db.operator_labels() == {"pi-1": {"site": "depot-4"}}
    with pytest.raises(ConfigError, match="both set and removed"):
        db.set_operator_labels("pi-1", {"a": "1"}, ["a"], at=T0)
    with pytest.raises(ConfigError, match="at most 32"):
        db.set_operator_labels("pi-1", {f"k{i}": "v" for i in range(32)}, at=T0)
    assert db.operator_labels("pi-1") == {"pi-1": {"site": "depot-4"}}


def test_groups_save_replace_list_and_remove(db: Registry) -> None:  # noqa: F811
    first = db.save_group("depot3", "site=depot-3", T0)
    assert db.save_group("depot3", "site=depot-3", T0 + 5) == first  # the same again: unchanged
    db.save_group("pi5", "hw=pi5", T0)
    assert [g.name for g in db.list_groups()] == ["depot3", "pi5"]
    replaced = db.save_group("depot3", "site=depot-3,hw=pi5", T0 + 9)
    assert replaced.selector == "site=depot-3,hw=pi5" and replaced.created_at == T0 + 9
    assert db.remove_group("pi5") and not db.remove_group("pi5")
    assert db.get_group("pi5") is None and [g.name for g in db.list_groups()] == ["depot3"]


def test_keyset_paging_lists_every_row_once_in_order(db: Registry) -> None:  # noqa: F811
    for i in range(23):
        for broker in ("mqtt://a:1", "mqtt://b:1"):
            db.upsert_device(DeviceRecord(f"dev-{i:03d}", "online", T0 + i, broker=broker))
    every = [(d.device_id, d.broker) for d in db.iter_devices(page=5)]
    assert every == sorted(every) and len(every) == len(set(every)) == 46
    assert [(d.device_id, d.broker) for d in db.iter_devices(after=every[9], page=4)] == every[10:]
    assert list(db.iter_devices(after=every[-1])) == []


def test_a_schema_4_registry_upgrades_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "v4.db"
    conn = sqlite3.connect(path, isolation_level=None)
    dialect = registry_module._sqlite_dialect()
    conn.execute(registry_module._CREATE_SCHEMA_VERSION)
    for version, steps in registry_module._MIGRATIONS:
        if version > 4:
            break
        for step in steps:
            if isinstance(step, str):
                conn.execute(dialect.sql(step))
            else:
                step(conn, dialect)
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    conn.execute(
        "INSERT INTO devices (device_id, broker, status, active_bundles, first_seen, last_seen) "
        """VALUES ('pi-old', 'mqtt://x:1', 'online', '[{"name":"digits","version":3}]', ?, ?)""",
        (T0, T0),
    )
    conn.close()
    with open_registry(path) as reg:
        assert reg.ensure_schema() == SCHEMA_VERSION
        old = reg.get_device("pi-old")
        assert old is not None and old.active_bundles == (BundleRef("digits", 3),)
        assert old.labels is None and old.heartbeat_s is None and old.last_heard is None
        [installed] = reg.installed_versions()
        assert (installed.device_id, installed.version, installed.previous) == ("pi-old", 3, None)
        record_message(reg, _status("pi-old", T0 + 1, {"digits": 4}), T0 + 1, "mqtt://x:1")
        assert [(v.version, v.previous) for v in reg.installed_versions()] == [(4, 3)]
    with open_registry(path) as again:
        assert again.ensure_schema() == SCHEMA_VERSION
    raw = sqlite3.connect(path)
    assert [r[0] for r in raw.execute("SELECT version FROM schema_version ORDER BY version")] == list(
        range(1, SCHEMA_VERSION + 1)
    )
    raw.close()
