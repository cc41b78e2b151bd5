"""edgectl report: plots checked from the data they drew, the page self-contained and opened in Chromium."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import visit
from click.testing import CliRunner
from report_fleet import T0, FleetSpec, device_id, fill_fleet

from edge_sdk.errors import ConfigError
from host_tools.cli import cli
from host_tools.fleet.registry import Registry, open_registry
from host_tools.report.data import CompressionVariant, parse_devices, parse_since, read_fleet
from host_tools.report.html import build_report, write_report
from host_tools.report.plots import pareto_front, plot_pareto

SPEC = FleetSpec()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with open_registry(tmp_path / "home" / "registry.db") as reg:
        fill_fleet(reg, SPEC)
        yield reg


def test_plots_draw_what_the_registry_holds(registry: Registry) -> None:
    report = build_report(registry, now=T0 + 7200)
    plots = {p.name: p.data for p in report.plots}
    reports = registry.latest_metrics()
    assert plots["latency"]["series"] == len(reports) == SPEC.devices * SPEC.versions
    assert plots["latency"]["versions"] == [f"{SPEC.bundle} v{v}" for v in range(1, SPEC.versions + 1)]
    assert plots["latency"]["from_percentiles"] == sum(
        1 for m in reports if m.report.latency is not None and m.report.latency.samples_ms is None
    )
    assert plots["latency"]["from_percentiles"] > 0
    estimated = sum(1 for m in reports if m.report.power is not None and m.report.power.estimated)
    assert plots["energy"] == {
        "measured": len(reports) - estimated, "estimated": estimated, "devices": SPEC.devices
    }  # fmt: skip
    deployments = registry.list_deployments(limit=10_000)
    assert plots["timeline"]["events"]["success"] == sum(d.state == "installed" for d in deployments)
    assert plots["timeline"]["events"]["failure"] == sum(d.state == "failed" for d in deployments)
    assert plots["timeline"]["rollouts_known"] is False
    assert plots["pareto"]["points"] == SPEC.variants
    # every variant is smaller and less accurate than the one before: all on the front
    assert sorted(plots["pareto"]["pareto"]) == [r.id for r in registry.list_runs(kind="compress")][::-1]


def test_pareto_front_leaves_out_dominated_variants() -> None:
    def v(run: int, size: int, quality: float | None, ms: float | None) -> CompressionVariant:
        return CompressionVariant(run, f"v{run}", size, quality, "accuracy", None, ms)

    variants = [
        v(1, 100, 0.99, 2.0),
        v(2, 50, 0.98, 1.0),
        v(3, 60, 0.97, 1.5),
        v(4, 40, 0.90, 3.0),
        v(5, 30, None, 0.5),
    ]
    front = pareto_front(variants)
    assert [x.run_id for x in front] == [4, 2, 1]  # 3 is beaten by 2 on size, quality and latency; 5 has no quality
    drawn = plot_pareto(variants).data
    assert drawn == {"points": 4, "pareto": [4, 2, 1], "latency": "device", "unranked": 1}


def test_devices_selector_and_since(registry: Registry) -> None:
    chosen = parse_devices(f"{device_id(1)},pi-001*")
    fleet = read_fleet(registry, T0 + 7200, devices=chosen)
    assert {d.device_id for d in fleet.devices} == {device_id(1), device_id(10), device_id(11)}
    assert {s.device_id for s in fleet.latency} == {device_id(1), device_id(10), device_id(11)}
    recent = read_fleet(registry, T0 + 7200, since=T0 + SPEC.versions * 600)
    assert {s.version for s in recent.latency} == {SPEC.versions}
    assert parse_since("2h", 10_000.0) == 10_000.0 - 7200
    assert parse_since("2026-12-01T00:00:00Z", 0) == 1_796_083_200.0
    with pytest.raises(ValueError, match="not a time"):
        parse_since("yesterday", 0)
    with pytest.raises(ConfigError, match="--devices term"):
        parse_devices("pi 01")


def test_report_is_self_contained_and_escapes_registry_text(registry: Registry, tmp_path: Path) -> None:
    report = build_report(registry, now=T0 + 7200, title="fleet <script>alert(1)</script>")
    page = report.html
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert not re.search(r"""(src|href)\s*=\s*(?!["']?data:)""", page)
    assert "@import" not in page and "url(" not in page
    assert page.count('src="data:image/png;base64,') == len(report.plots)
    written = write_report(report, tmp_path / "r.html", tmp_path / "png")
    assert sorted(p.name for p in written) == sorted([f"{p.name}.png" for p in report.plots] + ["r.html"])
    for plot in report.plots:
        assert (tmp_path / "png" / f"{plot.name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_opens_in_chromium_without_network(registry: Registry, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    report = build_report(registry, now=T0 + 7200)
    write_report(report, page, None)
    seen = visit(page, tmp_path, tmp_path / "report-screenshot.png")
    assert seen.requests == []
    assert seen.errors == []
    assert sorted(i[0] for i in seen.images) == sorted(f"plot-{p.name}" for p in report.plots)
    assert all(complete and width > 0 and height > 0 for _, complete, width, height in seen.images), seen.images
    assert seen.screenshot is not None and seen.screenshot.stat().st_size > 10_000
    print(f"screenshot kept at {seen.screenshot}")


def test_the_browser_check_sees_a_network_request_and_a_broken_image(tmp_path: Path) -> None:
    page = tmp_path / "leaky.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img id="remote" src="http://example.invalid/plot.png">'
        "<script>console.error('boom')</script></body></html>"
    )
    seen = visit(page, tmp_path, tmp_path / "leaky.png")
    assert seen.requests == ["http://example.invalid/plot.png"]
    assert seen.errors and any("boom" in e for e in seen.errors)
    assert seen.images == [("remote", True, 0, 0)]


def test_cli_report_writes_html_and_pngs(registry: Registry, tmp_path: Path) -> None:
    home = tmp_path / "home"
    runner = CliRunner()
    out = runner.invoke(
        cli, ["--home", str(home), "report", "--html", str(tmp_path / "a.html"), "--png", str(tmp_path / "p"),
              "--devices", "pi-000*", "--json"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["devices"] == 10 and len(data["written"]) == 5
    assert runner.invoke(cli, ["--home", str(home), "report"]).exit_code == 2
