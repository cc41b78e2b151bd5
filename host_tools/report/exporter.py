"""``edgectl exporter``: the fleet as Prometheus metrics, read from the registry at each scrape.

:func:`exposition` renders one scrape's body, in Prometheus' text format (0.0.4), straight
from the values :func:`host_tools.report.data.read_fleet` returns: a 1,000-device fleet is
about 31,000 lines, and building them through prometheus-client's metric families and text
writer cost ~38 us a line (1.2 s a scrape); formatting them here costs 1-2 us. The body is
checked by the same means as before: prometheus-client's text parser and ``promtool check
metrics`` read it in the tests. :class:`FleetExporter` keeps the rendered body for ``cache_s``
seconds, and beyond while a SQLite registry's files show no write (a dashboard refreshing
every second neither reads the registry nor formats 31,000 lines every second);
:func:`serve_exporter` serves it over HTTP (``/metrics``) with the standard library's
threading HTTP server.

Names follow Prometheus conventions: base units (``_seconds``, ``_bytes``, ``_joules``,
``_watts``), ``_total`` for counters, ``_info`` for the installed version. Latency
quantiles are a summary: its quantile samples are gauges with a ``quantile`` label, which
``promtool check metrics`` accepts on a summary only. Labels stay
bounded: device ids, bundle names, rollout ids and reasons are checked against their
charsets, and a value that fails is left out (counted in
``edge_exporter_skipped_series_total``), never passed through as free text. Those charsets
hold no quote, backslash or newline, so label values need no escaping. Latency is
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
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Hashable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_sdk.errors import EdgeError
from host_tools.fleet.registry import UNKNOWN_DEVICE, change_token, open_registry
from host_tools.report.data import FleetData, read_fleet

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS_S", "FleetExporter", "exposition", "serve_exporter"]

logger = logging.getLogger(__name__)

#: The text format's content type, as Prometheus asks for it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Histogram bucket bounds for inference latency (seconds): 100 us to 10 s.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_LE = tuple(repr(b) for b in LATENCY_BUCKETS_S)
_BOUNDS_MS = tuple(b * 1000.0 for b in LATENCY_BUCKETS_S)
_DEVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_BUNDLE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_REASON_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")
#: A rollout's bundle as the registry names it: ``name vN`` (or the bare name).
_ROLLOUT_BUNDLE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}( v[0-9]{1,10})?")
_STATES = ("online", "stale", "offline")


def _value(v: float) -> str:
    """A sample value as the text format writes it (``+Inf``, ``-Inf``, ``NaN`` for the non-finite)."""
    f = float(v)
    if math.isfinite(f):
        return repr(f)
    return "NaN" if math.isnan(f) else "+Inf" if f > 0 else "-Inf"


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    # Help texts are this module's constants: no backslash or newline to escape.
    out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")


def exposition(data: FleetData) -> bytes:
    """One scrape's body in Prometheus' text format (0.0.4), from one read of the fleet.

    Pure: values in, bytes out. Label values are checked against their charsets (which
    exclude quotes, backslashes and newlines); a series whose label fails is left out and
    counted in ``edge_exporter_skipped_series_total``.
    """
    out: list[str] = []
    add = out.append
    skipped = 0

    _family(out, "edge_devices", "gauge", "Devices by state, as the registry last recorded it.")
    counts = dict.fromkeys(_STATES, 0)
    for row in data.devices:
        counts[row.state] = counts.get(row.state, 0) + 1
    for state, n in sorted(counts.items()):
        add(f'edge_devices{{state="{state}"}} {_value(n)}\n')

    installed: set[tuple[str, str, int]] = set()
    info: list[str] = []
    seen: list[str] = []
    for row in data.devices:
        if not _DEVICE_RE.fullmatch(row.device_id):
            skipped += 1
            continue
        seen.append(f'edge_device_last_seen_timestamp_seconds{{device="{row.device_id}"}} {_value(row.last_seen)}\n')
        for bundle, version in sorted(row.versions.items()):
            if not _BUNDLE_RE.fullmatch(bundle):
                skipped += 1
                continue
            installed.add((row.device_id, bundle, version))
            info.append(
                f'edge_device_bundle_info{{device="{row.device_id}",bundle="{bundle}",version="{version}"}} 1.0\n'
            )
    _family(out, "edge_device_bundle_info", "gauge", "Bundle versions each device runs now.")
    out.extend(info)
    _family(out, "edge_device_last_seen_timestamp_seconds", "gauge", "When the device was last heard from.")
    out.extend(seen)

    quantiles: list[str] = []
    histogram: list[str] = []
    q_name, h_name = "edge_inference_latency_quantiles_seconds", "edge_inference_latency_seconds"
    for s in data.latency:
        if (s.device_id, s.bundle_name, s.version) not in installed:
            continue
        labels = f'device="{s.device_id}",bundle="{s.bundle_name}",version="{s.version}"'
        total = _value(s.mean_ms / 1000.0 * s.count)
        count = _value(s.count)
        for q, ms in sorted(s.quantiles_ms.items()):
            quantiles.append(f'{q_name}{{{labels},quantile="{q!r}"}} {_value(ms / 1000.0)}\n')
        quantiles.append(f"{q_name}_count{{{labels}}} {count}\n{q_name}_sum{{{labels}}} {total}\n")
        per_sample = s.count / len(s.samples_ms)
        samples = s.samples_ms
        for le, bound in zip(_LE, _BOUNDS_MS, strict=True):
            below = float(round(bisect.bisect_right(samples, bound) * per_sample))
            histogram.append(f'{h_name}_bucket{{{labels},le="{le}"}} {below!r}\n')
        histogram.append(
            f'{h_name}_bucket{{{labels},le="+Inf"}} {count}\n{h_name}_count{{{labels}}} {count}\n'
            f"{h_name}_sum{{{labels}}} {total}\n"
        )
    _family(out, q_name, "summary", "Inference latency quantiles (0.5, 0.9, 0.99) of the installed version, as the "
            "device computed them for its latest report.")  # fmt: skip
    out.extend(quantiles)
    _family(out, h_name, "histogram", "Inference latency of the installed version in the device's latest report "
            "(buckets from its kept samples).")  # fmt: skip
    out.extend(histogram)

    _family(out, "edge_model_memory_peak_bytes", "gauge", "Peak memory while the installed version ran.")
    for device_id, bundle, version, peak in data.memory:
        if (device_id, bundle, version) in installed:
            add(f'edge_model_memory_peak_bytes{{device="{device_id}",bundle="{bundle}",version="{version}"}} '
                f"{_value(peak)}\n")  # fmt: skip

    power: list[str] = []
    energy: list[str] = []
    for e in data.energy:
        if (e.device_id, e.bundle_name, e.version) not in installed:
            continue
        labels = (
            f'device="{e.device_id}",bundle="{e.bundle_name}",version="{e.version}",'
            f'estimated="{"true" if e.estimated else "false"}"'
        )
        energy.append(f"edge_energy_per_inference_joules{{{labels}}} {_value(e.joules_per_inference)}\n")
        if e.watts is not None:
            power.append(f"edge_power_watts{{{labels}}} {_value(e.watts)}\n")
    _family(out, "edge_power_watts", "gauge", "Mean power over the benchmark window.")
    out.extend(power)
    _family(out, "edge_energy_per_inference_joules", "gauge",
            "Energy per inference; estimated=true where a power model gave it, not a sensor.")  # fmt: skip
    out.extend(energy)

    _family(out, "edge_rollout_devices", "gauge", "Devices of each rollout by state.")
    for r in data.rollouts:
        if not _ROLLOUT_BUNDLE_RE.fullmatch(r.bundle):
            skipped += 1
            continue
        for state, n in sorted(r.devices.items()):
            add(f'edge_rollout_devices{{rollout="{r.rollout}",bundle="{r.bundle}",state="{state}"}} {_value(n)}\n')

    _family(out, "edge_collector_dropped_messages_total", "counter", "Device messages the host dropped or refused "
            "(bad signature, replayed, unknown device...), by reason.")  # fmt: skip
    for device_id, reasons in sorted(data.drops.items()):
        if device_id != UNKNOWN_DEVICE and not _DEVICE_RE.fullmatch(device_id):
            skipped += 1
            continue
        for reason, n in sorted(reasons.items()):
            if _REASON_RE.fullmatch(reason):
                add(f'edge_collector_dropped_messages_total{{device="{device_id}",reason="{reason}"}} {_value(n)}\n')
            else:
                skipped += 1
    _family(out, "edge_exporter_skipped_series_total", "counter",
            "Series left out because a label value failed its check.")  # fmt: skip
    add(f"edge_exporter_skipped_series_total {_value(skipped)}\n")
    return "".join(out).encode("utf-8")


class FleetExporter:
    """One scrape's body, rendered from a read of the registry and kept while it is current.

    A kept body serves a scrape when it is younger than ``cache_s``, or when the registry has
    not changed since it was read (``changed`` returns the token it returned then). The body
    depends on the registry's contents only (no clock), so an unchanged registry means an
    unchanged body.

    Args:
        read: returns the fleet's data now (the shell opens the registry inside it).
        cache_s: serve a rendered body for this long whatever changed (0: only while unchanged).
        clock: monotonic clock, for the cache.
        changed: returns a token that differs after every write to the registry
            (:func:`host_tools.fleet.registry.change_token`), or ``None`` when it cannot tell.
    """

    def __init__(
        self, read: Callable[[], FleetData], cache_s: float = 0.0, clock: Callable[[], float] = time.monotonic,
        changed: Callable[[], Hashable | None] | None = None,
    ):  # fmt: skip
        self._read = read
        self._cache_s = cache_s
        self._clock = clock
        self._changed = changed
        self._lock = threading.Lock()
        self._cached: tuple[float, Hashable | None, bytes] | None = None

    def body(self) -> bytes:
        """The body of a scrape now.

        Raises:
            StorageError: the registry cannot be read (the scrape fails; the next one tries again).
        """
        with self._lock:  # concurrent scrapes wait for one read, not one read each
            now = self._clock()
            token = self._changed() if self._changed is not None else None
            kept = self._cached
            if kept is not None and (now - kept[0] < self._cache_s or (token is not None and token == kept[1])):
                return kept[2]
            body = exposition(self._read())  # the token was taken first: a write during the read shows next time
            self._cached = (now, token, body)
            return body


def registry_reader(registry_url: str, clock: Callable[[], float] = time.time) -> Callable[[], FleetData]:
    """A reader that opens the registry, reads the present state of the fleet, and closes it.

    Each scrape runs on one of the HTTP server's threads; a registry connection belongs to
    one thread, so each read opens its own. The reports decoded by one read are kept for the
    next (a stored report never changes): after a write, only the new reports are decoded.
    Reads must not overlap (:class:`FleetExporter` holds a lock around them).
    """
    decoded: dict[Any, dict[str, Any]] = {}

    def read() -> FleetData:
        with open_registry(registry_url) as reg:
            return read_fleet(reg, clock(), history=False, decoded=decoded)

    return read


def _handler(exporter: FleetExporter) -> type[BaseHTTPRequestHandler]:
    class MetricsHandler(BaseHTTPRequestHandler):
        """``GET /metrics`` (and ``/``): the body; a registry that cannot be read: 503, said in the log."""

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self._send(404, b"not found: the metrics are at /metrics\n", "text/plain; charset=utf-8")
                return
            try:
                body = exporter.body()
            except EdgeError as exc:
                logger.warning("scrape failed: %s", exc.message)
                self._send(503, b"the registry cannot be read; see the exporter's log\n", "text/plain; charset=utf-8")
                return
            self._send(200, body, CONTENT_TYPE)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            logger.debug("%s " + format, self.address_string(), *args)

    return MetricsHandler


def serve_exporter(
    registry_url: str, host: str, port: int, stop: threading.Event, cache_s: float = 5.0,
    ready: Callable[[str], None] | None = None,
) -> None:  # fmt: skip
    """Serve ``/metrics`` on ``host:port`` until ``stop`` is set.

    Raises:
        StorageError: the registry cannot be read at start (read once before serving).
        OSError: the port cannot be bound.
    """
    exporter = FleetExporter(registry_reader(registry_url), cache_s, changed=lambda: change_token(registry_url))
    exporter.body()  # read once before serving: a registry that cannot be read fails here, and the first scrape is fast
    server = ThreadingHTTPServer((host, port), _handler(exporter))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="exporter-http", daemon=True)
    thread.start()
    try:
        if ready is not None:
            ready(f"http://{host}:{server.server_port}/metrics")
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
