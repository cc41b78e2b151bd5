"""Process CPU utilisation over a window of code."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

from edge_sdk.errors import ConfigError, MessageError
from edge_sdk.metrics._fields import as_mapping, plain_dict, read_int, read_number, unknown
from edge_sdk.metrics._window import MeasurementWindow

__all__ = ["CpuMeasurement", "CpuSampler", "process_cpu_seconds"]


def process_cpu_seconds(pid: int | None = None) -> float:
    """User plus system CPU time a process has used so far, in seconds.

    Args:
        pid: the process; ``None`` for this one.

    Raises:
        ConfigError: no such process, or it may not be inspected.
    """
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
        cpu_s: user + system CPU seconds the process used in it.
        cores: logical cores of the machine.
        percent_of_one_core: ``100 * cpu_s / wall_s``; above 100 for multi-threaded work.
        utilisation: share of the whole machine, ``cpu_s / wall_s / cores``, in [0, 1].
        extra: fields from a newer peer, kept and written back, never read.

    Raises:
        MessageError: a negative time or share, fewer than one core, or utilisation above 1.
    """

    wall_s: float
    cpu_s: float
    cores: int
    percent_of_one_core: float
    utilisation: float
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.cores < 1:
            raise MessageError(f"cpu cores must be at least 1, got {self.cores}", field="cores")
        if min(self.wall_s, self.cpu_s, self.percent_of_one_core) < 0 or not 0 <= self.utilisation <= 1:
            raise MessageError("cpu times and shares must not be negative, utilisation at most 1", field="cpu")

    @classmethod
    def from_deltas(cls, wall_s: float, cpu_s: float, cores: int) -> CpuMeasurement:
        """Derive the ratios; a zero-length window has zero utilisation.

        Args:
            wall_s: window length in seconds.
            cpu_s: CPU seconds used in it.
            cores: logical core count (at least 1).

        Returns:
            The measurement.
        """
        cores = max(1, cores)
        cpu_s = max(0.0, cpu_s)
        if wall_s <= 0:
            return cls(wall_s=max(0.0, wall_s), cpu_s=cpu_s, cores=cores, percent_of_one_core=0.0, utilisation=0.0)
        one_core = cpu_s / wall_s
        return cls(
            wall_s=wall_s,
            cpu_s=cpu_s,
            cores=cores,
            percent_of_one_core=100.0 * one_core,
            utilisation=min(1.0, one_core / cores),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, with the kept unknown fields."""
        return plain_dict(self)

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
            cpu_s=read_number(data, "cpu_s", where),
            cores=read_int(data, "cores", where),
            percent_of_one_core=read_number(data, "percent_of_one_core", where),
            utilisation=read_number(data, "utilisation", where),
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
    """

    def __init__(
        self,
        pid: int | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        cpu_seconds: Callable[[], float] | None = None,
        cores: int | None = None,
    ) -> None:
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
        return CpuMeasurement.from_deltas(t1 - self._t0, c1 - self._c0, self._cores)
