"""What the report and the exporter read from the registry, in one place.

Every renderer of fleet data (:mod:`host_tools.report.plots`, :mod:`host_tools.report.html`,
:mod:`host_tools.report.exporter`) reads through :func:`read_fleet`, which turns registry rows
into plain frozen values: the fleet table, latency samples per device and model version,
energy per inference, deployment and rollout events, compression variants. When the
registry grows (device labels, a ``stale`` state, rollout tables), only this module changes.

Sources that a registry may not have yet are read when present and reported absent
otherwise (:attr:`FleetData.rollouts_known`), so a renderer can show an empty, labelled
section instead of guessing: rollout waves and rollbacks come from a registry method
``rollout_events(since)`` when it exists; device labels and states from the device
records' ``labels`` and ``state`` attributes when they have them.

Latency distributions come from the samples a metrics report carries
(``latency.samples_ms``, bounded, evenly spaced quantiles); a report from an agent that sent
only percentiles is drawn from its min, p50, p90, p99 and max, and says so
(:attr:`LatencySeries.from_percentiles`).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_sdk.errors import ConfigError
from edge_sdk.protocol.topics import check_device_id
from host_tools.fleet.registry import DeploymentRecord, DeviceRecord, Registry, RunRecord

__all__ = [
    "CompressionVariant",
    "DeviceRow",
    "EnergyPoint",
    "FleetData",
    "LatencySeries",
    "RolloutProgress",
    "TimelineEvent",
    "parse_devices",
    "parse_since",
    "read_fleet",
]

#: Labels a selector may name: the same charset as device ids, so no free text reaches a label.
_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_AGE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw])")
_AGE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
#: Deployment states as timeline events.
_DEPLOYMENT_EVENTS = {"installed": "success", "failed": "failure", "refused": "failure", "deferred": "deferral"}


@dataclass(frozen=True)
class DeviceRow:
    """One device in the fleet table.

    Args:
        device_id: the device.
        broker: the broker it was seen on.
        state: ``online``, ``stale`` or ``offline`` (``stale`` where the registry knows it).
        labels: its labels (empty where the registry keeps none).
        versions: bundle name -> installed version.
        last_seen: unix seconds.
        p99_ms: the p99 latency of its latest report for an installed version, if any.
    """

    device_id: str
    broker: str
    state: str
    labels: Mapping[str, str]
    versions: Mapping[str, int]
    last_seen: float
    p99_ms: float | None


@dataclass(frozen=True)
class LatencySeries:
    """The latency distribution of one model version on one device (its latest report).

    Args:
        device_id, bundle_name, version: what ran where.
        samples_ms: the kept samples, ascending (each stands for ``count / len`` runs).
        from_percentiles: the report carried no samples; ``samples_ms`` is min, p50, p90, p99, max.
        count: timed runs behind the report.
        quantiles_ms: ``{0.5: p50, 0.9: p90, 0.99: p99}`` as the device computed them.
        received_at: when the host got the report.
        mean_ms: the mean of every timed run.
    """

    device_id: str
    bundle_name: str
    version: int
    samples_ms: tuple[float, ...]
    from_percentiles: bool
    count: int
    quantiles_ms: Mapping[float, float]
    received_at: float
    mean_ms: float

    @property
    def model(self) -> str:
        """``name vN``, as plots label a model version."""
        return f"{self.bundle_name} v{self.version}"


@dataclass(frozen=True)
class EnergyPoint:
    """Energy per inference of one model version on one device, and whether it was measured.

    Args:
        device_id, bundle_name, version: what ran where.
        joules_per_inference: energy per inference.
        watts: mean power over the window, when known.
        estimated: computed from a power model, not measured by a sensor.
        source: the power source's name.
    """

    device_id: str
    bundle_name: str
    version: int
    joules_per_inference: float
    watts: float | None
    estimated: bool
    source: str


@dataclass(frozen=True)
class TimelineEvent:
    """One event on the rollout timeline.

    Args:
        at: unix seconds.
        kind: ``wave``, ``success``, ``failure``, ``deferral`` or ``rollback``.
        device_id: the device, or ``""`` for a rollout-wide event (a wave).
        bundle: ``name vN``.
        rollout: the rollout's id, or ``""`` for a deploy outside any rollout.
    """

    at: float
    kind: str
    device_id: str
    bundle: str
    rollout: str = ""


@dataclass(frozen=True)
class RolloutProgress:
    """How far one rollout has come, where the registry keeps rollouts.

    Args:
        rollout: its id.
        bundle: ``name vN``.
        devices: state -> device count (``pending``, ``installed``, ``failed``...).
    """

    rollout: str
    bundle: str
    devices: Mapping[str, int]


@dataclass(frozen=True)
class CompressionVariant:
    """One kept compression run, as a point of accuracy vs size vs on-device latency.

    Args:
        run_id: the compress run.
        label: what it did (its options, short).
        size_bytes: the output model's size.
        quality: its quality figure, if measured.
        quality_metric: which figure.
        host_p50_ms: median latency on the host that compressed it.
        device_p50_ms: median of the p50 latencies measured on devices running a bundle that
            holds this model (matched by sha256), if any were profiled or deployed.
    """

    run_id: int
    label: str
    size_bytes: int
    quality: float | None
    quality_metric: str | None
    host_p50_ms: float | None
    device_p50_ms: float | None


@dataclass(frozen=True)
class FleetData:
    """Everything the report draws, read once.

    Args:
        generated_at: unix seconds the data was read.
        devices: the fleet table rows.
        latency: one series per (device, model version).
        energy: one point per (device, model version) whose report had figures.
        timeline: deployment and rollout events, oldest first.
        rollouts_known: whether the registry keeps rollouts (waves, rollbacks).
        variants: compression runs.
        drops: collector drops, device -> reason -> count.
        notes: what the data lacks, in words, for the report to say.
        rollouts: progress of each rollout, where the registry keeps rollouts (else empty).
        memory: (device, bundle, version, peak bytes) per report that measured memory.
    """

    generated_at: float
    devices: tuple[DeviceRow, ...]
    latency: tuple[LatencySeries, ...]
    energy: tuple[EnergyPoint, ...]
    timeline: tuple[TimelineEvent, ...]
    rollouts_known: bool
    variants: tuple[CompressionVariant, ...]
    drops: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    rollouts: tuple[RolloutProgress, ...] = ()
    memory: tuple[tuple[str, str, int, float], ...] = ()


# --- parsing the options --------------------------------------------------------------


def parse_since(text: str, now: float) -> float:
    """``--since``: unix seconds, an ISO date or date-time (UTC unless it names a zone), or an age.

    Args:
        text: ``1733200000``, ``2026-12-01``, ``2026-12-01T08:00+01:00``, ``90m``, ``12h``, ``7d``, ``2w``.
        now: unix seconds, for ages.

    Returns:
        Unix seconds.

    Raises:
        ValueError: none of those.
    """
    text = text.strip()
    if match := _AGE_RE.fullmatch(text):
        return now - float(match.group(1)) * _AGE_UNITS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(
            f"{text!r} is not a time: give unix seconds, an ISO date/time or an age (90m, 12h, 7d)"
        ) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def parse_devices(selector: str) -> Callable[[str, Mapping[str, str]], bool]:
    """``--devices``: comma-separated terms, any of which selects a device.

    A term is a device id glob (``pi-*``, ``cam-0[1-4]``) or ``label=value`` (``site=berlin``;
    ``value`` may be a glob too). Terms use the device-id charset plus the glob characters.

    Returns:
        A predicate on (device id, labels).

    Raises:
        ConfigError: an empty selector or a term with other characters.
    """
    terms = [t.strip() for t in selector.split(",") if t.strip()]
    if not terms:
        raise ConfigError("--devices needs at least one device id, glob or label=value")
    globs: list[str] = []
    labels: list[tuple[str, str]] = []
    for term in terms:
        key, eq, value = term.partition("=")
        pattern = value if eq else key
        if (eq and not _LABEL_RE.fullmatch(key)) or not re.fullmatch(r"[A-Za-z0-9_.*?\[\]!-]{1,64}", pattern):
            raise ConfigError(
                f"--devices term {term!r}: use a device id glob or label=value (letters, digits, _.-*?[])"
            )
        if eq:
            labels.append((key, value))
        else:
            globs.append(key)

    def selected(device_id: str, device_labels: Mapping[str, str]) -> bool:
        return any(fnmatch.fnmatchcase(device_id, g) for g in globs) or any(
            k in device_labels and fnmatch.fnmatchcase(device_labels[k], v) for k, v in labels
        )

    return selected


# --- reading ----------------------------------------------------------------------------


def _labels(record: DeviceRecord) -> dict[str, str]:
    """The device's labels where the registry keeps them; only those with a safe key and value."""
    raw = getattr(record, "labels", None)
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): str(v) for k, v in raw.items() if _LABEL_RE.fullmatch(str(k)) and _LABEL_RE.fullmatch(str(v))}


