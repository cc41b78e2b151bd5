"""How long `edgectl report` takes to build, and one exporter scrape, for a large fleet.

A real SQLite registry is filled with DEVICES devices x VERSIONS model versions (one metrics
report each, with kept latency samples, power and memory; deployments; compression runs), by
the same writer the tests use (tests/report_fleet.py). Then, alternating in rounds:

* report build: read the registry, draw the four plots, encode the PNGs, render the HTML
  (``build_report``); baseline: the same read rendered as a plain text fleet table;
* exporter scrape: one ``/metrics`` body from the registry (``FleetExporter.body``, cache
  off, so each scrape reads the registry and renders), and the same with the cache warm
  (the rendered body kept), and with the cache off but the registry unchanged (the body kept
  while the SQLite files show no write); baseline: reading the device table and printing it
  as JSON (``edgectl devices --json``'s work without the broker). Wall and CPU time both: on a
  shared host the CPU time shows the work apart from the wait for a core.

Targets: report <= 10 s for 1,000 devices x 10 versions; scrape <= 200 ms for 1,000 devices.

Filling 1,000 x 10 takes minutes, so the filled registry is kept between runs in
``$TMPDIR/edge-bench-report-build/<key>/registry.db``, keyed by the parameters, the registry's schema version and a
hash of the fleet writer (tests/report_fleet.py): a change to either fills anew. Each run
measures a fresh copy of the kept file. ``--refill`` ignores it.

    .venv/bin/python benchmarks/report_build.py [--devices 1000] [--versions 10] [--rounds 3] [--refill]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the packages, run from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/report_fleet.py: the fleet writer

from _report import add_common_args, print_table, write_results
from report_fleet import T0, FleetSpec, fill_fleet

from host_tools.fleet.registry import SCHEMA_VERSION, change_token, open_registry
from host_tools.report.data import read_fleet
from host_tools.report.exporter import FleetExporter, registry_reader
from host_tools.report.html import build_report
from host_tools.report.table import Column, render_table


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _timed_cpu(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of one call: on a shared host the CPU time shows the work apart from the wait."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def _filled_registry(devices: int, versions: int, refill: bool) -> tuple[Path, float | None]:
    """A registry file filled with ``devices`` x ``versions``, kept between runs.

    Returns:
        The kept file and the seconds filling took (``None`` when a kept one was reused).
    """
    root = Path(__file__).resolve().parents[1]
    code = hashlib.sha256()
    code.update((root / "tests" / "report_fleet.py").read_bytes())
    key = f"d{devices}-v{versions}-s{SCHEMA_VERSION}-{code.hexdigest()[:16]}"
    kept = Path(tempfile.gettempdir()) / "edge-bench-report-build" / key / "registry.db"
    if kept.exists() and not refill:
        print(f"reusing the registry kept in {kept}", file=sys.stderr)
        return kept, None
    kept.parent.mkdir(parents=True, exist_ok=True)
    partial = kept.with_name(f"registry.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    with open_registry(partial) as reg:
        fill_s = _timed(lambda: fill_fleet(reg, FleetSpec(devices=devices, versions=versions)))
    os.replace(partial, kept)  # only a complete fill is ever reused
    print(f"filled {devices} devices x {versions} versions in {fill_s:.1f} s; kept in {kept}", file=sys.stderr)
    return kept, fill_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--versions", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--refill", action="store_true", help="fill the registry anew, not reusing a kept one")
    add_common_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.devices, args.versions, args.rounds = 50, 3, 1
    kept, fill_s = _filled_registry(args.devices, args.versions, args.refill)
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "registry.db")
        shutil.copyfile(kept, db)
        with open_registry(db) as reg:

            def report() -> None:
                build_report(reg, T0 + 86400)

            def table() -> None:
                fleet = read_fleet(reg, T0 + 86400)
                render_table(
                    [Column("device", lambda r: r.device_id), Column("state", lambda r: r.state),
                     Column("versions", lambda r: r.versions), Column("p99", lambda r: r.p99_ms)],
                    fleet.devices,
                )  # fmt: skip

            def first() -> bytes:  # a fresh exporter: read, decode every report, render
                return FleetExporter(registry_reader(db), cache_s=0.0).body()

            # As after a write: keys, devices and what changed read again, all rendered; the reports
            # decoded by the last scrape kept (a write adds one report per device and version at most).
            cold = FleetExporter(registry_reader(db), cache_s=0.0)
            cold.body()
            unchanged = FleetExporter(registry_reader(db), cache_s=0.0, changed=lambda: change_token(db))
            warm = FleetExporter(registry_reader(db), cache_s=3600.0)
            warm.body()
            unchanged.body()
            unchanged.body()  # the first read's close may checkpoint the log; from here on it is unchanged
            size = len(cold.body())

            def devices_json() -> None:
                with open_registry(db) as r:
                    json.dumps([d.to_dict() for d in r.list_devices()])

            cases: dict[str, Callable[[], object]] = {
                "report": report, "table": table, "scrape_first": first, "scrape": cold.body,
                "scrape_unchanged": unchanged.body,
                "scrape_cached": warm.body, "devices_json": devices_json,
            }  # fmt: skip
            times: dict[str, list[float]] = {k: [] for k in cases}
            cpu: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(args.rounds):
                for name, fn in cases.items():
                    wall, used = _timed_cpu(fn)
                    times[name].append(wall)
                    cpu[name].append(used)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    rows = [
        ["report build (read, 4 plots, PNG, HTML)", f"{med['report']:.2f} s", "text fleet table",
         f"{med['table']:.2f} s", f"{med['report'] / med['table']:.1f}x", "<= 10 s", med["report"] <= 10.0],
    ]  # fmt: skip
    for name, what in (("scrape_first", "exporter's first scrape (read, decode all, render)"),
                       ("scrape", "exporter scrape after a registry write (read, render)"),
                       ("scrape_unchanged", "exporter scrape, registry unchanged"),
                       ("scrape_cached", "exporter scrape within --cache")):  # fmt: skip
        rows.append([
            what, f"{med[name] * 1000:.1f} ms", "devices as JSON", f"{med['devices_json'] * 1000:.0f} ms",
            f"{med[name] / med['devices_json']:.2f}x", "<= 200 ms", med[name] <= 0.2,
        ])  # fmt: skip
    for row, name in zip(rows, ("report", "scrape_first", "scrape", "scrape_unchanged", "scrape_cached"), strict=True):
        row.insert(2, f"{med_cpu[name] * 1000:.0f} ms")
    print(f"{args.devices} devices x {args.versions} versions; median of {args.rounds} rounds; scrape {size} bytes")
    print_table(["case", "ours", "ours CPU", "baseline", "baseline time", "ratio", "target", "met"], rows)
    path = write_results(
        "report_build",
        {"devices": args.devices, "versions": args.versions, "rounds": args.rounds, "fill_s": fill_s,
         "scrape_bytes": size, "seconds": times, "median_s": med, "cpu_seconds": cpu, "median_cpu_s": med_cpu,
         "rows": rows},
        args.json_out,
    )  # fmt: skip
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
