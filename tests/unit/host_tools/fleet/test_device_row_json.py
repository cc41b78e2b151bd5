"""`edgectl devices --json` written straight from the stored rows: byte for byte what the
record -> view -> dict -> ``json.dumps`` path writes, on SQLite and PostgreSQL; the same
devices selected; a malformed row still refused."""

from __future__ import annotations

import json
import random

import pytest
from test_registry import db, open_db  # noqa: F401  # the fixtures: each case runs on both backends

import host_tools.report.fleet as fleet_report
from edge_sdk.errors import StorageError
from host_tools.fleet.inventory import ListingQuery, list_device_rows, list_devices
from host_tools.fleet.registry import BundleRef, DeviceRecord, Registry
from host_tools.fleet.selectors import parse_selector
from host_tools.report.fleet import device_data, device_row_json, device_rows_json

T0 = 1_700_000_000.0
NOW = T0 + 100.0
HOSTILE = 'pi "5"\\ \x1b[31mred\x1b[0m \u2028 caf\u00e9 \U0001f600'


def _fill(reg: Registry) -> None:
    records = [
        DeviceRecord(
            "dev-a",
            "online",
            T0,
            platform={"kind": HOSTILE, "memory_bytes": 8 << 30, "nested": {"z": [1, 2.5, None, True]}},
            runtimes={"onnxruntime": "1.18.0", "litert": None},
            agent_version="0.9.0",
            active_bundles=(BundleRef("kws", 4), BundleRef("digits", 12)),
            broker="mqtt://127.0.0.1:1",
            labels={"site": "depot-3", "hw": HOSTILE},
            heartbeat_s=60.0,
        ),
        DeviceRecord("dev-b", "offline", T0 + 0.1234567890123, first_seen=T0 - 5, broker="mqtt://b:1"),  # all None
        DeviceRecord("dev-c", "online", T0, active_bundles=(), labels={}, heartbeat_s=30, broker="x"),  # int interval
        DeviceRecord("dev-d", "online", T0 + 1e-6, agent_version=HOSTILE, labels={"site": "s"}, heartbeat_s=1.5),
        DeviceRecord("dev-e", "online", T0, labels={"site": "depot-3"}, heartbeat_s=60.0),
    ]
    for record in records:
        reg.upsert_device(record)
    reg.record_heartbeat("dev-a", "mqtt://127.0.0.1:1", T0 + 90, 60.0)
    reg.record_heartbeat("dev-b", "mqtt://b:1", T0 - 1, 60.0)  # before its will: stays offline
    reg.set_operator_labels("dev-a", {"site": "depot-9", "tier": "canary", "area": "n"}, at=T0)
    reg.set_operator_labels("dev-c", {"tier": HOSTILE}, at=T0)


def test_each_row_writes_the_bytes_the_view_path_writes(db: Registry) -> None:  # noqa: F811
    _fill(db)
    drops = {"dev-a": {"replayed": 2, "bad_signature": 1}, "*": {"unknown_device": 3}}
    fast = [device_row_json(row, state, mine, NOW, drops) for row, state, mine in list_device_rows(db, NOW)]
    slow = [json.dumps(device_data(v, NOW, drops), default=str, ensure_ascii=True) for v in list_devices(db, NOW)]
    assert len(fast) == 5
    assert fast == slow
    states = {item["device_id"]: item["state"] for item in map(json.loads, fast)}
    assert states == {"dev-a": "online", "dev-b": "offline", "dev-c": "stale", "dev-d": "stale", "dev-e": "online"}
    assert all(text.isascii() and "\n" not in text for text in fast)
    # Twice: the second time from the decoded-once caches, still the same.
    assert [device_row_json(r, s, m, NOW, drops) for r, s, m in list_device_rows(db, NOW)] == fast


@pytest.mark.parametrize(
    "query",
    [
        ListingQuery(),
        ListingQuery(selector=parse_selector("site=depot-3")),  # dev-a's operator label overrides its own
        ListingQuery(selector=parse_selector("tier")),
        ListingQuery(selector=parse_selector("id=dev-b,id=dev-e")),
        ListingQuery(state="stale"),
        ListingQuery(limit=2, after=("dev-b", "mqtt://b:1")),
    ],
    ids=["all", "label", "operator-label", "ids", "state", "page"],
)
def test_rows_and_views_select_the_same_devices(db: Registry, query: ListingQuery) -> None:  # noqa: F811
    _fill(db)
    rows = [(r.device_id, r.broker, s, dict(m)) for r, s, m in list_device_rows(db, NOW, query)]
    views = [
        (v.record.device_id, v.record.broker, v.state, dict(v.operator_labels)) for v in list_devices(db, NOW, query)
    ]
    assert rows == views


