"""host_tools.report.progress and format_time: progress for logs, times for people."""

from __future__ import annotations

import time

from host_tools.report.progress import ProgressLines
from host_tools.report.table import format_time


def test_progress_lines_come_every_tenth_and_at_the_end() -> None:
    lines = ProgressLines("b.edge")
    total = 1000 * 1024
    printed = [line for done in range(0, total + 1, 1024) if (line := lines.update(done, total, 0.0))]
    assert printed[0] == "b.edge:   0% (0 B of 1000.0 KiB)"
    assert printed[-1] == "b.edge: 100% (1000.0 KiB of 1000.0 KiB)"
    assert 10 <= len(printed) <= 12  # one per 10 %, not one per chunk
    assert lines.update(total, total, 1.0) is None  # nothing after the end


def test_a_slow_transfer_still_says_something_every_few_seconds() -> None:
    lines = ProgressLines("slow", every_s=5.0)
    assert lines.update(0, 100, 0.0) is not None
    assert lines.update(1, 100, 1.0) is None
    assert lines.update(2, 100, 6.0) == "slow:   2% (2 B of 100 B)"
    assert lines.update(3, 100, 7.0) is None


def test_progress_without_a_total_and_in_other_units() -> None:
    lines = ProgressLines("compress", unit="step")
    assert lines.update(2, 0, 0.0) == "compress: 2 step"


def test_format_time_is_for_people() -> None:
    t = 1_700_000_000.0
    text = format_time(t)
    assert "2023-11-1" in text and "UTC" in text and "1700000000" not in text
    assert time.strftime("%H:%M:%S", time.gmtime(t)) in text
    assert format_time(None) == "-"
