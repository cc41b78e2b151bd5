"""Rollouts as text: per-wave progress (bars on a terminal) and where each device ended."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from host_tools.report.table import Column, render_table

if TYPE_CHECKING:
    from host_tools.fleet.rollout_store import RolloutRecord
    from host_tools.fleet.rollouts import RolloutReport

__all__ = ["BAR_WIDTH", "rollout_list_text", "rollout_text", "wave_line"]

#: Characters of one wave's progress bar.
BAR_WIDTH = 24
_DONE = ("succeeded", "failed", "deferred", "skipped", "missed", "rolled_back", "rollback_failed")


def wave_line(wave: int, counts: dict[str, int], bars: bool) -> str:
    """One wave: its size, a bar of the settled share (on a terminal), and its devices by state."""
    size = sum(counts.values())
    settled = sum(n for s, n in counts.items() if s in _DONE)
    name = "canary" if wave == 0 else f"wave {wave}"
    states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if not bars:
        return f"{name:>8}  {settled}/{size} settled: {states}"
    ok = counts.get("succeeded", 0)
    bad = settled - ok
    full_ok = round(BAR_WIDTH * ok / size) if size else 0
    full_bad = min(BAR_WIDTH - full_ok, round(BAR_WIDTH * bad / size) if size else 0)
    bar = "#" * full_ok + "x" * full_bad + "." * (BAR_WIDTH - full_ok - full_bad)
    return f"{name:>8}  [{bar}] {settled}/{size}  {states}"


def rollout_text(report: RolloutReport, bars: bool = False, devices: bool = True) -> str:
    """A rollout: what, where it stands, each wave, and (``devices``) each device with the version it runs."""
    r = report.record
    # Quoted, not repr(): the output function escapes the selector as it does every other field.
    head = f"rollout {r.id}: {r.bundle_name} v{r.bundle_version} to '{r.selector}': {r.status}"
    if r.status in ("running", "paused"):
        head += f", wave {max(r.wave, 0)} of {r.waves - 1}"
    lines = [head]
    if r.reason:
        lines.append(f"  reason: {r.reason}")
    lines += [wave_line(w, c, bars) for w, c in enumerate(report.waves) if c]
    if devices:
        lines.append(
            render_table(
                [
                    Column("device", lambda e: e.device_id),
                    Column("wave", lambda e: str(e.wave), ">"),
                    Column("state", lambda e: e.state),
                    Column("tries", lambda e: str(e.attempts), ">"),
                    Column(
                        "runs", lambda e: "-" if e.runs is None else f"v{e.runs}" + ("" if e.heard else " (registry)")
                    ),
                    Column("p99 ms", lambda e: None if e.p99_ms is None else f"{e.p99_ms:.3f}", ">"),
                    Column("why", lambda e: e.error_code),
                ],
                report.devices,
            )
        )
    return "\n".join(lines)


def rollout_list_text(records: Sequence[RolloutRecord]) -> str:
    """The latest rollouts, one row each."""
    if not records:
        return "no rollouts"
    return render_table(
        [
            Column("id", lambda r: r.id),
            Column("bundle", lambda r: f"{r.bundle_name} v{r.bundle_version}"),
            Column("to", lambda r: r.selector),
            Column("status", lambda r: r.status),
            Column("wave", lambda r: f"{max(r.wave, 0)}/{r.waves - 1}", ">"),
            Column("reason", lambda r: r.reason or None),
        ],
        records,
    )