def _state(record: DeviceRecord) -> str:
    state = getattr(record, "state", None)
    return state if isinstance(state, str) and state in ("online", "stale", "offline") else record.status


#: A stored report as :meth:`Registry.latest_metrics_json` returns it.
_Stored = tuple[str, str, int, float, dict[str, Any]]


def _num(value: object) -> float | None:
    """A finite, non-negative number, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        return None
    return float(value)


_SAMPLE_TYPES = frozenset({float, int})


def _samples(raw: object) -> tuple[float, ...]:
    """Stored samples, if they are a list of finite non-negative numbers (else none), ascending."""
    # Checked with set and min/max over the list (C loops): a generator over 640,000 samples
    # of a 10,000-report fleet cost half a second. bool is its own type, so it is refused.
    if not isinstance(raw, list) or not raw or not _SAMPLE_TYPES.issuperset(map(type, raw)):
        return ()
    if min(raw) < 0 or not math.isfinite(max(raw)):
        return ()
    return tuple(sorted(raw))


def _latency(report: Mapping[str, Any]) -> Mapping[str, Any] | None:
    lat = report.get("latency")
    if not isinstance(lat, Mapping) or not lat:
        return None
    needed = ("min_ms", "max_ms", "p50_ms", "p90_ms", "p99_ms")
    return lat if all(_num(lat.get(k)) is not None for k in needed) else None


def _series(stored: _Stored) -> LatencySeries | None:
    device_id, bundle, version, received_at, report = stored
    lat = _latency(report)
    if lat is None:
        return None
    quantiles = {0.5: float(lat["p50_ms"]), 0.9: float(lat["p90_ms"]), 0.99: float(lat["p99_ms"])}
    kept = _samples(lat.get("samples_ms"))
    if kept:
        samples, from_percentiles = kept, False
    else:
        samples = tuple(float(lat[k]) for k in ("min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms"))
        from_percentiles = True
    count = lat.get("count")
    count = count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else len(samples)
    mean = _num(lat.get("mean_ms"))
    return LatencySeries(
        device_id, bundle, version, samples, from_percentiles, count, quantiles, received_at,
        mean if mean is not None else sum(samples) / len(samples),
    )  # fmt: skip


def _energy(stored: _Stored) -> EnergyPoint | None:
    device_id, bundle, version, _, report = stored
    power = report.get("power")
    if not isinstance(power, Mapping) or _num(power.get("joules_per_inference")) is None:
        return None
    estimated = power.get("estimated")
    return EnergyPoint(
        device_id, bundle, version, float(power["joules_per_inference"]), _num(power.get("watts")),
        estimated is not False, str(power.get("source") or ""),
    )  # fmt: skip


def memory_bytes(report: Mapping[str, Any]) -> float | None:
    """The peak memory a stored report gives (``memory.peak_bytes``), if any."""
    memory = report.get("memory")
    return _num(memory.get("peak_bytes")) if isinstance(memory, Mapping) else None


def _deployment_event(d: DeploymentRecord) -> TimelineEvent | None:
    kind = _DEPLOYMENT_EVENTS.get(d.state)
    if kind is None:
        return None
    return TimelineEvent(d.finished_at or d.started_at, kind, d.device_id, f"{d.bundle_name} v{d.bundle_version}")


def _rollout_events(registry: Registry, since: float | None) -> tuple[list[TimelineEvent], bool]:
    """Rollout waves, outcomes and rollbacks, where the registry keeps rollouts."""
    reader = getattr(registry, "rollout_events", None)
    if reader is None:
        return [], False
    events = []
    for e in reader(since):
        get = e.get if isinstance(e, Mapping) else lambda k, o=e: getattr(o, k, None)
        kind, at = str(get("kind")), _num(get("at"))
        if kind in ("wave", "success", "failure", "deferral", "rollback") and at is not None:
            events.append(
                TimelineEvent(at, kind, str(get("device_id") or ""), str(get("bundle") or ""),
                              str(get("rollout") or ""))
            )  # fmt: skip
    return events, True


def _rollout_progress(registry: Registry) -> list[RolloutProgress]:
    """Each rollout's device counts by state, from a registry method ``rollout_progress()`` when it has one."""
    reader = getattr(registry, "rollout_progress", None)
    if reader is None:
        return []
    out = []
    for p in reader():
        get = p.get if isinstance(p, Mapping) else lambda k, o=p: getattr(o, k, None)
        rollout, devices = str(get("rollout") or get("id") or ""), get("devices")
        if _LABEL_RE.fullmatch(rollout) and isinstance(devices, Mapping):
            counts = {str(k): int(v) for k, v in devices.items() if _LABEL_RE.fullmatch(str(k)) and isinstance(v, int)}
            out.append(RolloutProgress(rollout, str(get("bundle") or ""), counts))
    return out


