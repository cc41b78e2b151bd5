"""The report's plots, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Each ``plot_*`` function takes values from :mod:`host_tools.report.data` and returns a
:class:`Plot`: the figure and the data it drew (series counts, Pareto points, measured and
estimated counts), so tests check what was drawn, not pixels. :func:`png_bytes` renders a
figure. matplotlib is imported here only, when a plot is drawn.

Large fleets stay readable and fast: the latency distribution is pooled per model version,
and drawn per device for the devices with the highest p99 only (at most ``max_devices``);
energy is one point per (device, version), sorted.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from host_tools.report.data import CompressionVariant, EnergyPoint, LatencySeries, TimelineEvent

__all__ = ["Plot", "pareto_front", "plot_energy", "plot_latency", "plot_pareto", "plot_timeline", "png_bytes"]

#: Timeline rows, top to bottom.
TIMELINE_KINDS = ("wave", "success", "deferral", "failure", "rollback")
_TIMELINE_COLOURS = {
    "wave": "#4c72b0",
    "success": "#55a868",
    "deferral": "#dd8452",
    "failure": "#c44e52",
    "rollback": "#8172b3",
}
_DPI = 90


@dataclass
class Plot:
    """A drawn plot.

    Args:
        name: file stem for ``--png`` (``latency``, ``pareto``...).
        title: a heading for the report.
        figure: the matplotlib figure.
        data: what was drawn, for tests and for the report's captions.
    """

    name: str
    title: str
    figure: Any
    data: dict[str, Any] = field(default_factory=dict)


def _figure(width: float, height: float, bottom: float = 0.12, hspace: float = 0.2) -> Any:
    """A figure with fixed margins: a layout engine would lay every figure out again on each draw (half the time)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    fig.subplots_adjust(left=0.07, right=0.97, top=0.93, bottom=bottom, hspace=hspace)
    return fig


def png_bytes(plot: Plot) -> bytes:
    """The plot as a PNG file's bytes."""
    buf = io.BytesIO()
    plot.figure.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_latency(series: Sequence[LatencySeries], max_devices: int = 24) -> Plot:
    """Latency distribution per model version (pooled over devices) and per device and version.

    Args:
        series: one per (device, model version).
        max_devices: devices drawn one by one: those with the highest p99.

    Returns:
        The plot; ``data``: ``versions`` (model labels drawn), ``series`` (how many were given),
        ``devices_total``, ``devices_shown`` (their ids), ``boxes`` (per-device boxes drawn),
        ``from_percentiles`` (series drawn from percentiles only).
    """
    fig = _figure(11, 8.5, bottom=0.2, hspace=0.55)
    top, bottom = fig.subplots(2, 1)
    models = sorted({s.model for s in series}, key=lambda m: (m.rsplit(" v", 1)[0], int(m.rsplit(" v", 1)[1])))
    devices = sorted({s.device_id for s in series})
    worst: dict[str, float] = {}
    for s in series:
        worst[s.device_id] = max(worst.get(s.device_id, 0.0), s.quantiles_ms.get(0.99, 0.0))
    shown = sorted(sorted(worst, key=lambda d: (-worst[d], d))[:max_devices])
    data: dict[str, Any] = {
        "versions": models,
        "series": len(series),
        "devices_total": len(devices),
        "devices_shown": shown,
        "boxes": 0,
        "from_percentiles": sum(s.from_percentiles for s in series),
    }
    if not series:
        _empty(top, "no latency reports in this period")
        _empty(bottom, "")
        return Plot("latency", "Latency distribution per device and model version", fig, data)
    pooled: dict[str, list[float]] = {m: [] for m in models}
    for s in series:
        pooled[s.model].extend(s.samples_ms)
    parts = top.violin([_violin_stats(pooled[m]) for m in models], widths=0.8, showmedians=True)
    for body in parts["bodies"]:
        body.set_alpha(0.5)
    top.set_xticks(range(1, len(models) + 1), models, rotation=30, ha="right", fontsize=8)
    top.set_ylabel("latency (ms)")
    top.set_title(f"all devices, per model version ({len(devices)} devices, {len(series)} reports)", fontsize=10)
    boxes: list[Sequence[float]] = []
    labels: list[str] = []
    colours: list[str] = []
    palette = [f"C{i}" for i in range(10)]
    order = {m: i for i, m in enumerate(models)}
    by_device: dict[str, list[LatencySeries]] = {}
    for s in series:
        by_device.setdefault(s.device_id, []).append(s)
    groups: list[tuple[str, float]] = []  # (device, centre of its boxes), to label a crowded axis by device
    for d in shown:
        first = len(boxes) + 1
        for s in sorted(by_device.get(d, ()), key=lambda s: order[s.model]):
            boxes.append(s.samples_ms)
            labels.append(f"{d} {s.model}")
            colours.append(palette[order[s.model] % len(palette)])
        groups.append((d, (first + len(boxes)) / 2))
    _boxes(bottom, boxes, colours)
    if len(boxes) <= 60:
        bottom.set_xticks(range(1, len(boxes) + 1), labels, rotation=90, fontsize=6)
    else:  # one label per device: a label per box would be unreadable (and slow to lay out)
        bottom.set_xticks([c for _, c in groups], [d for d, _ in groups], rotation=90, fontsize=6)
    bottom.set_xlim(0.3, len(boxes) + 0.7)
    bottom.set_ylabel("latency (ms)")
    bottom.set_title(
        f"per device and version: {len(shown)} of {len(devices)} devices (highest p99), whiskers p1-p99", fontsize=10
    )
    data["boxes"] = len(boxes)
    return Plot("latency", "Latency distribution per device and model version", fig, data)


