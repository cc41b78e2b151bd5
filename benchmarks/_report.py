"""Shared output for benchmarks: one table with the ratio to the baseline, and a JSON file.

Every benchmark measures our code and its baseline side by side in the same run, prints
a table, and writes ``benchmarks/results/<name>.json`` (or ``--json-out PATH``) with the
rows, the machine, and the command line, so ``docs/benchmarks.md`` can quote both.
Side-by-side timings go through :func:`alternating_p50`, so both sides share the host's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_sdk.metrics import benchmark_interleaved

__all__ = [
    "EDGECTL",
    "REPO_ROOT",
    "add_common_args",
    "alternating_p50",
    "checkout_env",
    "cpu_info",
    "machine_info",
    "print_table",
    "write_results",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: The checkout these benchmarks belong to.
REPO_ROOT = Path(__file__).resolve().parents[1]
#: `edgectl` of this checkout: the console script in a copied virtualenv may run another
#: checkout's code (its shebang names that virtualenv's interpreter).
EDGECTL = (sys.executable, "-m", "host_tools")


def checkout_env(env: dict[str, str], pycache: Path | None = None) -> dict[str, str]:
    """``env`` for a child that runs this checkout's code (``PYTHONPATH``).

    Args:
        env: the environment to extend.
        pycache: where the child may write byte code (``PYTHONPYCACHEPREFIX``), so that its
            start-up is measured as an installed package's, not with every module compiled.
    """
    out = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")])))
    if pycache is not None:
        out.pop("PYTHONDONTWRITEBYTECODE", None)
        out["PYTHONPYCACHEPREFIX"] = str(pycache)
    return out


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--json-out`` and ``--quick`` (a smaller run for smoke tests)."""
    parser.add_argument("--json-out", type=Path, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")


#: CPU features that change int8 and float kernel choices in onnxruntime and XNNPACK.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "sve")


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """CPU model and the kernel-relevant ISA flags, from ``/proc/cpuinfo`` (Linux)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return {"model": None, "flags": []}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"model": fields.get("model name") or fields.get("Model"), "flags": [f for f in KERNEL_FLAGS if f in flags]}


def processes_cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far, together."""
    import psutil

    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def alternating_p50(calls: Sequence[Callable[[], object]], runs: int, rounds: int = 5) -> list[float]:
    """p50 ms of each call, timed in alternating rounds (median of the rounds' medians),
    so that other load on the host slows them alike."""
    stats = benchmark_interleaved(
        {str(i): call for i, call in enumerate(calls)}, rounds=rounds, runs_per_round=max(10, runs // rounds), warmup=5
    )
    return [statistics.median(s.p50_ms for s in per_round) for per_round in stats.values()]


def machine_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu": cpu_info(),
        "cores": os.cpu_count(),
        "system": platform.platform(),
    }


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print an aligned table to stdout (benchmarks are programs; printing is their job)."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(
            "  ".join(v.rjust(w) if n and i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths, strict=False)))
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def write_results(name: str, results: dict[str, Any], json_out: Path | None = None) -> Path:
    """Write results with machine info and the command line; returns the path."""
    path = json_out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(),
        **results,
    }
    path.write_text(json.dumps(body, indent=2, sort_keys=True, default=str))
    return path
