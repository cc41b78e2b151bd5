"""What ``edgectl demo`` prints: fp32 against int8, as measured by the device agent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from host_tools.report.fleet import power_cell
from host_tools.report.table import Column, format_bytes, render_table

if TYPE_CHECKING:
    from host_tools.demo import DemoResult, DemoRow

__all__ = ["demo_table", "demo_text"]


def demo_table(rows: Sequence[DemoRow]) -> str:
    """One line per model (size, accuracy, on-device latency, memory, power), then notes.

    Args:
        rows: the demo's models, fp32 first.

    Returns:
        The table and its notes.
    """
    table = render_table(
        [
            Column("model", lambda r: r.precision),
            Column("size", lambda r: format_bytes(r.size_bytes), ">"),
            Column("accuracy", lambda r: f"{r.accuracy:.2%}", ">"),
            Column("p50 ms", lambda r: None if r.metrics.latency is None else f"{r.metrics.latency.p50_ms:.3f}", ">"),
            Column("p90 ms", lambda r: None if r.metrics.latency is None else f"{r.metrics.latency.p90_ms:.3f}", ">"),
            Column("p99 ms", lambda r: None if r.metrics.latency is None else f"{r.metrics.latency.p99_ms:.3f}", ">"),
            Column("peak RSS", lambda r: format_bytes(r.metrics.memory and r.metrics.memory.peak_bytes), ">"),
            Column("model RSS", lambda r: format_bytes(r.metrics.memory and r.metrics.memory.model_bytes), ">"),
            Column("power", lambda r: power_cell(r.metrics.power), ">"),
            Column(
                "mJ/inf",
                lambda r: (
                    None
                    if r.metrics.power is None or r.metrics.power.joules_per_inference is None
                    else f"{1000 * r.metrics.power.joules_per_inference:.3f}"
                ),
                ">",
            ),
        ],
        rows,
    )
    notes = []
    if rows and len(rows) == 2:
        notes.append(f"int8 is {rows[0].size_bytes / rows[1].size_bytes:.2f}x smaller than fp32")
    if any(r.metrics.power is None or r.metrics.power.estimated for r in rows):
        src = rows[0].metrics.power.source if rows[0].metrics.power else "a power model"
        notes.append(f"power is ESTIMATED from CPU use ({src}); no power sensor on this machine")
    notes.append("latency, memory and power were measured by the device agent in its own process")
    return table + "\n" + "\n".join(f"* {n}" for n in notes)


def demo_text(result: DemoResult) -> str:
    """The demo's table and how long the whole path took."""
    return demo_table(result.rows) + f"\n\nwhole path in {result.seconds:.1f} s"
