"""``edgectl exporter``: the fleet as Prometheus metrics, read from the registry at each scrape.

:class:`FleetCollector` is a prometheus-client custom collector: each scrape reads the
registry through :func:`host_tools.report.data.read_fleet` (or reuses the last read for
``cache_s`` seconds, so a dashboard refreshing every second does not read the registry
every second) and yields metric families. Nothing is kept between scrapes but that cache.

Names follow Prometheus conventions: base units (``_seconds``, ``_bytes``, ``_joules``,
``_watts``), ``_total`` for counters, ``_info`` for the installed version. Latency
quantiles are a summary: its quantile samples are gauges with a ``quantile`` label, which
``promtool check metrics`` accepts on a summary only. Labels stay
bounded: device ids, bundle names, rollout ids and reasons are checked against their
charsets, and a value that fails is left out (counted in
``edge_exporter_skipped_series_total``), never passed through as free text. Latency is
exported for the versions each device runs now, not for every version it ever ran.

==========================================  ========  ===========================================
metric                                      type      labels
==========================================  ========  ===========================================
edge_devices                                gauge     state
edge_inference_latency_quantiles_seconds    summary   device, bundle, version (quantile 0.5, 0.9, 0.99)
edge_inference_latency_seconds              histogram device, bundle, version
edge_model_memory_peak_bytes                gauge     device, bundle, version
edge_power_watts                            gauge     device, bundle, version, estimated
edge_energy_per_inference_joules            gauge     device, bundle, version, estimated
edge_device_bundle_info                     info      device, bundle, version
edge_device_last_seen_timestamp_seconds     gauge     device
edge_rollout_devices                        gauge     rollout, bundle, state (when rollouts are kept)
edge_collector_dropped_messages_total       counter   device, reason
edge_exporter_skipped_series_total          counter   (none)
==========================================  ========  ===========================================
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from host_tools.fleet.registry import UNKNOWN_DEVICE, open_registry
from host_tools.report.data import FleetData, read_fleet

__all__ = ["LATENCY_BUCKETS_S", "FleetCollector", "serve_exporter"]

#: Histogram bucket bounds for inference latency (seconds): 100 us to 10 s.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_DEVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_BUNDLE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_REASON_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")
_STATES = ("online", "stale", "offline")


def _seconds(ms: float) -> float:
    return ms / 1000.0


class FleetCollector:
    """A prometheus-client collector that reads the fleet from the registry at each scrape.

    Args:
        read: returns the fleet's data now (the shell opens the registry inside it).
        cache_s: reuse a read for this long (0: read at every scrape).
        clock: monotonic clock, for the cache.
    """

    def __init__(
        self, read: Callable[[], FleetData], cache_s: float = 0.0, clock: Callable[[], float] = time.monotonic
    ):
        self._read = read
        self._cache_s = cache_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, FleetData] | None = None

    def _data(self) -> FleetData:
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached[0] >= self._cache_s:
                self._cached = (now, self._read())
            return self._cached[1]

    def describe(self) -> list[Any]:
        """Nothing: prometheus-client then does not scrape at registration."""
        return []

    def collect(self) -> Iterator[Any]:
        """The metric families of one scrape.

        Raises:
            StorageError: the registry cannot be read (the scrape fails; the next one tries again).
        """
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
            SummaryMetricFamily,
        )

        data = self._data()
        skipped = 0
        states = GaugeMetricFamily(
            "edge_devices", "Devices by state, as the registry last recorded it.", labels=["state"]
        )
        counts = dict.fromkeys(_STATES, 0)
        for row in data.devices:
            counts[row.state] = counts.get(row.state, 0) + 1
        for state, n in sorted(counts.items()):
            states.add_metric([state], n)
        yield states

        installed: set[tuple[str, str, int]] = set()
        info = InfoMetricFamily(
            "edge_device_bundle", "Bundle versions each device runs now.", labels=["device", "bundle", "version"]
        )
        seen = GaugeMetricFamily(
            "edge_device_last_seen_timestamp_seconds", "When the device was last heard from.", labels=["device"]
        )
        for row in data.devices:
            if not _DEVICE_RE.fullmatch(row.device_id):
                skipped += 1
                continue
            seen.add_metric([row.device_id], row.last_seen)
            for bundle, version in sorted(row.versions.items()):
                if not _BUNDLE_RE.fullmatch(bundle):
                    skipped += 1
                    continue
                installed.add((row.device_id, bundle, version))
                info.add_metric([row.device_id, bundle, str(version)], {})
        yield info
        yield seen

        labels = ["device", "bundle", "version"]
        quantiles = SummaryMetricFamily(
            "edge_inference_latency_quantiles_seconds",
            "Inference latency quantiles (0.5, 0.9, 0.99) of the installed version, as the device computed them "
            "for its latest report.",
            labels=labels,
        )
        histogram = HistogramMetricFamily(
            "edge_inference_latency_seconds",
            "Inference latency of the installed version in the device's latest report (buckets from its kept samples).",
            labels=labels,
        )
        for s in data.latency:
            key = (s.device_id, s.bundle_name, s.version)
            if key not in installed:
                continue
            values = [s.device_id, s.bundle_name, str(s.version)]
            total = _seconds(s.mean_ms) * s.count
            _add_quantiles(quantiles, values, s.count, total, s.quantiles_ms)
            per_sample = s.count / len(s.samples_ms)
            buckets = [
                (repr(bound), float(round(bisect.bisect_right(s.samples_ms, bound * 1000.0) * per_sample)))
                for bound in LATENCY_BUCKETS_S
            ]
            buckets.append(("+Inf", float(s.count)))
            histogram.add_metric(values, buckets, sum_value=total)
        yield quantiles
        yield histogram

        memory = GaugeMetricFamily(
            "edge_model_memory_peak_bytes", "Peak memory while the installed version ran.", labels=labels
        )
        for device_id, bundle, version, peak in data.memory:
            if (device_id, bundle, version) in installed:
                memory.add_metric([device_id, bundle, str(version)], peak)
        yield memory

        power = GaugeMetricFamily(
            "edge_power_watts", "Mean power over the benchmark window.", labels=[*labels, "estimated"]
        )
        energy = GaugeMetricFamily(
            "edge_energy_per_inference_joules",
            "Energy per inference; estimated=true where a power model gave it, not a sensor.",
            labels=[*labels, "estimated"],
        )
        for e in data.energy:
            if (e.device_id, e.bundle_name, e.version) not in installed:
                continue
            values = [e.device_id, e.bundle_name, str(e.version), "true" if e.estimated else "false"]
            energy.add_metric(values, e.joules_per_inference)
            if e.watts is not None:
                power.add_metric(values, e.watts)
        yield power
        yield energy

        rollouts = GaugeMetricFamily(
            "edge_rollout_devices", "Devices of each rollout by state.", labels=["rollout", "bundle", "state"]
        )
        for r in data.rollouts:
            for state, n in sorted(r.devices.items()):
                rollouts.add_metric([r.rollout, r.bundle, state], n)
        yield rollouts

        drops = CounterMetricFamily(
            "edge_collector_dropped_messages",
            "Device messages the host dropped or refused (bad signature, replayed, unknown device...), by reason.",
            labels=["device", "reason"],
        )
        for device_id, reasons in sorted(data.drops.items()):
            if device_id != UNKNOWN_DEVICE and not _DEVICE_RE.fullmatch(device_id):
                skipped += 1
                continue
            for reason, n in sorted(reasons.items()):
                if _REASON_RE.fullmatch(reason):
                    drops.add_metric([device_id, reason], n)
                else:
                    skipped += 1
        yield drops
        yield CounterMetricFamily(
            "edge_exporter_skipped_series", "Series left out because a label value failed its check.", value=skipped
        )


def _add_quantiles(family: Any, values: list[str], count: int, total: float, quantiles: Mapping[float, float]) -> None:
    """One summary series with its quantile samples (prometheus-client's summary family writes only count and sum)."""
    from prometheus_client.samples import Sample

    name = family.name
    for q, ms in sorted(quantiles.items()):
        family.samples.append(Sample(name, {**dict(zip(family._labelnames, values, strict=True)), "quantile": repr(q)},
                                     _seconds(ms)))  # fmt: skip
    family.samples.append(Sample(f"{name}_count", dict(zip(family._labelnames, values, strict=True)), float(count)))
    family.samples.append(Sample(f"{name}_sum", dict(zip(family._labelnames, values, strict=True)), total))


def registry_reader(registry_url: str, clock: Callable[[], float] = time.time) -> Callable[[], FleetData]:
    """A reader that opens the registry, reads the present state of the fleet, and closes it.

    Each scrape runs on the HTTP server's thread; a registry connection belongs to one
    thread, so each read opens its own.
    """

    def read() -> FleetData:
        with open_registry(registry_url) as reg:
            return read_fleet(reg, clock(), history=False)

    return read


def serve_exporter(
    registry_url: str, host: str, port: int, stop: threading.Event, cache_s: float = 5.0,
    ready: Callable[[str], None] | None = None,
) -> None:  # fmt: skip
    """Serve ``/metrics`` on ``host:port`` until ``stop`` is set.

    Raises:
        StorageError: the registry cannot be opened at start (checked once before serving).
        OSError: the port cannot be bound.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    with open_registry(registry_url):
        pass
    metrics = CollectorRegistry(auto_describe=False)
    metrics.register(FleetCollector(registry_reader(registry_url), cache_s))
    server, thread = start_http_server(port, addr=host, registry=metrics)
    try:
        if ready is not None:
            ready(f"http://{host}:{server.server_port}/metrics")
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
