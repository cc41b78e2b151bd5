"""Latency statistics (pure) and a benchmark loop with an injectable clock.

numpy is imported only to summarise samples: the protocol reads these statistics too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from edge_sdk.errors import ConfigError, MessageError
from edge_sdk.metrics._fields import as_mapping, plain_dict, read_int, read_number, unknown

__all__ = ["LatencyStats", "benchmark", "benchmark_interleaved"]

#: Upper bound on timed runs when ``min_duration_s`` keeps :func:`benchmark` going.
DEFAULT_MAX_RUNS = 100_000
#: Samples a :class:`LatencyStats` keeps of its distribution (evenly spaced quantiles beyond this many runs).
KEPT_SAMPLES = 64
#: Most samples read back from a report (a peer's report is untrusted input).
MAX_READ_SAMPLES = 1024


@dataclass(frozen=True)
class LatencyStats:
    """Summary of repeated timings of one operation, in milliseconds.

    ``stdev_ms`` is the sample standard deviation (0 for a single sample).
    Percentiles use numpy's ``"linear"`` method. ``throughput_per_s`` is runs per
    second of back-to-back execution (``count / total time``); it is 0.0 when the
    total time is zero, i.e. unmeasurable. ``samples_ms`` keeps the shape of the
    distribution, bounded: every run's time when there were at most :data:`KEPT_SAMPLES`
    runs, else that many evenly spaced quantiles (each stands for ``count / len`` runs),
    ascending; ``None`` in reports from devices that did not send them (on the wire
    only when present). ``extra`` keeps fields a newer peer sent (written back by
    :meth:`to_dict`, never read, not compared).
    """

    count: int
    mean_ms: float
    stdev_ms: float
    min_ms: float
    max_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput_per_s: float
    samples_ms: tuple[float, ...] | None = field(default=None, compare=False, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.samples_ms is not None and (
            len(self.samples_ms) > MAX_READ_SAMPLES or any(v < 0 for v in self.samples_ms)
        ):
            raise MessageError(
                f"latency samples must be at most {MAX_READ_SAMPLES} non-negative times", field="samples_ms"
            )
        if self.count < 1:
            raise MessageError(f"latency stats need at least one run, got count={self.count}", field="count")
        if min(self.mean_ms, self.stdev_ms, self.min_ms, self.max_ms, self.p50_ms, self.p90_ms, self.p99_ms) < 0:
            raise MessageError("latency stats must not be negative")
        if self.throughput_per_s < 0:
            raise MessageError("latency throughput must not be negative", field="throughput_per_s")

    @classmethod
    def from_samples(cls, seconds: Sequence[float]) -> LatencyStats:
        """Summarise timings.

        Args:
            seconds: one duration per run, in seconds.

        Returns:
            The statistics, in milliseconds.

        Raises:
            ConfigError: no samples, or a sample is negative or not finite.
        """
        import numpy as np  # here, so that reading a report (protocol, registry) does not load numpy

        data = np.asarray(seconds, dtype=np.float64)
        if data.ndim != 1 or data.size == 0:
            raise ConfigError("no latency samples to summarise", count=int(data.size))
        if not np.all(np.isfinite(data)) or np.any(data < 0):
            raise ConfigError("latency samples must be finite and non-negative")
        ms = data * 1000.0
        p50, p90, p99 = np.percentile(ms, [50, 90, 99], method="linear")
        total = float(data.sum())
        if data.size <= KEPT_SAMPLES:
            kept = np.sort(ms)
        else:
            kept = np.quantile(ms, (np.arange(KEPT_SAMPLES) + 0.5) / KEPT_SAMPLES, method="linear")
        return cls(
            count=int(data.size),
            mean_ms=float(ms.mean()),
            stdev_ms=float(ms.std(ddof=1)) if data.size > 1 else 0.0,
            min_ms=float(ms.min()),
            max_ms=float(ms.max()),
            p50_ms=float(p50),
            p90_ms=float(p90),
            p99_ms=float(p99),
            throughput_per_s=data.size / total if total > 0 else 0.0,
            samples_ms=tuple(float(v) for v in kept),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, with the kept unknown fields; ``samples_ms`` only when there are some."""
        return plain_dict(self, omit_none=("samples_ms",))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyStats:
        """Rebuild from :meth:`to_dict` output, e.g. a device's metrics report.

        Unknown keys (from a newer peer) are kept in ``extra`` and never acted on.

        Args:
            data: the mapping to read.

        Returns:
            The statistics.

        Raises:
            MessageError: a field is missing, not a finite number, or out of range.
        """
        where = "latency"
        data = as_mapping(data, where)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in ("extra", "samples_ms"):
                continue
            values[f.name] = read_int(data, f.name, where) if f.name == "count" else read_number(data, f.name, where)
        raw = data.get("samples_ms")
        if raw is not None:
            if not isinstance(raw, list) or len(raw) > MAX_READ_SAMPLES:
                raise MessageError(f"latency samples_ms must be a list of at most {MAX_READ_SAMPLES}", field=where)
            values["samples_ms"] = tuple(read_number({"v": v}, "v", f"{where}.samples_ms") for v in raw)
        return cls(**values, extra=unknown(data, cls))