def _variants(runs: Sequence[RunRecord]) -> list[CompressionVariant]:
    """Compression runs with the on-device latency of bundles that carried their output model."""
    device_p50: dict[str, list[float]] = {}
    for run in runs:
        if run.kind == "compress":
            continue
        bundle = run.parameters.get("bundle")
        files = bundle.get("files", []) if isinstance(bundle, Mapping) else []
        p50s = [
            float(o["metrics"]["latency"]["p50_ms"])
            for o in run.results.get("outcomes", [])
            if isinstance(o, Mapping)
            and isinstance(o.get("metrics"), Mapping)
            and isinstance(o["metrics"].get("latency"), Mapping)
            and isinstance(o["metrics"]["latency"].get("p50_ms"), (int, float))
        ]
        for f in files:
            if isinstance(f, Mapping) and isinstance(f.get("sha256"), str):
                device_p50.setdefault(f["sha256"], []).extend(p50s)
    out = []
    for run in runs:
        if run.kind != "compress":
            continue
        report = run.results.get("report")
        final = report.get("final") if isinstance(report, Mapping) else None
        if not isinstance(final, Mapping) or not isinstance(final.get("size_bytes"), int):
            continue
        output = run.parameters.get("output")
        sha = output.get("sha256") if isinstance(output, Mapping) else None
        measured = device_p50.get(sha, []) if isinstance(sha, str) else []
        options = run.parameters.get("options")
        label = ",".join(f"{k}={v}" for k, v in sorted(options.items())) if isinstance(options, Mapping) else ""
        out.append(
            CompressionVariant(
                run.id, label or f"run {run.id}", final["size_bytes"], _number(final.get("quality")),
                final.get("quality_metric") if isinstance(final.get("quality_metric"), str) else None,
                _number(final.get("latency_p50_ms")), statistics.median(measured) if measured else None,
            )
        )  # fmt: skip
    return out


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _select(
    devices: Iterable[DeviceRecord], selected: Callable[[str, Mapping[str, str]], bool] | None
) -> list[DeviceRecord]:
    return [d for d in devices if selected is None or selected(d.device_id, _labels(d))]


