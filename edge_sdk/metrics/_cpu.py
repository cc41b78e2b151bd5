"""Process CPU utilisation over a window of code.

The kernel counts a process's CPU time in clock ticks (``SC_CLK_TCK``, 100 per second on
Linux), so a window of a few milliseconds sees 0 or 1 tick: ``cpu_s`` 0.0 or a share of
300 % of one core from one thread. A window shorter than :data:`MIN_TICKS` ticks has too
little data; its measurement says so in ``insufficient_data`` and carries no share
(``None``) rather than a number that means nothing. A share that is measured is bounded
by what the work could use: ``100 x threads`` (the inference threads asked for) and
``100 x cores``; CPU the process spent beyond that (its samplers, the runtime's own
threads) is not the model's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_sdk.errors import ConfigError, MessageError
from edge_sdk.metrics._fields import (
    as_mapping,
    optional_int,
    optional_number,
    optional_str,
    plain_dict,
    read_int,
    read_number,
    unknown,
)
from edge_sdk.metrics._window import MeasurementWindow

__all__ = ["CLOCK_TICK_S", "MIN_TICKS", "CpuMeasurement", "CpuSampler", "process_cpu_seconds"]


def _clock_tick_s() -> float:
    try:
        ticks = os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):  # not POSIX: assume the common 100 Hz
        ticks = 100
    return 1.0 / ticks if ticks > 0 else 0.01


#: Resolution of a process's CPU-time counters, in seconds (one clock tick).
CLOCK_TICK_S = _clock_tick_s()
#: Ticks a window must span before its CPU share means something (error at most 1/MIN_TICKS).
MIN_TICKS = 10


def process_cpu_seconds(pid: int | None = None) -> float:
    """User plus system CPU time a process has used so far, in seconds.

    Args:
        pid: the process; ``None`` for this one.

    Raises:
        ConfigError: no such process, or it may not be inspected.
    """
    import psutil  # here: the message types import this module, and most of their users read no process

    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied) as exc:
        raise ConfigError(f"cannot read CPU times of process {pid}: {exc}", pid=pid) from exc
    return float(times.user + times.system)


@dataclass(frozen=True)
class CpuMeasurement:
    """CPU use of one process over one window.

    Attributes:
        wall_s: length of the window.
        cpu_s: user + system CPU seconds the process used in it; ``None`` when the window
            was too short to count them.
        cores: logical cores of the machine.
        percent_of_one_core: ``100 * cpu_s / wall_s``, bounded by ``100 * min(threads, cores)``;
            above 100 only for multi-threaded work; ``None`` when too short.
        utilisation: share of the whole machine, ``percent_of_one_core / 100 / cores``, in
            [0, 1]; ``None`` when too short.
        threads: the inference threads the work was given, when known (the bound above).
        insufficient_data: why there is no share (the window spans too few CPU-time ticks),
            or ``None`` when the figures are meaningful.
        extra: fields from a newer peer, kept and written back, never read.

    Raises:
        MessageError: a negative time or share, fewer than one core or thread, utilisation
            above 1, or no share without a reason.
    """

    wall_s: float
    cpu_s: float | None
    cores: int
    percent_of_one_core: float | None
    utilisation: float | None
    threads: int | None = None
    insufficient_data: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.cores < 1 or (self.threads is not None and self.threads < 1):
            raise MessageError(f"cpu cores and threads must be at least 1, got {self.cores}", field="cores")
        shares = [v for v in (self.cpu_s, self.percent_of_one_core) if v is not None]
        if min([self.wall_s, *shares]) < 0 or (self.utilisation is not None and not 0 <= self.utilisation <= 1):
            raise MessageError("cpu times and shares must not be negative, utilisation at most 1", field="cpu")
        if self.percent_of_one_core is None and not self.insufficient_data:
            raise MessageError("a cpu measurement without a share must say why (insufficient_data)", field="cpu")

    @classmethod
    def from_deltas(
        cls,
        wall_s: float,
        cpu_s: float,
        cores: int,
        threads: int | None = None,
        *,
        tick_s: float = CLOCK_TICK_S,
        min_ticks: int = MIN_TICKS,
    ) -> CpuMeasurement:
        """Derive the bounded share, or say that the window was too short for one.

        Args:
            wall_s: window length in seconds.
            cpu_s: CPU seconds used in it.
            cores: logical core count (at least 1).
            threads: the threads the work was given; bounds the share with ``cores``.
            tick_s: resolution of the CPU-time counter.
            min_ticks: ticks the window must span.

        Returns:
            The measurement.
        """
        cores = max(1, cores)
        wall_s = max(0.0, wall_s)
        needed = min_ticks * tick_s
        if wall_s < needed:
            reason = (
                f"window of {wall_s:.3f} s is shorter than {min_ticks} CPU-time ticks ({needed:.2f} s); "
                "run longer (--min-duration)"
            )
            return cls(wall_s, None, cores, None, None, threads, insufficient_data=reason)
        usable = min(threads, cores) if threads is not None else cores
        percent = min(100.0 * max(0.0, cpu_s) / wall_s, 100.0 * usable)
        return cls(
            wall_s=wall_s,
            cpu_s=max(0.0, cpu_s),
            cores=cores,
            percent_of_one_core=percent,
            utilisation=min(1.0, percent / 100.0 / cores),
            threads=threads,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, with the kept unknown fields; ``threads`` and ``insufficient_data`` only when set."""
        return plain_dict(self, omit_none=("threads", "insufficient_data"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CpuMeasurement:
        """Rebuild from :meth:`to_dict` output, e.g. a device's metrics report.

        Args:
            data: the mapping to read; unknown keys are kept in ``extra``.

        Returns:
            The measurement.

        Raises:
            MessageError: a field is missing, of the wrong type or out of range.
        """
        where = "cpu"
        data = as_mapping(data, where)
        return cls(
            wall_s=read_number(data, "wall_s", where),
            cpu_s=optional_number(data, "cpu_s", where),
            cores=read_int(data, "cores", where),
            percent_of_one_core=optional_number(data, "percent_of_one_core", where),
            utilisation=optional_number(data, "utilisation", where),
            threads=optional_int(data, "threads", where),
            insufficient_data=optional_str(data, "insufficient_data", where),
            extra=unknown(data, cls),
        )


class CpuSampler(MeasurementWindow[CpuMeasurement]):
    """Context manager measuring a process's CPU use while its body runs.

    It reads the process's CPU time and the clock at entry and exit; no thread.

    Args:
        pid: the process; ``None`` for this one.
        clock: monotonic seconds (injectable).
        cpu_seconds: returns the process's cumulative CPU seconds (injectable).
        cores: logical core count; ``None`` asks the OS.
        threads: the threads the measured work was given, bounding its share; ``None``: cores.
    """

    def __init__(
        self,
        pid: int | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        cpu_seconds: Callable[[], float] | None = None,
        cores: int | None = None,
        threads: int | None = None,
    ) -> None:
        self._threads = threads
        self._clock = clock
        self._cpu = cpu_seconds if cpu_seconds is not None else (lambda: process_cpu_seconds(pid))
        self._cores = cores if cores is not None else (os.cpu_count() or 1)
        self._t0 = 0.0
        self._c0 = 0.0

    def _open(self) -> None:
        self._c0 = self._cpu()
        self._t0 = self._clock()

    def _close(self) -> CpuMeasurement:
        t1 = self._clock()
        c1 = self._cpu()
        return CpuMeasurement.from_deltas(t1 - self._t0, c1 - self._c0, self._cores, self._threads)
