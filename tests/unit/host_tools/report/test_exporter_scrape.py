"""edgectl exporter: scraped over HTTP on a loopback port, parsed, compared with the registry, checked by promtool."""

from __future__ import annotations

import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from report_fleet import T0, FleetSpec, fill_fleet

from host_tools.fleet.registry import open_registry
from host_tools.report.data import DeviceRow, FleetData, RolloutProgress
from host_tools.report.exporter import CONTENT_TYPE, FleetExporter, exposition, serve_exporter

SPEC = FleetSpec()


@contextmanager
def _serving(db: Path) -> Iterator[str]:
    """An exporter serving ``db`` on a free loopback port, in a thread; yields its /metrics URL."""
    stop, ready, urls = threading.Event(), threading.Event(), []

    def announce(url: str) -> None:
        urls.append(url)
        ready.set()

    server = threading.Thread(target=serve_exporter, args=(str(db), "127.0.0.1", 0, stop, 0.0, announce), daemon=True)
    server.start()
    try:
        assert ready.wait(30), "the exporter did not start"
        yield urls[0]
    finally:
        stop.set()
        server.join(timeout=10)


@pytest.fixture
def scrape(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The text of one scrape of an exporter serving a filled registry, and the registry's path."""
    db = tmp_path / "registry.db"
    with open_registry(db) as reg:
        fill_fleet(reg, SPEC)
    with _serving(db) as url:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == CONTENT_TYPE
            yield resp.read().decode("utf-8"), db


def _samples(text: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_scrape_values_equal_the_registry(scrape: tuple[str, Path]) -> None:
    text, db = scrape
    samples = _samples(text)
    with open_registry(db) as reg:
        devices = reg.list_devices()
        latest = {(m.device_id, m.bundle_name, m.bundle_version): m.report for m in reg.latest_metrics()}
        drops = reg.drop_counts()
    by_state = {s.labels["state"]: s.value for s in samples["edge_devices"]}
    assert by_state["online"] == sum(d.status == "online" for d in devices)
    assert by_state["offline"] == sum(d.status == "offline" for d in devices)
    installed = {(d.device_id, b.name, b.version) for d in devices for b in d.active_bundles or ()}
    info = {
        (s.labels["device"], s.labels["bundle"], int(s.labels["version"])) for s in samples["edge_device_bundle_info"]
    }
    assert info == installed

    quantiles = samples["edge_inference_latency_quantiles_seconds"]
    assert len(quantiles) == 3 * len(installed)
    for s in quantiles:
        report = latest[(s.labels["device"], s.labels["bundle"], int(s.labels["version"]))]
        assert report.latency is not None
        expected = {"0.5": report.latency.p50_ms, "0.9": report.latency.p90_ms, "0.99": report.latency.p99_ms}
        assert s.value == pytest.approx(expected[s.labels["quantile"]] / 1000)
    for s in samples["edge_inference_latency_seconds_count"]:
        report = latest[(s.labels["device"], s.labels["bundle"], int(s.labels["version"]))]
        assert report.latency is not None and s.value == report.latency.count
    buckets = [s for s in samples["edge_inference_latency_seconds_bucket"] if s.labels["le"] == "+Inf"]
    assert len(buckets) == len(installed)

    for s in samples["edge_energy_per_inference_joules"]:
        power = latest[(s.labels["device"], s.labels["bundle"], int(s.labels["version"]))].power
        assert power is not None and power.joules_per_inference == pytest.approx(s.value)
        assert s.labels["estimated"] == ("true" if power.estimated else "false")
    assert {s.labels["estimated"] for s in samples["edge_energy_per_inference_joules"]} == {"true", "false"}
    for s in samples["edge_model_memory_peak_bytes"]:
        memory = latest[(s.labels["device"], s.labels["bundle"], int(s.labels["version"]))].memory
        assert memory is not None and memory.peak_bytes == s.value

    dropped = {
        (s.labels["device"], s.labels["reason"]): s.value for s in samples["edge_collector_dropped_messages_total"]
    }
    assert dropped == {(d, r): n for d, reasons in drops.items() for r, n in reasons.items()}
    assert samples["edge_exporter_skipped_series_total"][0].value == 0


def test_promtool_accepts_the_scrape(scrape: tuple[str, Path]) -> None:
    text, _ = scrape
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (Debian package prometheus; make test installs it)"
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]


def test_promtool_is_a_real_check() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (Debian package prometheus; make test installs it)"
    bad = "# HELP x_total a counter\n# TYPE x_total gauge\nx_total 1\n"
    checked = subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True, text=True, timeout=60)
    assert checked.returncode != 0