def benchmark(
    fn: Callable[[], object],
    *,
    warmup: int = 10,
    runs: int = 100,
    min_duration_s: float = 0.0,
    max_runs: int = DEFAULT_MAX_RUNS,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyStats:
    """Time ``fn`` repeatedly.

    ``warmup`` calls run first and are not counted. Then ``fn`` is timed at least
    ``runs`` times, and further until ``min_duration_s`` of timed runs have passed,
    but never more than ``max_runs`` times.

    Args:
        fn: the operation, e.g. ``lambda: session.run(feeds)``.
        warmup: untimed calls before measuring.
        runs: minimum number of timed calls.
        min_duration_s: minimum wall time to keep measuring, in seconds.
        max_runs: hard cap on timed calls, so a slow clock cannot loop forever.
        clock: monotonic seconds; injectable for tests.

    Returns:
        Statistics over the timed calls.

    Raises:
        ConfigError: a count is negative, ``runs`` is below 1, ``max_runs`` is below
            ``runs``, or ``min_duration_s`` is negative.
    """
    if warmup < 0 or runs < 1 or max_runs < runs or not min_duration_s >= 0:
        raise ConfigError(
            "benchmark needs warmup >= 0, runs >= 1, max_runs >= runs and min_duration_s >= 0",
            warmup=warmup,
            runs=runs,
            max_runs=max_runs,
            min_duration_s=min_duration_s,
        )
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = clock()
    end = start
    while len(samples) < max_runs and (len(samples) < runs or end - start < min_duration_s):
        t0 = clock()
        fn()
        end = clock()
        samples.append(end - t0)
    return LatencyStats.from_samples(samples)


def benchmark_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    runs_per_round: int,
    warmup: int,
    later_warmup: int | None = None,
    min_duration_s: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[LatencyStats]]:
    """Time several operations in alternating rounds, so that a burst of other load on
    the host falls on all of them alike rather than on one.

    Each round runs :func:`benchmark` once per operation, in order: ``runs_per_round``
    timed calls and at least ``min_duration_s / rounds`` seconds, after ``warmup``
    untimed calls in the first round and ``later_warmup`` (default ``warmup``) after.

    Returns:
        Per name, the statistics of each round, in round order.

    Raises:
        ConfigError: ``rounds`` is below 1, or a count :func:`benchmark` refuses.
    """
    if rounds < 1:
        raise ConfigError("interleaved benchmark needs rounds >= 1", rounds=rounds)
    stats: dict[str, list[LatencyStats]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            stats[name].append(
                benchmark(
                    fn,
                    warmup=warmup if r == 0 or later_warmup is None else later_warmup,
                    runs=runs_per_round,
                    min_duration_s=min_duration_s / rounds,
                    clock=clock,
                )
            )
    return stats
