"""Resident memory: current RSS, and the peak over a window of code.

Two sources are combined. A background thread samples RSS every ``interval_s``;
that sees the window only, but can miss a spike shorter than the interval. The
kernel's high-water mark ``VmHWM`` in ``/proc/<pid>/status`` misses nothing, but it
is the peak over the *whole life of the process*, not over the window. So the
window's peak is the sampled peak, raised to ``VmHWM`` only when ``VmHWM`` grew
during the window (which proves the process's peak was set inside it).

A model's own share of memory cannot be read from RSS alone in a long-lived process:
memory freed by an earlier model stays resident in the C heap, and the next load reuses
it without RSS growing (10 MiB for a first load, 4 KiB for the same model later).
:func:`heap_in_use_bytes` reads the C heap's bytes in use (glibc ``mallinfo2``), which
grows by what a load allocates whether or not the pages were resident already, and
:func:`release_free_heap` (glibc ``malloc_trim``) hands freed heap pages back to the OS
so that RSS deltas are less distorted where ``mallinfo2`` is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.errors import ConfigError, MessageError
from edge_sdk.metrics._fields import as_mapping, optional_int, optional_str, plain_dict, read_int, unknown
from edge_sdk.metrics._window import MeasurementWindow, SamplingThread

__all__ = [
    "MemoryMeasurement",
    "ModelMemory",
    "PeakRssSampler",
    "heap_in_use_bytes",
    "parse_vm_hwm",
    "read_vm_hwm",
    "release_free_heap",
    "rss_bytes",
]

_VM_HWM = re.compile(r"^VmHWM:\s*(\d+)\s*kB\s*$", re.MULTILINE)


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process right now.

    Args:
        pid: the process; ``None`` for this one.

    Returns:
        RSS in bytes.

    Raises:
        ConfigError: no such process, or it may not be inspected.
    """
    import psutil  # here: the message types import this module, and most of their users read no process

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied) as exc:
        raise ConfigError(f"cannot read memory of process {pid}: {exc}", pid=pid) from exc


class _MallInfo2(ctypes.Structure):
    # glibc's struct mallinfo2 (2.33 and later): every field a size_t.
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def heap_in_use_bytes() -> int | None:
    """Bytes the C heap has handed out and not taken back (glibc ``mallinfo2``: in-use plus mmapped).

    Returns:
        The bytes, or ``None`` where the C library has no ``mallinfo2`` (musl, macOS,
        glibc before 2.33).
    """
    libc = _libc()
    mallinfo2 = getattr(libc, "mallinfo2", None) if libc is not None else None
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``), so RSS shows live memory.

    Returns:
        Whether the C library offers it.
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim(0)
    return True


def parse_vm_hwm(status_text: str) -> int | None:
    """The ``VmHWM`` line of a ``/proc/<pid>/status`` text, in bytes; ``None`` if absent."""
    match = _VM_HWM.search(status_text)
    return int(match.group(1)) * 1024 if match else None


