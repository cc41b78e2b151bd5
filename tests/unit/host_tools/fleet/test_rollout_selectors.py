"""Which devices a rollout's selector names, from a real SQLite registry; the plan's baselines."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.metrics import LatencyStats
from edge_sdk.protocol import MetricsReport
from host_tools.fleet.registry import BundleRef, DeviceRecord, Registry, open_registry
from host_tools.fleet.rollouts import _target, select_devices


@pytest.fixture
def reg(tmp_path: Path):
    with open_registry(tmp_path / "registry.db") as r:
        r.ensure_schema()
        for i, (status, arch) in enumerate([("online", "aarch64"), ("offline", "aarch64"), ("online", "x86_64")]):
            r.upsert_device(
                DeviceRecord(f"pi-{i}", status, 1000.0 + i, platform={"machine": arch}, runtimes={"onnxruntime": "1"},
                             active_bundles=(BundleRef("m", 3),), broker="mqtt://127.0.0.1:1")
            )  # fmt: skip
        yield r


def test_ids_name_devices_the_registry_knows(reg: Registry) -> None:
    assert [d.device_id for d in select_devices(reg, "pi-2, pi-0")] == ["pi-0", "pi-2"]
    with pytest.raises(ConfigError, match="does not know: ghost"):
        select_devices(reg, "pi-0,ghost")


def test_key_value_terms_must_all_match(reg: Registry) -> None:
    assert [d.device_id for d in select_devices(reg, "platform.machine=aarch64")] == ["pi-0", "pi-1"]
    assert [d.device_id for d in select_devices(reg, "platform.machine=aarch64,status=online")] == ["pi-0"]
    assert [d.device_id for d in select_devices(reg, "runtime.onnxruntime,bundle.m=3")] == ["pi-0", "pi-1", "pi-2"]
    assert [d.device_id for d in select_devices(reg, "platform.machine!=aarch64")] == ["pi-2"]
    for bad in ("", "colour=red", "pi-0,status=online", "status=lost", "bundle.m=4", "@nogroup", "a=b=c=="):
        with pytest.raises(ConfigError):
            select_devices(reg, bad)


def test_labels_and_groups_select_with_facts(reg: Registry) -> None:
    reg.set_operator_labels("pi-1", {"site": "depot-3"}, at=2000.0)
    reg.set_operator_labels("pi-2", {"site": "depot-3", "status": "online"}, at=2000.0)
    assert [d.device_id for d in select_devices(reg, "site=depot-3")] == ["pi-1", "pi-2"]
    reg.save_group("depot3-online", "site=depot-3,status=online", 2000.0)
    assert [d.device_id for d in select_devices(reg, "@depot3-online")] == ["pi-2"]  # pi-1 is offline
    assert [d.device_id for d in select_devices(reg, "site")] == ["pi-1", "pi-2"]  # a bare word, not a device


def test_a_target_carries_the_running_version_and_what_it_measured(reg: Registry) -> None:
    stats = LatencyStats(count=10, mean_ms=1, stdev_ms=0, min_ms=1, max_ms=3, p50_ms=1, p90_ms=2, p99_ms=2.5,
                         throughput_per_s=100)  # fmt: skip
    reg.add_metrics(MetricsReport("pi-0", "m", 3, "onnxruntime", "fp32", 1000.0, latency=stats), 1001.0)
    device = reg.get_device("pi-0")
    assert device is not None
    t = _target(reg, device, "m")
    assert (t.previous_version, t.base_p99_ms, t.base_rss_bytes, t.online) == (3, 2.5, None, True)
    assert _target(reg, device, "other").previous_version is None