def _boxes(ax: Any, boxes: Sequence[Sequence[float]], colours: Sequence[str], width: float = 0.7) -> None:
    """Box plots (quartiles, median, whiskers p1-p99, no fliers) drawn as three collections.

    :meth:`Axes.boxplot` makes five line artists and a patch per box: 1,200 artists for 240
    boxes, which cost seconds to build and draw; the same figure as collections costs
    milliseconds.
    """
    import numpy as np
    from matplotlib.collections import LineCollection, PolyCollection

    if not boxes:
        return
    stats = np.array([np.percentile(np.asarray(b, dtype=np.float64), (1, 25, 50, 75, 99)) for b in boxes])
    xs = np.arange(1, len(boxes) + 1, dtype=np.float64)
    half, cap = width / 2, width / 4
    p1, q1, med, q3, p99 = stats.T
    rects = np.stack(
        [np.column_stack([xs - half, q1]), np.column_stack([xs + half, q1]),
         np.column_stack([xs + half, q3]), np.column_stack([xs - half, q3])], axis=1,
    )  # fmt: skip
    ax.add_collection(PolyCollection(list(rects), facecolors=colours, edgecolors="black", linewidths=0.6, alpha=0.6))
    whiskers = [((x, lo), (x, hi)) for x, lo, hi in zip(xs, p1, q1, strict=True)]
    whiskers += [((x, lo), (x, hi)) for x, lo, hi in zip(xs, q3, p99, strict=True)]
    whiskers += [((x - cap, y), (x + cap, y)) for x, y in zip(xs, p1, strict=True)]
    whiskers += [((x - cap, y), (x + cap, y)) for x, y in zip(xs, p99, strict=True)]
    ax.add_collection(LineCollection(whiskers, colors="black", linewidths=0.6))
    medians = [((x - half, y), (x + half, y)) for x, y in zip(xs, med, strict=True)]
    ax.add_collection(LineCollection(medians, colors="#d62728", linewidths=1.0))
    ax.update_datalim(np.column_stack([np.concatenate([xs, xs]), np.concatenate([p1, p99])]))
    ax.autoscale_view()


