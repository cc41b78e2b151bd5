"""``edgectl report``: one self-contained HTML file, and each plot as a PNG.

The page needs nothing from outside: styles are inline, every plot is a PNG in a ``data:``
URI, and no script, font or link leaves the file. Every string from the registry (device
ids, labels, bundle names) is escaped with :func:`html.escape`.

:func:`build_report` reads the registry once (:func:`host_tools.report.data.read_fleet`),
draws the plots (:mod:`host_tools.report.plots`) and returns a :class:`Report`;
:func:`write_report` writes the HTML and the PNGs atomically.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_sdk.durable import atomic_write_bytes
from host_tools.fleet.registry import Registry
from host_tools.report.data import DeviceRow, FleetData, read_fleet
from host_tools.report.plots import Plot, plot_energy, plot_latency, plot_pareto, plot_timeline, png_bytes
from host_tools.report.table import format_time

__all__ = ["Report", "build_report", "render_html", "write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
.meta,.note{color:#555;font-size:.9em}.empty{color:#777;font-style:italic}
img{max-width:100%;height:auto;border:1px solid #eee}
table{border-collapse:collapse;font-size:.85em;width:100%}
th,td{border-bottom:1px solid #eee;padding:.25em .5em;text-align:left}th{background:#f6f6f6;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.online{color:#2a7a3b}.stale{color:#b26b00}.offline{color:#a33}
.counts span{margin-right:1.5em}
"""


@dataclass
class Report:
    """A built report: the data read, the plots drawn, and the page.

    Args:
        fleet: what was read.
        plots: the plots, in page order.
        pngs: each plot's PNG bytes, by plot name.
        html: the page.
    """

    fleet: FleetData
    plots: list[Plot]
    pngs: dict[str, bytes]
    html: str

    def to_dict(self) -> dict[str, Any]:
        """What ``edgectl report --json`` prints: counts and what each plot drew."""
        return {
            "generated_at": self.fleet.generated_at,
            "devices": len(self.fleet.devices),
            "latency_series": len(self.fleet.latency),
            "energy_points": len(self.fleet.energy),
            "timeline_events": len(self.fleet.timeline),
            "rollouts_known": self.fleet.rollouts_known,
            "compression_variants": len(self.fleet.variants),
            "notes": list(self.fleet.notes),
            "plots": {p.name: p.data for p in self.plots},
        }


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _img(plot: Plot, png: bytes) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return f'<img id="plot-{_e(plot.name)}" class="plot" alt="{_e(plot.title)}" src="{uri}">'


def _fleet_table(rows: Sequence[DeviceRow], drops: Mapping[str, Mapping[str, int]]) -> str:
    if not rows:
        return '<p class="empty">no device in the registry matches</p>'
    states: dict[str, int] = {}
    for r in rows:
        states[r.state] = states.get(r.state, 0) + 1
    counts = "".join(f'<span class="{_e(s)}">{_e(s)}: {n}</span>' for s, n in sorted(states.items()))
    head = "<tr><th>device</th><th>state</th><th>labels</th><th>versions</th><th>last seen</th><th>p99 ms</th>"
    head += "<th>dropped</th></tr>"
    body = []
    for r in rows:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(r.labels.items()))
        versions = ", ".join(f"{n} v{v}" for n, v in sorted(r.versions.items()))
        dropped = sum(drops.get(r.device_id, {}).values())
        p99 = "" if r.p99_ms is None else f"{r.p99_ms:.3f}"
        body.append(
            f'<tr><td>{_e(r.device_id)}</td><td class="{_e(r.state)}">{_e(r.state)}</td><td>{_e(labels)}</td>'
            f'<td>{_e(versions)}</td><td>{_e(format_time(r.last_seen))}</td><td class="num">{p99}</td>'
            f'<td class="num">{dropped or ""}</td></tr>'
        )
    return (
        f'<p class="counts">{counts}</p><table id="fleet"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'
    )


def _caption(plot: Plot) -> str:
    d = plot.data
    if plot.name == "latency":
        text = f"{d['series']} reports, {len(d['versions'])} model versions; {d['boxes']} per-device boxes"
        if d["from_percentiles"]:
            text += f"; {d['from_percentiles']} drawn from percentiles only (agents that sent no samples)"
        return text
    if plot.name == "pareto":
        front = ", ".join(map(str, d["pareto"])) or "-"
        return f"{d['points']} variants; Pareto front: runs {front}; colour: {d['latency']} latency"
    if plot.name == "energy":
        return f"{d['measured']} measured, {d['estimated']} estimated (a power model, hollow triangles)"
    if plot.name == "timeline":
        text = ", ".join(f"{k} {n}" for k, n in d["events"].items())
        return text if d["rollouts_known"] else text + "; rollouts are not kept by this registry yet"
    return ""


def render_html(fleet: FleetData, plots: Sequence[Plot], pngs: Mapping[str, bytes], title: str) -> str:
    """The page: a heading, the notes, each plot with a caption, then the fleet table.

    Returns:
        One HTML document that references nothing outside itself.
    """
    sections = []
    for plot in plots:
        sections.append(
            f'<section id="{_e(plot.name)}"><h2>{_e(plot.title)}</h2>{_img(plot, pngs[plot.name])}'
            f'<p class="note">{_e(_caption(plot))}</p></section>'
        )
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in fleet.notes)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{_e(title)}</h1><p class="meta">generated {_e(format_time(fleet.generated_at))}; '
        f"{len(fleet.devices)} devices</p>{notes}{''.join(sections)}"
        f'<section id="fleet-table"><h2>Fleet</h2>{_fleet_table(fleet.devices, fleet.drops)}</section>'
        "</body></html>\n"
    )


def build_report(
    registry: Registry,
    now: float,
    since: float | None = None,
    devices: Callable[[str, Mapping[str, str]], bool] | None = None,
    *,
    title: str = "edge-sdk fleet report",
) -> Report:
    """Read the registry, draw every plot, render the page.

    Args:
        registry: the registry.
        now: unix seconds, the report's time.
        since: only data from this time on.
        devices: which devices (:func:`~host_tools.report.data.parse_devices`); all when ``None``.
        title: the page's title.

    Raises:
        StorageError: the registry cannot be read.
    """
    fleet = read_fleet(registry, now, since, devices)
    plots = [
        plot_latency(fleet.latency),
        plot_pareto(fleet.variants),
        plot_energy(fleet.energy),
        plot_timeline(fleet.timeline, fleet.rollouts_known),
    ]
    pngs = {p.name: png_bytes(p) for p in plots}
    return Report(fleet, plots, pngs, render_html(fleet, plots, pngs, title))


def write_report(report: Report, html_path: Path | None, png_dir: Path | None) -> list[Path]:
    """Write the page and/or each plot as ``DIR/<name>.png``, each file atomically.

    Returns:
        The files written.

    Raises:
        StorageError: a file cannot be written (those written before stay whole).
    """
    written = []
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        for name, data in report.pngs.items():
            atomic_write_bytes(png_dir / f"{name}.png", data)
            written.append(png_dir / f"{name}.png")
    if html_path is not None:
        atomic_write_bytes(html_path, report.html.encode("utf-8"))
        written.append(html_path)
    return written