@pytest.mark.parametrize(
    ("column", "value", "says"),
    [
        ("platform", "[1, 2]", "platform must be a JSON object"),
        ("labels", "{not json", "Expecting property name"),
        ("active_bundles", '{"name": "x"}', "active_bundles must be a JSON list"),
        ("active_bundles", '[{"name": "x", "version": 0}]', "version"),
        ("status", "rebooting", "status"),
        ("last_seen", 1e300, "last_seen"),
        ("first_seen", -1.0, "first_seen"),
    ],
)
def test_a_malformed_row_is_refused_not_written(db: Registry, column: str, value: object, says: str) -> None:  # noqa: F811
    _fill(db)
    db.write([(f"UPDATE devices SET {column} = ? WHERE device_id = ?", (value, "dev-c"))], what="break a row")
    with pytest.raises(StorageError, match=says) as caught:
        list(list_device_rows(db, NOW))
    assert "dev-c" in str(caught.value)


def _fleet_of_times(reg: Registry) -> None:
    """Devices whose times differ in every way a listing writes them: fractions, whole seconds,
    first seen with the status or before it, heard after it or never, intervals int, float or none."""
    rng = random.Random(5)
    for i in range(120):
        seen = T0 - rng.choice([0.0, 0.5, 4.2, 59.9, 61.0, 3599.0, 3600.5, 86399.0, 86400.0, 9e5]) - rng.random()
        if i % 7 == 0:
            seen = float(int(seen))  # a whole second
        reg.upsert_device(
            DeviceRecord(
                f"dev-{i:03d}",
                "offline" if i % 5 == 0 else "online",
                seen,
                first_seen=seen if i % 2 else seen - rng.random() * 1e6,
                broker=f"mqtt://b{i % 3}:1",
                labels={"site": f"s{i % 4}", **({"serial": f"n{i}"} if i % 3 == 0 else {})},
                heartbeat_s=[None, 60.0, 30, 1.5][i % 4],
                platform={"kind": f"k{i % 2}"},
            )
        )
        if i % 3:
            reg.record_heartbeat(f"dev-{i:03d}", f"mqtt://b{i % 3}:1", seen + rng.random() * 100, 60.0)
    reg.set_operator_labels("dev-004", {"tier": "canary", "site": "x"}, at=T0)


@pytest.mark.parametrize("offset", [-0.5, 0.0, 0.25, 4.999, 5.0, 59.999, 60.0, 3599.999, 3600.0, 86400.5, 2e6])
def test_a_listing_of_distinct_times_writes_what_each_view_writes(db: Registry, offset: float) -> None:  # noqa: F811
    # The shared parts (the hour of last_seen_text, its "ago", the heads and labels) are cached
    # per listing; every device's own text must still be its own, at every boundary of "ago".
    _fleet_of_times(db)
    now = T0 + offset
    drops = {"dev-001": {"replayed": 1}}
    fast = list(device_rows_json(list_device_rows(db, now), now, drops))
    slow = [json.dumps(device_data(v, now, drops), default=str, ensure_ascii=True) for v in list_devices(db, now)]
    assert len(fast) == 120
    assert fast == slow


def test_a_listing_whose_caches_overflow_writes_the_same(db: Registry, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    _fleet_of_times(db)
    whole = list(device_rows_json(list_device_rows(db, NOW), NOW))
    monkeypatch.setattr(fleet_report, "_SHARED_TEXTS", 2)  # every cache starts afresh again and again
    assert list(device_rows_json(list_device_rows(db, NOW), NOW)) == whole


def test_a_listing_in_pages_lists_each_row_once(db: Registry) -> None:  # noqa: F811
    _fleet_of_times(db)
    whole = [r.device_id for r in db.iter_device_rows()]
    assert whole == sorted(whole) and len(whole) == 120
    for page in (1, 7, 120, 500):
        assert [r.device_id for r in db.iter_device_rows(page=page)] == whole
        assert [r.device_id for r in db.iter_device_rows(after=("dev-050", ""), page=page)] == whole[50:]
    limited = [r.device_id for r, _, _ in list_device_rows(db, NOW, ListingQuery(limit=3, after=("dev-010", "z")))]
    assert limited == whole[11:14]