def _violin_stats(samples: Sequence[float], points: int = 80) -> dict[str, Any]:
    """What :meth:`Axes.violin` draws, from a histogram: a kernel density over 600,000 pooled
    samples costs seconds; a histogram of the same samples, lightly smoothed, costs milliseconds."""
    import numpy as np

    data = np.asarray(samples, dtype=np.float64)
    low, high = float(data.min()), float(np.percentile(data, 99.5))
    high = max(high, low + 1e-9)
    counts, edges = np.histogram(data, bins=points, range=(low, high))
    smooth = np.convolve(counts, np.array([0.25, 0.5, 0.25]), mode="same")
    return {
        "coords": (edges[:-1] + edges[1:]) / 2,
        "vals": smooth / max(float(smooth.max()), 1e-12),
        "mean": float(data.mean()),
        "median": float(np.median(data)),
        "min": low,
        "max": high,
    }


def pareto_front(variants: Sequence[CompressionVariant]) -> list[CompressionVariant]:
    """The variants no other beats on every axis: smaller, more accurate and (where all have it) faster.

    Variants without a quality figure take no part. Latency counts only when every ranked
    variant has one (on-device where measured, else on the host for all of them).
    """
    ranked = [v for v in variants if v.quality is not None]
    device = all(v.device_p50_ms is not None for v in ranked)
    host = all(v.host_p50_ms is not None for v in ranked)

    def axes(v: CompressionVariant) -> tuple[float, ...]:
        latency: tuple[float, ...] = ()
        if device:
            latency = (float(v.device_p50_ms or 0.0),)
        elif host:
            latency = (float(v.host_p50_ms or 0.0),)
        return (float(v.size_bytes), -float(v.quality or 0.0), *latency)

    points = [(v, axes(v)) for v in ranked]
    front = [
        v for v, a in points if not any(all(x <= y for x, y in zip(b, a, strict=True)) and b != a for _, b in points)
    ]
    return sorted(front, key=lambda v: (v.size_bytes, v.run_id))