def test_label_values_that_fail_their_check_are_left_out_and_counted() -> None:
    rows = (
        DeviceRow("pi-01", "", "online", {}, {"cnn": 2}, T0, None),
        DeviceRow('bad"id\n', "", "online", {}, {"cnn": 2}, T0, None),
        DeviceRow("pi-02", "", "stale", {}, {"Free Text!": 1}, T0, None),
    )
    rollouts = (
        RolloutProgress("r1", "cnn v2", {"succeeded": 3}),
        RolloutProgress("r2", 'cnn"} 1\nfake_metric 1', {"succeeded": 1}),
    )
    data = FleetData(
        T0, rows, (), (), (), False, (), drops={"pi-01": {"Bad Reason": 1, "replayed": 2}}, rollouts=rollouts
    )
    text = exposition(data).decode()
    samples = _samples(text)
    assert {s.labels["device"] for s in samples["edge_device_bundle_info"]} == {"pi-01"}
    assert {s.labels["state"]: s.value for s in samples["edge_devices"]}["stale"] == 1
    assert samples["edge_exporter_skipped_series_total"][0].value == 4
    assert [s.labels["reason"] for s in samples["edge_collector_dropped_messages_total"]] == ["replayed"]
    assert [s.labels["rollout"] for s in samples["edge_rollout_devices"]] == ["r1"]
    assert "fake_metric" not in text and 'bad"id' not in text


def test_cache_serves_repeated_scrapes_from_one_rendered_body() -> None:
    reads: list[int] = []
    now = [0.0]

    def read() -> FleetData:
        reads.append(1)
        return FleetData(T0, (), (), (), (), False, ())

    exporter = FleetExporter(read, cache_s=5.0, clock=lambda: now[0])
    first = exporter.body()
    assert exporter.body() is first  # the rendered body itself, not rendered again
    assert len(reads) == 1
    now[0] = 5.0
    exporter.body()
    assert len(reads) == 2


def test_a_scrape_is_fast_enough_for_a_thousand_devices() -> None:
    """The exposition of 1,000 devices (the benchmark's size) renders in well under the 200 ms scrape budget."""

    from host_tools.report.data import LatencySeries

    rows = tuple(DeviceRow(f"pi-{i:04d}", "", "online", {}, {"cnn": 3}, T0, 1.0) for i in range(1000))
    samples = tuple(0.1 + 0.01 * k for k in range(64))
    latency = tuple(
        LatencySeries(f"pi-{i:04d}", "cnn", 3, samples, False, 200, {0.5: 0.3, 0.9: 0.5, 0.99: 0.6}, T0, 0.35)
        for i in range(1000)
    )
    data = FleetData(T0, rows, latency, (), (), False, ())
    best = min(_timed(lambda: exposition(data)) for _ in range(3))
    lines = exposition(data).count(b"\n")
    assert lines > 25_000
    assert best < 0.5, f"{lines} lines took {best:.3f} s"  # ~30 ms idle; generous for a loaded 2-core host


def _timed(fn: Any) -> float:
    import time

    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_an_unchanged_sqlite_registry_serves_the_kept_body_and_a_write_renders_anew(tmp_path: Path) -> None:
    from host_tools.fleet.registry import DeviceRecord, change_token
    from host_tools.report.exporter import registry_reader

    db = tmp_path / "registry.db"
    with open_registry(db) as reg:
        fill_fleet(reg, FleetSpec(devices=3, versions=1))
    reads: list[int] = []
    read = registry_reader(str(db), clock=lambda: T0)

    def counted() -> FleetData:
        reads.append(1)
        return read()

    exporter = FleetExporter(counted, cache_s=0.0, changed=lambda: change_token(db))
    first = exporter.body()
    exporter.body()  # closing the first read's connection may checkpoint the log: one more read at most
    settled = len(reads)
    assert exporter.body() is exporter.body() and len(reads) == settled <= 2
    assert b'device="pi-9999"' not in first
    with open_registry(db) as reg:
        reg.upsert_device(DeviceRecord("pi-9999", "online", T0))
    assert b'edge_device_last_seen_timestamp_seconds{device="pi-9999"}' in exporter.body()
    assert len(reads) == settled + 1
    assert change_token("postgresql://db.example/edge") is None


def test_other_paths_are_404_and_a_registry_gone_bad_is_503_until_it_reads_again(tmp_path: Path) -> None:
    import urllib.error

    db = tmp_path / "registry.db"
    with open_registry(db) as reg:
        fill_fleet(reg, FleetSpec(devices=2, versions=1))
    with _serving(db) as url:
        base = url.removesuffix("/metrics")
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(base + "/nope", timeout=30)
        assert missing.value.code == 404
        missing.value.close()
        good = db.read_bytes()
        db.write_bytes(b"not a database" * 100)  # a write: the kept body is no longer current
        with pytest.raises(urllib.error.HTTPError) as broken:
            urllib.request.urlopen(url, timeout=30)
        assert broken.value.code == 503 and b"registry cannot be read" in broken.value.read()
        broken.value.close()
        db.write_bytes(good)
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200 and b'edge_device_bundle_info{device="pi-0000"' in resp.read()