def read_vm_hwm(pid: int | None = None, root: Path = Path("/")) -> int | None:
    """The kernel's lifetime peak RSS of a process (``VmHWM``).

    Args:
        pid: the process; ``None`` for this one.
        root: filesystem root holding ``proc/``; a fake tree in tests.

    Returns:
        Bytes, or ``None`` where the file is missing or unreadable (not Linux).
    """
    path = root / "proc" / str(os.getpid() if pid is None else pid) / "status"
    try:
        return parse_vm_hwm(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None


@dataclass(frozen=True)
class MemoryMeasurement:
    """Memory over one window.

    Attributes:
        start_bytes: RSS when the window opened.
        peak_bytes: best estimate of the window's peak RSS (see module docs).
        sampled_peak_bytes: highest RSS the sampling thread saw in the window.
        hwm_bytes: the kernel's lifetime high-water mark at the end, or ``None``.
        samples: how many RSS samples were taken.
    """

    start_bytes: int
    peak_bytes: int
    sampled_peak_bytes: int
    hwm_bytes: int | None
    samples: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


@dataclass(frozen=True)
class ModelMemory:
    """What a model cost in memory on a device: its load, and the peak while it ran.

    This is the ``memory`` of a metrics report. The last five fields are the
    :class:`MemoryMeasurement` of the benchmark window.

    Attributes:
        rss_before_load_bytes: RSS before the model was loaded.
        rss_after_load_bytes: RSS once it was loaded.
        model_bytes: the model's own share (never negative): the growth of the C heap's
            bytes in use across loading where that can be read, else ``after - before``.
        start_bytes, peak_bytes, sampled_peak_bytes, hwm_bytes, samples: as in
            :class:`MemoryMeasurement`.
        model_bytes_method: ``"heap"`` or ``"rss"``: how ``model_bytes`` was measured;
            ``None`` in reports from devices that did not say (they used RSS).
        extra: fields from a newer peer, kept and written back, never read.

    Raises:
        MessageError: a byte count or the sample count is negative.
    """

    rss_before_load_bytes: int
    rss_after_load_bytes: int
    model_bytes: int
    start_bytes: int
    peak_bytes: int
    sampled_peak_bytes: int
    hwm_bytes: int | None
    samples: int
    model_bytes_method: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        counts = (
            self.rss_before_load_bytes,
            self.rss_after_load_bytes,
            self.model_bytes,
            self.start_bytes,
            self.peak_bytes,
            self.sampled_peak_bytes,
            self.samples,
            0 if self.hwm_bytes is None else self.hwm_bytes,
        )
        if min(counts) < 0:
            raise MessageError("memory byte counts must not be negative", field="memory")

    @classmethod
    def from_window(
        cls, rss_before_load: int, rss_after_load: int, window: MemoryMeasurement, heap_growth: int | None = None
    ) -> ModelMemory:
        """Combine the memory around loading with the benchmark window's measurement.

        Args:
            rss_before_load: RSS before loading, in bytes.
            rss_after_load: RSS after loading, in bytes.
            window: the benchmark window's memory.
            heap_growth: growth of :func:`heap_in_use_bytes` across loading, when it
                could be read; it is the model's share then, RSS's growth otherwise.

        Returns:
            The model's memory.
        """
        model_bytes = heap_growth if heap_growth is not None else rss_after_load - rss_before_load
        return cls(
            rss_before_load_bytes=rss_before_load,
            rss_after_load_bytes=rss_after_load,
            model_bytes=max(0, model_bytes),
            model_bytes_method="heap" if heap_growth is not None else "rss",
            start_bytes=window.start_bytes,
            peak_bytes=window.peak_bytes,
            sampled_peak_bytes=window.sampled_peak_bytes,
            hwm_bytes=window.hwm_bytes,
            samples=window.samples,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (flat, as metrics reports have always carried it), with the kept unknown fields;
        ``model_bytes_method`` only when known."""
        return plain_dict(self, omit_none=("model_bytes_method",))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelMemory:
        """Rebuild from :meth:`to_dict` output, e.g. a device's metrics report.

        Args:
            data: the mapping to read; unknown keys are kept in ``extra``.

        Returns:
            The memory.

        Raises:
            MessageError: a field is missing, not an integer, or negative.
        """
        where = "memory"
        data = as_mapping(data, where)
        return cls(
            rss_before_load_bytes=read_int(data, "rss_before_load_bytes", where),
            rss_after_load_bytes=read_int(data, "rss_after_load_bytes", where),
            model_bytes=read_int(data, "model_bytes", where),
            start_bytes=read_int(data, "start_bytes", where),
            peak_bytes=read_int(data, "peak_bytes", where),
            sampled_peak_bytes=read_int(data, "sampled_peak_bytes", where),
            hwm_bytes=optional_int(data, "hwm_bytes", where),
            samples=read_int(data, "samples", where),
            model_bytes_method=optional_str(data, "model_bytes_method", where),
            extra=unknown(data, cls),
        )


class PeakRssSampler(MeasurementWindow[MemoryMeasurement]):
    """Context manager measuring the peak RSS of a process while its body runs.

    Example::

        with PeakRssSampler() as mem:
            session.run(feeds)
        mem.peak_bytes

    Args:
        pid: the process; ``None`` for this one.
        interval_s: sampling period of the background thread.
        root: filesystem root holding ``proc/`` for ``VmHWM``.
        rss_reader: returns the current RSS in bytes; defaults to psutil (injectable).

    Raises:
        ConfigError: ``interval_s`` is not positive.
    """

    def __init__(
        self,
        pid: int | None = None,
        *,
        interval_s: float = 0.005,
        root: Path = Path("/"),
        rss_reader: Callable[[], int] | None = None,
    ) -> None:
        if not interval_s > 0:
            raise ConfigError(f"interval_s must be positive, got {interval_s!r}")
        self._pid = pid
        self._interval_s = interval_s
        self._root = root
        self._read = rss_reader if rss_reader is not None else (lambda: rss_bytes(pid))
        self._sampler: SamplingThread | None = None
        self._lock = threading.Lock()
        self._peak = 0
        self._count = 0
        self._start = 0
        self._hwm_start: int | None = None

    def _sample(self) -> None:
        value = self._read()
        with self._lock:
            self._peak = max(self._peak, value)
            self._count += 1

    def _open(self) -> None:
        self._hwm_start = read_vm_hwm(self._pid, self._root)
        self._start = self._read()
        self._peak, self._count = self._start, 1
        # Any failure (the process ended, psutil failed) stops the sampling; results are kept.
        self._sampler = SamplingThread("RSS", self._interval_s, self._sample, stop_on=(Exception,))
        self._sampler.start()

    def _close(self) -> MemoryMeasurement:
        if self._sampler is not None:
            self._sampler.stop()
        self._sample()
        hwm = read_vm_hwm(self._pid, self._root)
        peak = self._peak
        if hwm is not None and self._hwm_start is not None and hwm > self._hwm_start:
            peak = max(peak, hwm)
        return MemoryMeasurement(
            start_bytes=self._start,
            peak_bytes=peak,
            sampled_peak_bytes=self._peak,
            hwm_bytes=hwm,
            samples=self._count,
        )

    @property
    def start_bytes(self) -> int:
        """RSS when the window opened."""
        return self.result.start_bytes

    @property
    def peak_bytes(self) -> int:
        """Best estimate of the window's peak RSS."""
        return self.result.peak_bytes