def read_fleet(
    registry: Registry,
    now: float,
    since: float | None = None,
    devices: Callable[[str, Mapping[str, str]], bool] | None = None,
    *,
    run_limit: int = 1000,
    history: bool = True,
    decoded: MutableMapping[Any, dict[str, Any]] | None = None,
) -> FleetData:
    """Read what the report and the exporter show.

    Args:
        registry: the registry.
        now: unix seconds, the report's time.
        since: only metrics, events and runs from this time on (the fleet table shows every selected device).
        devices: a predicate from :func:`parse_devices`; every device when ``None``.
        run_limit: newest compression, profile and deploy runs read.
        history: read the timeline, the kept runs and the reports of versions no longer installed too
            (the exporter shows only the present).
        decoded: without history, reports decoded by an earlier read, kept by the caller between
            reads (:meth:`Registry.latest_metrics_json`): only reports stored since are decoded.

    Returns:
        The data, ordered by device id, model, time.

    Raises:
        StorageError: the registry cannot be read.
    """
    records = _select(registry.list_devices(), devices)
    wanted = {d.device_id for d in records}
    installed = None if history else {(d.device_id, b.name, b.version) for d in records for b in d.active_bundles or ()}
    stored = registry.latest_metrics_json(installed, decoded)
    metrics = [m for m in stored if m[0] in wanted and (since is None or m[3] >= since)]
    latency = [s for m in metrics if (s := _series(m)) is not None]
    energy = [e for m in metrics if (e := _energy(m)) is not None]
    p99 = {(s.device_id, s.bundle_name, s.version): s.quantiles_ms[0.99] for s in latency}
    rows = []
    for d in records:
        p99s = [p99[key] for b in d.active_bundles or () if (key := (d.device_id, b.name, b.version)) in p99]
        rows.append(
            DeviceRow(
                d.device_id, d.broker, _state(d), _labels(d), {b.name: b.version for b in d.active_bundles or ()},
                d.last_seen, max(p99s) if p99s else None,
            )
        )  # fmt: skip
    timeline = [
        event
        for d in (registry.list_deployments(limit=100_000) if history else ())
        if d.device_id in wanted and (since is None or d.started_at >= since) and (event := _deployment_event(d))
    ]
    rollout_events, rollouts_known = _rollout_events(registry, since) if history else ([], False)
    timeline.extend(e for e in rollout_events if not e.device_id or e.device_id in wanted)
    timeline.sort(key=lambda e: (e.at, e.kind, e.device_id))
    runs = registry.list_runs(since=since, limit=run_limit) if history else []
    notes = []
    if any(s.from_percentiles for s in latency):
        n = sum(s.from_percentiles for s in latency)
        notes.append(f"{n} of {len(latency)} latency series came from agents that sent percentiles only")
    if not rollouts_known:
        notes.append("this registry keeps no rollouts yet: the timeline shows deployments only")
    return FleetData(
        generated_at=now, devices=tuple(rows), latency=tuple(latency), energy=tuple(energy),
        timeline=tuple(timeline), rollouts_known=rollouts_known, variants=tuple(_variants(runs)),
        drops=registry.drop_counts(), notes=tuple(notes), rollouts=tuple(_rollout_progress(registry)),
        memory=tuple((m[0], m[1], m[2], peak) for m in metrics if (peak := memory_bytes(m[4])) is not None),
    )  # fmt: skip


def checked_device_id(device_id: str) -> str:
    """A device id fit for a metric label (the registry's are checked when recorded; checked again here)."""
    return check_device_id(device_id)
