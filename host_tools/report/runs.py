"""Kept runs as tables: ``edgectl runs`` and ``edgectl compare A B``.

:func:`run_facts` reads the figures worth comparing out of a run's stored results (size,
quality, host latency for a compression; latency percentiles per device for a profile,
deploy or rollout); :func:`compare_runs` lines two runs up, figure by figure, with the
difference. Both are pure: records in, plain data out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from host_tools.fleet.registry import RunRecord
from host_tools.report.table import Column, format_bytes, format_time, render_table

__all__ = ["compare_runs", "compare_text", "run_facts", "runs_data", "runs_text"]

#: Latency percentiles compared per device, as a metrics report names them.
PERCENTILES = ("p50_ms", "p90_ms", "p99_ms")


def _final_model(results: Mapping[str, Any]) -> Mapping[str, Any]:
    report = results.get("report")
    final = report.get("final") if isinstance(report, Mapping) else None
    return final if isinstance(final, Mapping) else {}


def _outcomes(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    outcomes = results.get("outcomes")
    return [o for o in outcomes if isinstance(o, Mapping)] if isinstance(outcomes, list) else []


def run_facts(run: RunRecord) -> dict[str, Any]:
    """The figures of a run that ``compare`` lines up, by name.

    Returns:
        ``size_bytes``, ``quality``, ``quality_metric``, ``host_p50_ms`` and ``sha256`` for a
        compression (of its output model); ``sha256`` of the bundle and ``devices``
        (device id -> state and the latency percentiles of its report) for the others.
        Figures a run did not measure are absent.
    """
    facts: dict[str, Any] = {}
    params, results = run.parameters, run.results
    if run.kind == "compress":
        final = _final_model(results)
        for name, key in (("size_bytes", "size_bytes"), ("quality", "quality"), ("host_p50_ms", "latency_p50_ms")):
            if isinstance(final.get(key), (int, float)):
                facts[name] = final[key]
        if final.get("quality_metric"):
            facts["quality_metric"] = final["quality_metric"]
        output = params.get("output")
        if isinstance(output, Mapping) and "sha256" in output:
            facts["sha256"] = output["sha256"]
        return facts
    bundle = params.get("bundle")
    if isinstance(bundle, Mapping):
        facts["sha256"] = bundle.get("sha256")
        facts["size_bytes"] = bundle.get("size_bytes")
    devices: dict[str, dict[str, Any]] = {}
    for outcome in _outcomes(results):
        device: dict[str, Any] = {"state": outcome.get("state")}
        metrics = outcome.get("metrics")
        latency = metrics.get("latency") if isinstance(metrics, Mapping) else None
        if isinstance(latency, Mapping):
            device.update({p: latency[p] for p in PERCENTILES if isinstance(latency.get(p), (int, float))})
        devices[str(outcome.get("device_id"))] = device
    facts["devices"] = devices
    return {k: v for k, v in facts.items() if v is not None}


def _row(figure: str, a: Any, b: Any) -> dict[str, Any]:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    change = b - a if numbers else None
    ratio = b / a if numbers and a else None
    return {"figure": figure, "a": a, "b": b, "change": change, "ratio": ratio, "same": a == b}


def compare_runs(a: RunRecord, b: RunRecord) -> dict[str, Any]:
    """Two runs side by side: every figure either has, with the change from A to B.

    Returns:
        ``{"a": {id, kind, started_at}, "b": ..., "rows": [...]}``; each row has ``figure``
        (``size_bytes``, ``quality``, ``latency p99_ms pi-01``...), ``a`` and ``b`` (``None``
        where that run lacks it), ``change`` (B minus A) and ``ratio`` (B over A) where both
        are numbers, and ``same``.
    """
    fa, fb = run_facts(a), run_facts(b)
    rows = [
        _row(name, fa.get(name), fb.get(name))
        for name in ("sha256", "size_bytes", "quality", "quality_metric", "host_p50_ms")
        if name in fa or name in fb
    ]
    da: Mapping[str, Mapping[str, Any]] = fa.get("devices", {})
    db: Mapping[str, Mapping[str, Any]] = fb.get("devices", {})
    for device in sorted(set(da) | set(db)):
        rows.append(_row(f"state {device}", da.get(device, {}).get("state"), db.get(device, {}).get("state")))
        for p in PERCENTILES:
            va, vb = da.get(device, {}).get(p), db.get(device, {}).get(p)
            if va is not None or vb is not None:
                rows.append(_row(f"latency {p} {device}", va, vb))
    head = {"id", "kind", "started_at"}
    return {
        "a": {k: v for k, v in a.to_dict().items() if k in head},
        "b": {k: v for k, v in b.to_dict().items() if k in head},
        "rows": rows,
    }


def _cell(figure: str, value: Any) -> str | None:
    if value is None:
        return None
    if figure == "size_bytes" and isinstance(value, (int, float)):
        return format_bytes(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def compare_text(comparison: Mapping[str, Any]) -> str:
    """``edgectl compare``: one row per figure, A, B, the change and the ratio."""
    a, b = comparison["a"], comparison["b"]
    head = f"A: run {a['id']} ({a['kind']}, {format_time(a['started_at'])})\n"
    head += f"B: run {b['id']} ({b['kind']}, {format_time(b['started_at'])})\n"
    table = render_table(
        [
            Column("figure", lambda r: r["figure"]),
            Column("A", lambda r: _cell(r["figure"], r["a"]), ">"),
            Column("B", lambda r: _cell(r["figure"], r["b"]), ">"),
            Column("B-A", lambda r: None if r["change"] is None else f"{r['change']:+.4g}", ">"),
            Column("B/A", lambda r: None if r["ratio"] is None else f"{r['ratio']:.3f}x", ">"),
        ],
        comparison["rows"],
    )
    return head + table


def _summary(run: RunRecord) -> str:
    facts = run_facts(run)
    if run.kind == "compress":
        parts = [format_bytes(facts.get("size_bytes"))]
        if "quality" in facts:
            parts.append(f"{facts.get('quality_metric', 'quality')} {facts['quality']:.4f}")
        return ", ".join(parts)
    devices = facts.get("devices", {})
    states: dict[str, int] = {}
    for d in devices.values():
        state = d.get("state")
        # An outcome kept without a state (an older record, a device that never answered) is
        # counted as such, not as the word "None".
        name = state if isinstance(state, str) and state else "no state"
        states[name] = states.get(name, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no device"


def _subject(run: RunRecord) -> str | None:
    for key in ("model", "bundle"):
        item = run.parameters.get(key)
        if isinstance(item, Mapping) and item.get("path"):
            return str(item["path"]).rsplit("/", 1)[-1]
    name = run.parameters.get("bundle_name")
    return None if name is None else str(name)


def runs_data(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """``edgectl runs --json``: every run whole."""
    return [r.to_dict() for r in runs]


def runs_text(runs: Sequence[RunRecord]) -> str:
    """``edgectl runs``: one row per run, newest first."""
    if not runs:
        return "no runs kept yet (compress, profile, deploy and rollout keep one each)"
    return render_table(
        [
            Column("id", lambda r: r.id, ">"),
            Column("kind", lambda r: r.kind),
            Column("time", lambda r: format_time(r.started_at)),
            Column("subject", _subject),
            Column("result", _summary),
        ],
        runs,
    )
