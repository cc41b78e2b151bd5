"""Which devices a rollout's selector names, from a real SQLite registry; the plan's baselines."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.metrics import LatencyStats
from edge_sdk.protocol import MetricsReport
from host_tools.fleet.registry import BundleRef, DeviceRecord, Registry, open_registry
from host_tools.fleet.rollout_plan import (
    Offline,
    Online,
    RolloutPlanner,
    RolloutPolicy,
    Start,
    Target,
    Tick,
    presence_events,
)
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
    t = _target(reg, device, "m", 1001.0)
    assert (t.previous_version, t.base_p99_ms, t.base_rss_bytes, t.online) == (3, 2.5, None, True)
    assert _target(reg, device, "other", 1001.0).previous_version is None


def test_the_gate_s_baseline_is_the_install_profile_not_a_newer_periodic_report(reg: Registry) -> None:
    # With metrics_every_s on, the newest report of the running version is a periodic one,
    # measured with fewer runs; the health gate compares the new install's profile with the
    # old install's profile.
    def stats(p99: float) -> LatencyStats:
        return LatencyStats(count=10, mean_ms=1, stdev_ms=0, min_ms=1, max_ms=9, p50_ms=1, p90_ms=2, p99_ms=p99,
                            throughput_per_s=100)  # fmt: skip

    reg.add_metrics(MetricsReport("pi-0", "m", 3, "onnxruntime", "fp32", 1000.0, latency=stats(2.5)), 1001.0)
    periodic = MetricsReport(
        "pi-0", "m", 3, "onnxruntime", "fp32", 1060.0, latency=stats(7.0), extra={"mode": "periodic", "every_s": 60}
    )
    assert periodic.periodic
    reg.add_metrics(periodic, 1061.0)
    device = reg.get_device("pi-0")
    assert device is not None
    assert _target(reg, device, "m", 1061.0).base_p99_ms == 2.5
    [newest] = reg.latest_metrics("pi-0", "m")  # readers of the fleet's state see the newest
    assert newest.report.periodic and newest.report.latency is not None and newest.report.latency.p99_ms == 7.0
    [install] = reg.latest_metrics("pi-0", "m", periodic=False)
    assert not install.report.periodic and install.report.ts == 1000.0


def test_a_device_not_heard_within_its_heartbeat_interval_times_the_factor_is_planned_offline(
    reg: Registry, tmp_path: Path
) -> None:
    # pi-0 said online at 1000 and beats every 10 s: stale (not online) once 3 x 10 s pass unheard.
    reg.upsert_device(
        DeviceRecord("pi-0", "online", 1000.0, active_bundles=(BundleRef("m", 3),), broker="mqtt://127.0.0.1:1",
                     heartbeat_s=10.0)
    )  # fmt: skip
    device = reg.get_device("pi-0")
    assert device is not None
    assert _target(reg, device, "m", 1029.0).online is True
    assert _target(reg, device, "m", 1031.0).online is False  # stale: treated as offline
    reg.record_heartbeat("pi-0", "mqtt://127.0.0.1:1", 1030.0, 10.0)
    heard = reg.get_device("pi-0")
    assert heard is not None and _target(reg, heard, "m", 1031.0).online is True
    offline = reg.get_device("pi-1")
    assert offline is not None and _target(reg, offline, "m", 1001.0).online is False
    # The plan built from the registry holds the stale device back; heard again, it starts.
    targets = [_target(reg, d, "m", 1100.0) for d in select_devices(reg, "pi-0,pi-2")]
    planner = RolloutPlanner.plan(RolloutPolicy(canary_count=1, canary_share=None), targets, 1100.0)
    started = [d for d in planner.accept(Tick(), 1100.0) if isinstance(d, Start)]
    assert started == [Start(1, ("pi-2",))]
    assert (planner.devices["pi-0"].state, planner.devices["pi-0"].online) == ("queued", False)
    assert presence_events(planner.devices.values(), {"pi-0": "stale", "pi-2": "online"}) == []
    (back,) = presence_events(planner.devices.values(), {"pi-0": "online"})
    assert back == Online("pi-0")
    assert [d for d in planner.accept(back, 1101.0) if isinstance(d, Start)] == [Start(0, ("pi-0",))]


def test_presence_events_treat_stale_as_offline_and_leave_unknown_devices_alone() -> None:
    planner = RolloutPlanner.plan(
        RolloutPolicy(canary_count=1, canary_share=None),
        [Target("a"), Target("b"), Target("c", online=False), Target("d")],
        0.0,
    )
    events = presence_events(planner.devices.values(), {"a": "stale", "b": "online", "c": "online"})
    assert events == [Offline("a"), Online("c")]
    assert presence_events(planner.devices.values(), {"b": "offline"}) == [Offline("b")]