def plot_pareto(variants: Sequence[CompressionVariant]) -> Plot:
    """Accuracy vs size, coloured by on-device latency (host latency where no device measured it).

    Returns:
        The plot; ``data``: ``points`` (variants drawn), ``pareto`` (run ids on the front, by
        size), ``latency`` (``device``, ``host`` or ``none``: what the colour shows), ``unranked``
        (variants without a quality figure, drawn on the x axis).
    """
    fig = _figure(9, 5.5)
    ax = fig.subplots()
    ranked = [v for v in variants if v.quality is not None]
    front = pareto_front(variants)
    device = bool(ranked) and all(v.device_p50_ms is not None for v in ranked)
    host = bool(ranked) and all(v.host_p50_ms is not None for v in ranked)
    source = "device" if device else "host" if host else "none"
    data: dict[str, Any] = {
        "points": len(ranked),
        "pareto": [v.run_id for v in front],
        "latency": source,
        "unranked": len(variants) - len(ranked),
    }
    if not ranked:
        _empty(ax, "no compression run with a quality figure kept yet (edgectl compress --eval ...)")
        return Plot("pareto", "Compression variants: accuracy vs size vs latency", fig, data)
    xs = [v.size_bytes / 1024 for v in ranked]
    ys = [float(v.quality or 0.0) for v in ranked]
    if source == "none":
        ax.scatter(xs, ys, s=40, color="C0", label="variant")
    else:
        cs = [float((v.device_p50_ms if device else v.host_p50_ms) or 0.0) for v in ranked]
        sc = ax.scatter(xs, ys, c=cs, cmap="viridis", s=40, label="variant")
        fig.colorbar(sc, ax=ax, label=f"p50 latency on {'device' if device else 'host'} (ms)")
    fx = [v.size_bytes / 1024 for v in front]
    fy = [float(v.quality or 0.0) for v in front]
    ax.plot(fx, fy, color="#c44e52", linewidth=1.2, zorder=1)
    ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="#c44e52", linewidths=1.8, label="Pareto front", zorder=3)
    for v in front:
        ax.annotate(f"run {v.run_id}", (v.size_bytes / 1024, float(v.quality or 0.0)), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    if len({round(x, 6) for x in xs}) > 1 and max(xs) / max(min(xs), 1e-9) > 20:
        ax.set_xscale("log")
    metric = next((v.quality_metric for v in ranked if v.quality_metric), "quality")
    ax.set_xlabel("model size (KiB)")
    ax.set_ylabel(metric)
    ax.legend(loc="lower right", fontsize=8)
    return Plot("pareto", "Compression variants: accuracy vs size vs latency", fig, data)


def plot_energy(points: Sequence[EnergyPoint]) -> Plot:
    """Energy per inference per device and version; measured and estimated drawn with different markers.

    Returns:
        The plot; ``data``: ``measured`` and ``estimated`` (points of each), ``devices``.
    """
    fig = _figure(11, 4.5, bottom=0.2)
    ax = fig.subplots()
    measured = [p for p in points if not p.estimated]
    estimated = [p for p in points if p.estimated]
    data = {"measured": len(measured), "estimated": len(estimated), "devices": len({p.device_id for p in points})}
    if not points:
        _empty(ax, "no energy figures in this period")
        return Plot("energy", "Energy per inference per device", fig, data)
    order = sorted(points, key=lambda p: (p.joules_per_inference, p.device_id, p.bundle_name, p.version))
    index = {id(p): i for i, p in enumerate(order)}
    for group, marker, label, style in (
        (measured, "o", "measured (power sensor)", {"color": "#4c72b0"}),
        (estimated, "^", "estimated (power model, not measured)", {"facecolors": "none", "edgecolors": "#dd8452"}),
    ):
        if group:
            ax.scatter([index[id(p)] for p in group], [p.joules_per_inference * 1000 for p in group],
                       marker=marker, s=22, label=f"{label}: {len(group)}", **style)  # fmt: skip
    low = min(p.joules_per_inference for p in points)
    if low > 0 and max(p.joules_per_inference for p in points) / low > 50:
        ax.set_yscale("log")
    if len(order) <= 40:
        ax.set_xticks(range(len(order)), [f"{p.device_id} v{p.version}" for p in order], rotation=90, fontsize=6)
    else:
        ax.set_xlabel(f"{len(order)} device and version pairs, sorted by energy per inference")
    ax.set_ylabel("energy per inference (mJ)")
    ax.legend(loc="upper left", fontsize=8)
    return Plot("energy", "Energy per inference per device", fig, data)


def plot_timeline(events: Sequence[TimelineEvent], rollouts_known: bool) -> Plot:
    """Waves, successes, failures, deferrals and rollbacks over time, one row each.

    Returns:
        The plot; ``data``: ``events`` (kind -> count), ``rollouts_known``.
    """
    fig = _figure(11, 3.8, bottom=0.16)
    ax = fig.subplots()
    counts = {k: sum(e.kind == k for e in events) for k in TIMELINE_KINDS}
    data: dict[str, Any] = {"events": counts, "rollouts_known": rollouts_known}
    if not events:
        _empty(ax, "no rollout or deployment events in this period")
        return Plot("timeline", "Rollout timeline", fig, data)
    import datetime as dt

    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num

    rows = {k: len(TIMELINE_KINDS) - i for i, k in enumerate(TIMELINE_KINDS)}
    for kind in TIMELINE_KINDS:
        ts = [dt.datetime.fromtimestamp(e.at, tz=dt.timezone.utc) for e in events if e.kind == kind]
        if ts:
            days = date2num(ts)  # type: ignore[no-untyped-call]
            ax.scatter(days, [rows[kind]] * len(ts), marker="|", s=200, color=_TIMELINE_COLOURS[kind],
                       label=f"{kind}: {len(ts)}")  # fmt: skip
    locator = AutoDateLocator()  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    ax.set_yticks(list(rows.values()), list(rows))
    ax.set_ylim(0.3, len(TIMELINE_KINDS) + 0.7)
    ax.set_xlabel("time (UTC)")
    ax.legend(loc="upper left", fontsize=7, ncols=5)
    if not rollouts_known:
        ax.set_title("deployments only: this registry keeps no rollouts (waves, rollbacks)", fontsize=9)
    return Plot("timeline", "Rollout timeline", fig, data)
