"""Progress for logs: plain lines at a modest rate, where a terminal would get a bar.

A bar redraws one line with carriage returns; written to a file or a pipe, it leaves
half lines (a log that "ends" at 84%). :class:`ProgressLines` decides instead when a
whole line is worth printing: at each step of ``step`` (10 % by default), after
``every_s`` seconds without one, and once at the end. It takes the time as an argument
and returns the line; the CLI prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from host_tools.report.table import format_bytes

__all__ = ["ProgressLines"]


@dataclass
class ProgressLines:
    """When to print a progress line for ``label``, and what it says.

    Attributes:
        label: what progresses (a file name, ``compress``).
        step: print at each multiple of this fraction of the total.
        every_s: print at least this often while something moves.
        unit: ``B`` to show byte counts as KiB/MiB; anything else is printed as counted.
    """

    label: str
    step: float = 0.1
    every_s: float = 5.0
    unit: str = "B"
    _next: float = field(default=0.0, init=False)
    _last_s: float | None = field(default=None, init=False)
    _finished: bool = field(default=False, init=False)

    def update(self, done: int, total: int, now: float) -> str | None:
        """The line to print for ``done`` of ``total`` at ``now`` (seconds), or ``None`` for none yet.

        Args:
            done: how much is done.
            total: how much there is; 0 or less when unknown.
            now: a monotonic clock reading, in seconds.

        Returns:
            A line without a newline, or ``None``.
        """
        if self._finished:
            return None
        fraction = done / total if total > 0 else 0.0
        finished = total > 0 and done >= total
        due = fraction >= self._next or (self._last_s is not None and now - self._last_s >= self.every_s)
        if self._last_s is None:
            due = True  # the first call says that it started
        if not (due or finished):
            return None
        self._last_s = now
        self._finished = finished
        while self._next <= fraction:
            self._next += self.step
        return self._line(done, total, fraction)

    def _line(self, done: int, total: int, fraction: float) -> str:
        if total <= 0:
            return f"{self.label}: {self._amount(done)}"
        return f"{self.label}: {fraction:4.0%} ({self._amount(done)} of {self._amount(total)})"

    def _amount(self, n: int) -> str:
        return format_bytes(n) if self.unit == "B" else f"{n} {self.unit}"
