"""Plain-text tables. The CLI prints these, or the same rows as JSON with ``--json``.

Every cell is escaped for the terminal (:func:`~host_tools.report.safe_text.escape_for_terminal`,
newlines included) before the widths are measured, so a device-supplied string can neither
reach the terminal raw nor break the table's lines or alignment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from host_tools.report.safe_text import escape_for_terminal

__all__ = ["Column", "format_bytes", "format_time", "render_table"]


@dataclass(frozen=True)
class Column:
    """One column: header, how to get the cell from a row, and alignment."""

    header: str
    get: Callable[[Any], Any]
    align: str = "<"


def format_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'; None -> '-'."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def render_table(columns: Sequence[Column], rows: Sequence[Any]) -> str:
    """Render rows as an aligned table with a header rule. ``None`` cells print as '-'.

    Args:
        columns: the columns, left to right.
        rows: the rows; each column's ``get`` picks its cell.

    Returns:
        The table without a trailing newline; every cell and header escaped for the terminal.
    """
    cells = [[("-" if (v := c.get(r)) is None else escape_for_terminal(str(v))) for c in columns] for r in rows]
    headers = [escape_for_terminal(c.header) for c in columns]
    widths = [max([len(headers[i])] + [len(row[i]) for row in cells]) for i in range(len(columns))]
    lines = ["  ".join(f"{h:{c.align}{w}}" for h, c, w in zip(headers, columns, widths, strict=False)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(f"{v:{c.align}{w}}" for v, c, w in zip(row, columns, widths, strict=False)).rstrip())
    return "\n".join(lines)


def format_time(unix_s: float | None) -> str:
    """A time for people: local date and time with its zone, and UTC (``2025-03-01 14:05:09 CET, 13:05:09 UTC``).

    Args:
        unix_s: seconds since the epoch, as the wire and the registry keep times; ``None`` for unknown.

    Returns:
        The text; ``-`` for ``None``.
    """
    if unix_s is None:
        return "-"
    local = time.localtime(unix_s)
    if local.tm_gmtoff == 0:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_s))
    return f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', local)}, {time.strftime('%H:%M:%S', time.gmtime(unix_s))} UTC"
