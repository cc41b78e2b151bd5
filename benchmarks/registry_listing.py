"""Listing 100,000 registered devices: `edgectl devices --json` beside a plain `SELECT *` into dicts.

The registry (SQLite, the default) is filled with ``--devices`` device rows as the collector
writes them: a status with platform, runtimes, an active bundle, labels and a heartbeat
interval, then a heartbeat; one device in a hundred also has an operator label. Three
things are timed in the same run, in alternating rounds:

- baseline: ``SELECT * FROM devices`` into one dict per row (sqlite3, nothing else);
- records: :func:`host_tools.fleet.inventory.list_devices` (keyset pages, each row checked
  into a record and a view, state and labels computed) with each device's JSON written
  as ``device_data`` + ``json.dumps`` write it (the path ``--json`` took before);
- rows: :func:`host_tools.fleet.inventory.list_device_rows` with
  :func:`host_tools.report.fleet.device_rows_json` (the same bytes, from the stored rows:
  what ``--json`` streams now);
- the command: ``edgectl devices --json`` of this checkout (``python -m host_tools``) as a
  separate process writing to a file, from start to exit (start-up, imports and printing
  included; its output is then parsed and counted, untimed): the goal is <= 2 s for
  100,000. It runs once untimed first, with byte code cached in a temporary directory, so
  start-up is an installed package's.

Each is reported in wall seconds and in CPU seconds (user + system, of this process, or of
the child for the command): on a shared host the CPU figure is the one that does not
depend on other load.

Usage::

    .venv/bin/python benchmarks/registry_listing.py [--devices 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import EDGECTL, add_common_args, checkout_env, print_table, write_results

from edge_sdk.protocol import DeviceStatus, Heartbeat
from host_tools.fleet.collector import record_message
from host_tools.fleet.inventory import list_device_rows, list_devices
from host_tools.fleet.registry import Registry, open_registry
from host_tools.report.fleet import device_data, device_rows_json

GOAL_S = 2.0
BROKER = "mqtt://127.0.0.1:1"


def _fill(registry: Registry, devices: int, now: float) -> None:
    """``devices`` rows as the collector writes them, in one transaction (filling is not what is timed)."""
    platform = {"kind": "raspberry-pi", "arch": "aarch64", "memory_bytes": 8 << 30, "cores": 4, "os": "linux"}
    runtimes = {"onnxruntime": "1.18.0", "litert": None}
    registry._conn.execute("BEGIN")  # one commit for the whole fill
    for i in range(devices):
        device_id = f"dev-{i:06d}"
        status = DeviceStatus(
            device_id,
            "online",
            now - 30,
            agent_version="0.9.0",
            platform=platform,
            runtimes=runtimes,
            active={"bundles": [{"name": "digits", "version": 1 + i % 3}]},
            labels={"site": f"depot-{i % 50}", "hw": "pi5" if i % 2 else "pi4"},
            heartbeat_s=60.0,
        )
        record_message(registry, status, now - 30, BROKER)
        record_message(registry, Heartbeat(device_id, now - 5, 60.0), now - 5, BROKER)
        if i % 100 == 0:
            registry.set_operator_labels(device_id, {"tier": "canary"}, at=now)
    registry._conn.execute("COMMIT")


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn: Callable[[], int]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, what ``fn`` returned)."""
    start, cpu = time.perf_counter(), _cpu_s()
    n = fn()
    return time.perf_counter() - start, _cpu_s() - cpu, n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100_000, help="registered devices")
    parser.add_argument("--rounds", type=int, default=3)
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.rounds = 2000, 1
    now = time.time()
    with tempfile.TemporaryDirectory(prefix="registry-listing-") as tmp:
        path = Path(tmp) / "registry.db"
        started = time.perf_counter()
        with open_registry(path) as reg:
            _fill(reg, args.devices, now)
        fill_s = time.perf_counter() - started

        def baseline() -> int:
            conn = sqlite3.connect(path)
            try:
                cursor = conn.execute("SELECT * FROM devices")
                names = [d[0] for d in cursor.description]
                rows: list[dict[str, Any]] = [dict(zip(names, row, strict=True)) for row in cursor]
            finally:
                conn.close()
            return len(rows)

        def records() -> int:
            out = io.StringIO()
            with open_registry(path) as reg:
                n = 0
                for view in list_devices(reg, time.time()):
                    out.write(json.dumps(device_data(view, now), default=str, ensure_ascii=True))
                    n += 1
            return n

        def rows() -> int:
            out = io.StringIO()
            with open_registry(path) as reg:
                n = 0
                for text in device_rows_json(list_device_rows(reg, time.time()), now):
                    out.write(text)
                    n += 1
            return n

        env = checkout_env({**os.environ, "EDGE_SDK_BROKER": ""}, pycache=Path(tmp) / "pycache")

        child_cpu: list[float] = []
        child_wall: list[float] = []
        listed = Path(tmp) / "listed.json"

        def command() -> int:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            with listed.open("wb") as out:
                subprocess.run(
                    [*EDGECTL, "--registry", str(path), "devices", "--json"], stdout=out, check=True, env=env
                )
            child_wall.append(time.perf_counter() - started)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            child_cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            return len(json.loads(listed.read_bytes()))  # checked complete; reading it back is not timed

        command()  # untimed: writes the byte code a real install has
        names = ("baseline", "records", "rows", "command")
        runs: dict[str, list[float]] = {k: [] for k in names}
        cpu: dict[str, list[float]] = {k: [] for k in names}
        for _ in range(args.rounds):  # alternating, so other load on the host slows all alike
            for name, fn in zip(names, (baseline, records, rows, command), strict=True):
                seconds, cpu_s, n = _timed(fn)
                if n != args.devices:
                    raise SystemExit(f"{name} listed {n} of {args.devices} devices")
                runs[name].append(child_wall[-1] if name == "command" else seconds)
                cpu[name].append(child_cpu[-1] if name == "command" else cpu_s)
    base, rec, row, cmd = (statistics.median(runs[k]) for k in names)
    base_cpu, rec_cpu, row_cpu, cmd_cpu = (statistics.median(cpu[k]) for k in names)
    labels = (
        "SELECT * into dicts (baseline)",
        "list_devices + device_data + json.dumps (before)",
        "list_device_rows + device_rows_json (now)",
        "edgectl devices --json (process)",
    )
    rows_out = [
        [label, f"{w:.3f}", f"{c:.3f}", f"{args.devices / w:,.0f}", f"{w / base:.2f}"]
        for label, w, c in zip(labels, (base, rec, row, cmd), (base_cpu, rec_cpu, row_cpu, cmd_cpu), strict=True)
    ]
    print(f"{args.devices:,} registered devices (SQLite), median of {args.rounds} alternating rounds")
    print(f"load average when done: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print_table(["listing", "wall s", "CPU s", "devices/s (wall)", "x baseline (wall)"], rows_out)
    met = cmd <= GOAL_S
    print(f"goal: edgectl devices --json complete in <= {GOAL_S:g} s (wall): {'met' if met else 'NOT met'}")
    out = write_results(
        "registry_listing",
        {
            "devices": args.devices,
            "rounds": args.rounds,
            "fill_s": fill_s,
            "baseline_select_s": base,
            "records_s": rec,
            "rows_s": row,
            "command_s": cmd,
            "records_ratio": rec / base,
            "rows_ratio": row / base,
            "command_ratio": cmd / base,
            "baseline_cpu_s": base_cpu,
            "records_cpu_s": rec_cpu,
            "rows_cpu_s": row_cpu,
            "command_cpu_s": cmd_cpu,
            "load_average": os.getloadavg(),
            "cpu_runs": cpu,
            "goal_s": GOAL_S,
            "goal_met": met,
            "runs": runs,
        },
        args.json_out,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
