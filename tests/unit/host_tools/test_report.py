"""The renderers in host_tools.report: values in, text or JSON-ready dicts out."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from edge_sdk.errors import RollbackError
from edge_sdk.metrics import LatencyStats, ModelMemory, PowerMeasurement
from edge_sdk.protocol import ErrorInfo, Event, EventKind, MetricsReport
from host_tools.demo import DemoResult, DemoRow
from host_tools.fleet.deployer import DeployOutcome
from host_tools.fleet.inventory import DeviceView
from host_tools.fleet.profiler import ProfileOutcome
from host_tools.fleet.registry import BundleRef, DeviceRecord, ForgetResult
from host_tools.keys import RoleSummary, RootSummary
from host_tools.report.demo import demo_table, demo_text
from host_tools.report.fleet import (
    command_data,
    command_text,
    deploy_data,
    deploy_text,
    devices_data,
    devices_text,
    forget_text,
    measured_on,
    metrics_table,
    metrics_text,
    outcome_data,
    power_cell,
    profile_text,
    refusal_text,
    seen_text,
)
from host_tools.report.keys import root_text

LATENCY = LatencyStats(
    count=100, mean_ms=1.3, stdev_ms=0.2, min_ms=1.0, max_ms=5.0, p50_ms=1.25, p90_ms=2.5, p99_ms=4.0,
    throughput_per_s=800.4,
)  # fmt: skip


def _power(
    watts: float, *, estimated: bool = True, joules_per_inference: float = 0.0, source: str = ""
) -> PowerMeasurement:
    return PowerMeasurement(
        joules=watts, seconds=1.0, watts=watts, source=source, estimated=estimated,
        joules_per_inference=joules_per_inference,
    )  # fmt: skip


def _memory(peak_bytes: int) -> ModelMemory:
    return ModelMemory(
        rss_before_load_bytes=0, rss_after_load_bytes=0, model_bytes=0, start_bytes=0, peak_bytes=peak_bytes,
        sampled_peak_bytes=peak_bytes, hwm_bytes=None, samples=1,
    )  # fmt: skip


def _metrics(power: PowerMeasurement | None = None, peak_bytes: int = 0) -> MetricsReport:
    return MetricsReport(
        "dev-1",
        "digits",
        2,
        "onnxruntime",
        "int8",
        ts=1.0,
        threads=2,
        latency=LATENCY,
        memory=_memory(peak_bytes),
        power=power,
    )


def _deploy(state: str = "installed", **fields: Any) -> DeployOutcome:
    return DeployOutcome("dev-1", "digits", 2, "ab" * 32, "t1", state, **fields)


def test_root_text_lists_roles_in_order_and_missing_private_keys() -> None:
    expires = 86400.0 * 365  # 1971-01-01
    summary = RootSummary(
        Path("/keys/root.json"),
        3,
        expires,
        (
            RoleSummary("root", 2, (("r1", True), ("r2", False))),
            RoleSummary("bundles", 1, (("b1", True),)),
        ),
    )
    assert root_text(summary) == (
        "root v3, expires 1971-01-01 -> /keys/root.json (give this file to devices)\n"
        "  root      threshold 2: r1, r2 (no private key here)\n"
        "  bundles   threshold 1: b1"
    )
    assert summary.to_dict() == {
        "root": "/keys/root.json",
        "version": 3,
        "expires_at": expires,
        "roles": {
            "root": {
                "threshold": 2,
                "keys": [{"keyid": "r1", "private_key_here": True}, {"keyid": "r2", "private_key_here": False}],
            },
            "bundles": {"threshold": 1, "keys": [{"keyid": "b1", "private_key_here": True}]},
        },
    }


def test_power_cell_says_estimated_unless_measured() -> None:
    assert power_cell(None) is None
    assert power_cell(_power(1.234)) == "1.23 W (estimated)"
    assert power_cell(_power(2, estimated=False)) == "2.00 W"


def test_metrics_table_one_line_per_report() -> None:
    report = _metrics(_power(0.5, estimated=False), peak_bytes=3 << 20)
    lines = metrics_table([report]).splitlines()
    header = "device  bundle  runtime  measured on  p50 ms  p90 ms  p99 ms  inf/s  peak RSS  power"
    assert lines[0].split() == header.split()
    row = "dev-1  digits v2  onnxruntime int8 x2  -  1.250  2.500  4.000  800  3.0 MiB  0.50 W"
    assert lines[2].split() == row.split()
    assert metrics_text([]) == "no metrics recorded"
    assert metrics_text([report]) == metrics_table([report])


def test_metrics_table_says_when_latency_was_measured_under_emulation() -> None:
    native = dataclasses.replace(_metrics(None), arch="aarch64")
    emulated = dataclasses.replace(native, emulated=True)
    assert [measured_on(r) for r in (_metrics(None), native, emulated)] == [None, "aarch64", "aarch64 (emulated)"]
    assert "aarch64 (emulated)" in metrics_table([emulated]).splitlines()[2]


def test_devices_text() -> None:
    assert devices_text([], 0.0) == "no devices known"
    record = DeviceRecord(
        "dev-1", "online", 0.0, platform={"kind": "pi", "arch": "aarch64", "memory_bytes": 1 << 30}, runtimes={},
        broker="mqtt://b:1883",
    )  # fmt: skip
    row = devices_text([DeviceView(record, True, "mqtt://b:1883")], 180.0).splitlines()[2].split()
    last_seen = ["1970-01-01", "00:00:00", "UTC", "(3", "min", "ago)"]
    assert row == ["dev-1", "mqtt://b:1883", "online", "pi", "aarch64", "1.0", "GiB", "-", "-", *last_seen]


NOW = 1_796_284_800.0  # 2026-12-03 08:00:00 UTC


def test_devices_text_shows_every_bundle_the_broker_and_online_only_when_confirmed() -> None:
    bundles = (BundleRef("beta", 10), BundleRef("alpha", 2))
    here = DeviceRecord("dev-1", "online", NOW - 12, active_bundles=bundles, broker="mqtt://here:1883")
    gone = DeviceRecord("dev-1", "online", NOW - 3 * 3600, broker="mqtt://gone:1883")
    stale = DeviceRecord("dev-2", "online", NOW - 200, broker="mqtt://here:1883")
    views = [DeviceView(here, True, "mqtt://here:1883"), DeviceView(gone, False, "mqtt://here:1883")]
    views.append(DeviceView(stale, False, "mqtt://here:1883"))
    lines = devices_text(views, NOW).splitlines()
    assert "online  " in lines[2] and "alpha v2, beta v10" in lines[2] and "mqtt://here:1883" in lines[2]
    assert "2026-12-03 07:59:48 UTC (12 s ago)" in lines[2]
    assert "online as of 3 h ago" in lines[3] and "mqtt://gone:1883" in lines[3]
    assert "online as of 3 min ago" in lines[4]
    assert "not confirmed now" in lines[-1]

    data = devices_data(views, NOW)
    assert data[0]["status"] == "online" and data[0]["status_confirmed"] is True
    assert data[0]["active_bundles"] == [{"name": "alpha", "version": 2}, {"name": "beta", "version": 10}]
    assert data[0]["last_seen_text"] == "2026-12-03 07:59:48 UTC (12 s ago)"
    assert data[1]["status"] == "unknown" and data[1]["last_status"] == "online"
    assert data[1]["broker"] == "mqtt://gone:1883" and data[1]["active_bundles"] is None


def test_seen_text_for_people() -> None:
    assert seen_text(NOW, NOW + 2) == "2026-12-03 08:00:00 UTC (just now)"
    assert seen_text(NOW, NOW + 2 * 86400 + 5) == "2026-12-03 08:00:00 UTC (2 days ago)"
    assert seen_text(NOW, NOW - 60).endswith("(in the future (clock skew))")


def test_forget_text_says_what_was_deleted_and_cleared() -> None:
    result = ForgetResult("dev-1", ("", "mqtt://a:1883"), devices=2, deployments=3, metrics=4)
    text = forget_text(result, "mqtt://a:1883")
    assert text.startswith("forgot dev-1: deleted 2 device row(s), 3 deployment(s) and 4 metrics report(s)")
    assert "cleared its retained status and metrics on mqtt://a:1883" in text
    assert "an unknown broker, mqtt://a:1883" in text


def test_power_and_cpu_with_too_little_data_show_no_number() -> None:
    short = PowerMeasurement(
        joules=None, seconds=0.004, watts=None, source="estimate:generic", estimated=True,
        joules_per_inference=None, insufficient_data="the estimate needs the CPU share",
    )  # fmt: skip
    assert power_cell(short) == "n/a (too short)"
    report = _metrics(short)
    assert "n/a (too short)" in metrics_table([report])
    assert MetricsReport.from_dict(report.to_dict()).power == short


def test_deploy_data_and_text_installed() -> None:
    outcome = _deploy(metrics=_metrics(), checks=("signature: ok",), seconds=2.25, detail={"x": 1})
    data = deploy_data(outcome)
    assert data == {
        "device_id": "dev-1",
        "bundle": "digits",
        "version": 2,
        "state": "installed",
        "seconds": 2.25,
        "error": None,
        "metrics": _metrics().to_dict(),
        "checks": ["signature: ok"],
        "detail": {"x": 1},
        "delivery": None,
    }
    assert {k: data[k] for k in outcome_data(outcome)} == outcome_data(outcome)
    text = deploy_text(outcome)
    assert text.startswith("dev-1: installed digits v2 in 2.2 s\ndevice ")
    assert text.endswith(metrics_table([_metrics()]))


def test_deploy_text_deferred_names_reason_and_retry() -> None:
    text = deploy_text(_deploy("deferred", detail={"reason": "in flight", "retry_s": 30}))
    assert text == (
        "dev-1: deferred digits v2 (in flight); the device keeps it and installs it when its gate opens "
        "(asks again every 30 s)"
    )
    assert "(update gate closed)" in deploy_text(_deploy("deferred"))


def test_refusal_and_profile_text() -> None:
    refused = ProfileOutcome("dev-1", "digits", 2, "refused", error=RollbackError("old"))
    assert refusal_text(refused) == "dev-1 refused digits v2"
    assert outcome_data(refused)["error"] == RollbackError("old").to_dict()
    profiled = ProfileOutcome("dev-1", "digits", 2, "profiled", metrics=_metrics())
    assert profile_text(profiled).splitlines()[0] == "dev-1: profiled digits v2 (not installed)"


def test_command_data_and_text() -> None:
    done = Event("dev-1", EventKind.DONE, 1.0, detail={"active": "digits v1"})
    assert command_text("dev-1", done, "remove digits") == "dev-1: remove digits: done (active digits v1)"
    removed = Event("dev-1", EventKind.DONE, 1.0, detail={"action": "remove", "name": "digits", "removed": 2})
    assert command_text("dev-1", removed, "remove digits") == "dev-1: remove digits: done (v2 removed)"
    back = Event("dev-1", EventKind.DONE, 1.0, detail={"action": "rollback", "name": "digits", "version": 1})
    assert command_text("dev-1", back, "roll digits back to v1") == "dev-1: roll digits back to v1: done (now runs v1)"
    for event in (done, removed, back):
        assert "{" not in command_text("dev-1", event, "x")  # never a Python dict
    assert command_data("dev-1", done) == {
        "device_id": "dev-1",
        "state": "done",
        "detail": {"active": "digits v1"},
        "error": None,
    }
    error = ErrorInfo("rollback", "nothing kept")
    refused = Event("dev-1", EventKind.REFUSED, 1.0, error=error)
    assert command_text("dev-1", refused, "roll digits back to v1") == "dev-1 refused: roll digits back to v1"
    assert command_data("dev-1", refused)["error"] == error.to_dict()


def test_demo_table_notes_size_ratio_and_estimated_power() -> None:
    power = _power(1.0, joules_per_inference=0.002, source="cpu model")
    rows = (
        DemoRow("digits-v1-fp32", "fp32", 4096, 0.97, _metrics(power, peak_bytes=1 << 20)),
        DemoRow("digits-v2-int8", "int8", 1024, 0.965, _metrics(power, peak_bytes=1 << 20)),
    )
    table = demo_table(rows)
    lines = table.splitlines()
    assert lines[2].split()[:5] == ["fp32", "4.0", "KiB", "97.00%", "1.250"]
    assert lines[-3:] == [
        "* int8 is 4.00x smaller than fp32",
        "* power is ESTIMATED from CPU use (cpu model); no power sensor on this machine",
        "* latency, memory and power were measured by the device agent in its own process",
    ]
    assert lines[2].split()[-1] == "2.000"  # mJ per inference
    result = DemoResult(rows, 12.34)
    assert demo_text(result) == table + "\n\nwhole path in 12.3 s"
    assert result.to_dict() == {"rows": [r.to_dict() for r in rows], "seconds": 12.34}


def test_devices_text_shows_drops_and_pending_and_never_fails_on_a_time() -> None:
    from host_tools.fleet.inventory import DeviceView
    from host_tools.report.fleet import devices_data, local_time

    view = DeviceView(DeviceRecord("dev-1", "online", 0.0, broker="mqtt://b:1883"), True, "mqtt://b:1883")
    drops = {"dev-1": {"bad_signature": 2, "replayed": 1}, "*": {"unsigned": 7}}
    lines = devices_text([view], 10.0, drops, pending=3).splitlines()
    assert lines[0].split()[-1] == "dropped" and lines[2].endswith("bad_signature 2, replayed 1")
    assert lines[3] == "dropped from unknown devices: unsigned 7"
    assert lines[4] == "3 device(s) wait for enrolment: edgectl devices enroll"
    assert devices_data([view], 10.0, drops)[0]["dropped"] == {"bad_signature": 2, "replayed": 1}
    assert devices_data([view], 10.0)[0]["dropped"] == {}
    for t in (1e300, float("inf"), float("nan"), -5.0, 4_200_000_000.0, "x", None):
        assert local_time(t) == "?"
    assert local_time(0.0) == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(0.0))


def test_enrolments_text_shows_each_keys_fingerprint() -> None:
    from edge_sdk.trust import SigningKey, fingerprint
    from host_tools.fleet.registry import EnrolmentRecord
    from host_tools.report.fleet import enrolments_text

    key = SigningKey.generate().public_key
    record = EnrolmentRecord("dev-9", key.raw.hex(), "pending", 0.0)
    lines = enrolments_text([record], "none").splitlines()
    assert lines[2].split()[:3] == ["dev-9", "pending", fingerprint(key)]
    assert enrolments_text([], "none") == "none"
