"""What the fleet commands print: devices, metrics reports, deploy and profile outcomes,
and the device's answer to a command.

Every function here takes values and returns text or a JSON-ready dict; none reads a
file, the registry or the network.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any

from host_tools.report.table import Column, format_bytes, render_table

if TYPE_CHECKING:
    from edge_sdk.metrics import PowerMeasurement
    from edge_sdk.protocol import Event, MetricsReport
    from host_tools.fleet.deployer import DeployOutcome
    from host_tools.fleet.inventory import DeviceView
    from host_tools.fleet.profiler import ProfileOutcome
    from host_tools.fleet.registry import DeviceRow, EnrolmentRecord, ForgetResult, GroupRecord

__all__ = [
    "collect_line",
    "collect_text",
    "command_data",
    "command_text",
    "deploy_data",
    "deploy_many_data",
    "deploy_many_text",
    "deploy_text",
    "device_data",
    "device_row_json",
    "devices_data",
    "devices_text",
    "enrolments_data",
    "enrolments_text",
    "forget_text",
    "groups_text",
    "labels_cell",
    "labels_text",
    "local_time",
    "metrics_table",
    "metrics_text",
    "outcome_data",
    "power_cell",
    "profile_text",
    "refusal_text",
    "seen_text",
]

#: What a renderer prints where a measurement had too little data to mean anything.
TOO_SHORT = "n/a (too short)"


def power_cell(power: PowerMeasurement | None) -> str | None:
    """``1.23 W``, with ``(estimated)`` unless a sensor measured it; ``None`` without a reading;
    ``n/a (too short)`` when the window held too little data for a figure."""
    if power is None:
        return None
    if power.watts is None:
        return TOO_SHORT
    label = " (estimated)" if power.estimated else ""
    return f"{power.watts:.2f} W{label}"


def measured_on(report: MetricsReport) -> str | None:
    """The machine a report was measured on: ``aarch64``, or ``aarch64 (emulated)`` when the
    device ran under qemu-user (its latency is the emulator's, not the board's); None when
    an older agent did not say."""
    if not report.arch:
        return "emulated" if report.emulated else None
    return f"{report.arch} (emulated)" if report.emulated else report.arch


def metrics_table(reports: Sequence[MetricsReport]) -> str:
    """One line per metrics report: latency, throughput, memory, power (``-`` where not measured).

    Args:
        reports: the reports, in the order to print them.

    Returns:
        The table.
    """
    return render_table(
        [
            Column("device", lambda r: r.device_id),
            Column("bundle", lambda r: f"{r.bundle_name} v{r.bundle_version}"),
            Column("runtime", lambda r: f"{r.runtime} {r.precision} x{r.threads}"),
            Column("measured on", measured_on),
            Column("p50 ms", lambda r: None if r.latency is None else f"{r.latency.p50_ms:.3f}", ">"),
            Column("p90 ms", lambda r: None if r.latency is None else f"{r.latency.p90_ms:.3f}", ">"),
            Column("p99 ms", lambda r: None if r.latency is None else f"{r.latency.p99_ms:.3f}", ">"),
            Column("inf/s", lambda r: None if r.latency is None else f"{r.latency.throughput_per_s:.0f}", ">"),
            Column("peak RSS", lambda r: format_bytes(None if r.memory is None else r.memory.peak_bytes), ">"),
            Column("power", lambda r: power_cell(r.power), ">"),
        ],
        reports,
    )


def metrics_text(reports: Sequence[MetricsReport]) -> str:
    """``edgectl metrics``: the table, or a line saying there is nothing yet."""
    return metrics_table(reports) if reports else "no metrics recorded"


def ago_text(seconds: float) -> str:
    """How long ago, for people: ``just now``, ``42 s ago``, ``3 min ago``, ``5 h ago``, ``2 days ago``."""
    if seconds < 0:
        return "in the future (clock skew)"
    if seconds < 5:
        return "just now"
    for limit, unit, size in ((60, "s", 1), (3600, "min", 60), (86400, "h", 3600)):
        if seconds < limit:
            return f"{int(seconds // size)} {unit} ago"
    days = int(seconds // 86400)
    return f"{days} day{'s' if days != 1 else ''} ago"


def seen_text(ts: float, now: float) -> str:
    """A moment for people: ``2026-12-03 07:45:12 UTC (3 min ago)``.

    Args:
        ts: unix seconds.
        now: unix seconds now, for the "ago".

    Returns:
        The text.
    """
    return f"{_utc_stamp(math.floor(ts))} ({ago_text(now - ts)})"


@functools.lru_cache(maxsize=1024)
def _utc_stamp(second: int) -> str:
    """``2026-12-03 07:45:12 UTC``, formatted once per second that many devices share."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(second))


def status_cell(view: DeviceView, now: float) -> str:
    """The state (``online``, ``stale``, ``offline``) when the listing read the registry only;
    with a broker read: ``online``/``offline`` when it said so just now, else the last known
    state, labelled."""
    if not view.checked_broker:
        return view.state
    if view.confirmed:
        return view.record.status
    return f"{view.record.status} as of {ago_text(now - view.record.last_seen)}"


def labels_cell(view: DeviceView) -> str | None:
    """``hw=pi5, site=depot-4*``: every effective label, ``*`` marking the operator's."""
    labels = view.labels
    if not labels:
        return None
    return ", ".join(f"{k}={v}{'*' if k in view.operator_labels else ''}" for k, v in sorted(labels.items()))


def _bundles_cell(view: DeviceView) -> str | None:
    bundles = view.record.active_bundles
    if not bundles:
        return None
    return ", ".join(f"{b.name} v{b.version}" for b in bundles)


def local_time(t: object) -> str:
    """Unix seconds as local time, or ``?`` for anything that is not a plausible time (never raises)."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 4_102_444_800:
        return "?"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, OSError, ValueError):
        return "?"


def _drops_cell(drops: Mapping[str, int] | None) -> str | None:
    if not drops:
        return None
    return ", ".join(f"{reason} {n}" for reason, n in sorted(drops.items()))


def devices_text(
    views: Sequence[DeviceView],
    now: float,
    drops: Mapping[str, Mapping[str, int]] | None = None,
    pending: int = 0,
) -> str:
    """``edgectl devices``: one line per device and broker it was seen on, or a line saying there is none.

    Args:
        views: the devices, with whether this command confirmed their status.
        now: unix seconds now.
        drops: device id (``*`` for devices the host does not know) -> reason -> messages dropped.
        pending: how many devices wait for enrolment.

    Returns:
        The table: every active bundle, the broker, ``last seen`` in UTC with its age, and
        a status that is plainly ``online`` only when the broker said so just now; a
        footnote explains the others; lines about dropped messages and pending devices.
    """
    drops = drops or {}
    lines = []
    unknown = _drops_cell(drops.get("*"))
    if unknown:
        lines.append(f"dropped from unknown devices: {unknown}")
    if pending:
        lines.append(f"{pending} device(s) wait for enrolment: edgectl devices enroll")
    if not views:
        return "\n".join(["no devices known", *lines])
    any_drops = any(drops.get(v.record.device_id) for v in views)
    table = render_table(
        [
            Column("device", lambda v: v.record.device_id),
            Column("broker", lambda v: v.record.broker or "unknown"),
            Column("status", lambda v: status_cell(v, now)),
            Column("platform", lambda v: (v.record.platform or {}).get("kind")),
            Column("arch", lambda v: (v.record.platform or {}).get("arch")),
            Column("memory", lambda v: format_bytes((v.record.platform or {}).get("memory_bytes")), ">"),
            Column("runtimes", lambda v: ", ".join(v.record.runtimes or {})),
            Column("active", _bundles_cell),
            Column("labels", labels_cell),
            Column("last seen", lambda v: seen_text(v.record.last_seen, now)),
            *([Column("dropped", lambda v: _drops_cell(drops.get(v.record.device_id)))] if any_drops else []),
        ],
        views,
    )
    if any(v.operator_labels for v in views):
        table += "\n\n* set by the operator (edgectl devices label), overriding the device's own"
    if views[0].checked_broker and not all(v.confirmed for v in views):
        table += (
            '\n\n"... as of" is the last status recorded, not confirmed now: the device was seen on '
            f"another broker, or its broker no longer holds its status (checked {views[0].checked_broker})"
        )
    return "\n".join([table, *lines])


def devices_data(
    views: Sequence[DeviceView], now: float, drops: Mapping[str, Mapping[str, int]] | None = None
) -> list[dict[str, Any]]:
    """The JSON ``edgectl devices`` prints: each view's dict, ``last_seen_text`` for people, and
    ``dropped``: reason -> messages dropped from that device."""
    return [device_data(v, now, drops) for v in views]


def device_data(view: DeviceView, now: float, drops: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, Any]:
    """One device as ``edgectl devices --json`` prints it (see :func:`devices_data`)."""
    return {
        **view.to_dict(),
        "last_seen_text": seen_text(view.record.last_seen, now),
        "dropped": dict((drops or {}).get(view.record.device_id, {})),
    }


def device_row_json(
    row: DeviceRow,
    state: str,
    operator_labels: Mapping[str, str],
    now: float,
    drops: Mapping[str, Mapping[str, int]] | None = None,
) -> str:
    """One device as ``edgectl devices --json`` prints it, written from its stored row.

    The same text, byte for byte, as ``json.dumps(device_data(view, now, drops), ensure_ascii=True)``
    for the view the row makes (listed from the registry, no broker read), without
    building the record, the view and the dict: the row's JSON columns are re-encoded once
    per distinct text (many devices report alike), and the rest is spliced in.

    Args:
        row: the row, as :meth:`~host_tools.fleet.registry.Registry.iter_device_rows` checked it.
        state: its state now (``online``, ``stale``, ``offline``).
        operator_labels: the labels the operator set on it.
        now: unix seconds now, for ``last_seen_text``.
        drops: device id -> reason -> messages dropped.

    Returns:
        The device's JSON object, one line.
    """
    text = encode_basestring_ascii
    status = text(row.status)
    active_bundles, active_bundle = _bundles_json(row.active_bundles)
    if operator_labels:
        device_labels, labels, sources = _merged_labels_json(row.device_labels(), operator_labels)
        operator = _dumps(dict(operator_labels))
    else:
        device_labels, labels, sources = _own_labels_json(row.labels)
        operator = "{}"
    dropped = (drops or {}).get(row.device_id)
    return (
        f'{{"device_id": {text(row.device_id)}, "broker": {text(row.broker)}, "status": {status}, '
        f'"platform": {_object_json(row.platform)}, "runtimes": {_object_json(row.runtimes)}, '
        f'"agent_version": {"null" if row.agent_version is None else text(row.agent_version)}, '
        f'"active_bundles": {active_bundles}, "active_bundle": {active_bundle}, '
        f'"first_seen": {_number_json(row.first_seen)}, "last_seen": {_number_json(row.last_seen)}, '
        f'"device_labels": {device_labels}, "heartbeat_s": {_interval_json(row.heartbeat_s)}, '
        f'"last_heard": {_number_json(row.last_heard)}, "last_status": {status}, "status_confirmed": false, '
        f'"state": {text(state)}, "labels": {labels}, "label_sources": {sources}, "operator_labels": {operator}, '
        f'"last_seen_text": {text(seen_text(row.last_seen, now))}, '
        f'"dropped": {_dumps(dict(dropped)) if dropped else "{}"}}}'
    )


def _dumps(value: object) -> str:
    """What ``edgectl devices --json`` writes for a value (see ``_print_json_stream`` in the CLI)."""
    return json.dumps(value, default=str, ensure_ascii=True)


def _number_json(value: object) -> str:
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)  # what json writes for a finite float
    return "null" if value is None else _dumps(value)


@functools.lru_cache(maxsize=256, typed=True)  # typed: 60 and 60.0 are written differently
def _interval_json(value: object) -> str:
    """A heartbeat interval, which most devices share, encoded once per value."""
    return _number_json(value)


@functools.lru_cache(maxsize=4096)
def _object_json(stored: str | None) -> str:
    """A stored JSON column (checked when read) as the listing writes it, once per distinct text."""
    return "null" if stored is None else _dumps(json.loads(stored))


@functools.lru_cache(maxsize=4096)
def _bundles_json(stored: str | None) -> tuple[str, str]:
    """``active_bundles`` and ``active_bundle`` (see DeviceRecord.to_dict), once per distinct text."""
    from host_tools.fleet.registry import stored_bundles  # the registry's reading of the column

    if stored is None:
        return "null", "null"
    refs = stored_bundles(stored)
    listed = _dumps([{"name": b.name, "version": b.version} for b in refs])
    return listed, _dumps(refs[0].to_dict()) if refs else "null"


@functools.lru_cache(maxsize=4096)
def _own_labels_json(stored: str | None) -> tuple[str, str, str]:
    """``device_labels``, ``labels`` and ``label_sources`` of a device the operator labelled not."""
    if stored is None:
        return "null", "{}", "{}"
    own = json.loads(stored)
    return _merged_labels_json(own, {})


def _merged_labels_json(own: Mapping[str, str] | None, operator: Mapping[str, str]) -> tuple[str, str, str]:
    labels = dict(sorted({**(own or {}), **operator}.items()))
    sources = {k: ("operator" if k in operator else "device") for k in labels}
    return "null" if own is None else _dumps(dict(own)), _dumps(labels), _dumps(sources)


def labels_text(view: DeviceView) -> str:
    """What ``edgectl devices label`` prints: the device's labels now, by source."""
    sources = view.label_sources()
    if not sources:
        return f"{view.record.device_id} has no labels"
    rows = [(k, v, sources[k]) for k, v in sorted(view.labels.items())]
    table = render_table(
        [Column("label", lambda r: r[0]), Column("value", lambda r: r[1]), Column("source", lambda r: r[2])], rows
    )
    return f"{view.record.device_id}:\n{table}"


def groups_text(groups: Sequence[GroupRecord]) -> str:
    """``edgectl groups list``: one line per group, or a line saying there is none."""
    if not groups:
        return "no groups saved: edgectl groups add NAME SELECTOR"
    return render_table(
        [
            Column("group", lambda g: g.name),
            Column("selector", lambda g: g.selector or "(every device)"),
            Column("saved", lambda g: local_time(g.created_at)),
        ],
        groups,
    )


def forget_text(result: ForgetResult, broker: str) -> str:
    """What ``edgectl devices forget`` did, in one paragraph."""
    seen = ", ".join(b or "an unknown broker" for b in result.brokers) or "no broker"
    return (
        f"forgot {result.device_id}: deleted {result.devices} device row(s), {result.deployments} deployment(s) "
        f"and {result.metrics} metrics report(s) from the registry; cleared its retained status and metrics "
        f"on {broker} (it had been seen on {seen}). A running agent announces itself again when it reconnects."
    )


def enrolments_data(records: Sequence[EnrolmentRecord]) -> list[dict[str, Any]]:
    """``edgectl devices enroll|approve|revoke --json``: each enrolment with its key's fingerprint."""
    from edge_sdk.trust import PublicKey, fingerprint

    return [{**r.to_dict(), "fingerprint": fingerprint(PublicKey(bytes.fromhex(r.public_key)))} for r in records]


def enrolments_text(records: Sequence[EnrolmentRecord], empty: str) -> str:
    """One line per enrolment: device, state, key fingerprint, when it was asked for; ``empty`` if none."""
    if not records:
        return empty
    return render_table(
        [
            Column("device", lambda r: r["device_id"]),
            Column("state", lambda r: r["state"]),
            Column("fingerprint", lambda r: r["fingerprint"]),
            Column("since", lambda r: local_time(r["requested_at"])),
        ],
        enrolments_data(records),
    )


def outcome_data(outcome: DeployOutcome | ProfileOutcome) -> dict[str, Any]:
    """The JSON that ``deploy`` and ``profile`` both print about the device's answer."""
    return {
        "device_id": outcome.device_id,
        "bundle": outcome.bundle_name,
        "version": outcome.bundle_version,
        "state": outcome.state,
        "seconds": outcome.seconds,
        "error": outcome.error.to_dict() if outcome.error else None,
        "metrics": outcome.metrics.to_dict() if outcome.metrics else None,
    }


def deploy_data(outcome: DeployOutcome) -> dict[str, Any]:
    """The JSON ``deploy`` prints: :func:`outcome_data` with the device's checks, last detail, and how
    the bundle travelled (``delivery``: ``method`` delta or full, ``delta_bytes``, ``full_bytes``...)."""
    return {
        **outcome_data(outcome),
        "checks": list(outcome.checks),
        "detail": outcome.detail,
        "delivery": outcome.delivery.to_dict() if outcome.delivery is not None else None,
    }


def deploy_many_data(outcomes: Sequence[DeployOutcome]) -> dict[str, Any]:
    """The JSON ``deploy`` prints for several devices: one :func:`deploy_data` row each, and the counts."""
    states: dict[str, int] = {}
    for o in outcomes:
        states[o.state] = states.get(o.state, 0) + 1
    return {"devices": len(outcomes), "states": states, "outcomes": [deploy_data(o) for o in outcomes]}


def deploy_many_text(outcomes: Sequence[DeployOutcome]) -> str:
    """``deploy`` to several devices: one row per device (state, time, latency, why not), then a summary."""
    table = render_table(
        [
            Column("device", lambda o: o.device_id),
            Column("bundle", lambda o: f"{o.bundle_name} v{o.bundle_version}"),
            Column("state", lambda o: o.state),
            Column("s", lambda o: f"{o.seconds:.1f}", ">"),
            Column(
                "p50 ms",
                lambda o: None if o.metrics is None or o.metrics.latency is None else f"{o.metrics.latency.p50_ms:.3f}",
                ">",
            ),
            Column("why", lambda o: None if o.error is None else f"{o.error.code}: {o.error.message}"),
        ],
        outcomes,
    )
    states: dict[str, int] = {}
    for o in outcomes:
        states[o.state] = states.get(o.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    return f"{table}\n{len(outcomes)} device(s): {summary}"


def refusal_text(outcome: DeployOutcome | ProfileOutcome) -> str:
    """The line for a transfer the device refused or that failed."""
    return f"{outcome.device_id} {outcome.state} {outcome.bundle_name} v{outcome.bundle_version}"


def _measured_text(headline: str, outcome: DeployOutcome | ProfileOutcome) -> str:
    if outcome.metrics is None:
        raise ValueError(f"{outcome.device_id} {outcome.state}: the device sent no metrics to show")
    return f"{headline}\n" + metrics_table([outcome.metrics])


def deploy_text(outcome: DeployOutcome) -> str:
    """``deploy``: installed (with the device's metrics) or deferred by its update gate.

    Raises:
        ValueError: an installed outcome without metrics.
    """
    if outcome.state == "deferred":
        return (
            f"{outcome.device_id}: deferred {outcome.bundle_name} v{outcome.bundle_version} "
            f"({outcome.detail.get('reason', 'update gate closed')}); the device keeps it and installs it "
            f"when its gate opens (asks again every {outcome.detail.get('retry_s', '?')} s)"
        )
    headline = (
        f"{outcome.device_id}: installed {outcome.bundle_name} v{outcome.bundle_version} in {outcome.seconds:.1f} s"
    )
    return _measured_text(headline, outcome)


def profile_text(outcome: ProfileOutcome) -> str:
    """``profile``: the device's metrics for a bundle it ran without installing.

    Raises:
        ValueError: an outcome without metrics.
    """
    headline = f"{outcome.device_id}: profiled {outcome.bundle_name} v{outcome.bundle_version} (not installed)"
    return _measured_text(headline, outcome)


def command_data(device_id: str, event: Event) -> dict[str, Any]:
    """The JSON ``rollback`` and ``remove`` print about the device's answer."""
    return {
        "device_id": device_id,
        "state": event.kind,
        "detail": event.detail,
        "error": event.error.to_dict() if event.error else None,
    }


def command_text(device_id: str, event: Event, what: str) -> str:
    """The line for the device's answer to ``what`` (e.g. ``remove NAME``), its detail in words."""
    from edge_sdk.protocol import EventKind  # the messages; `edgectl devices` imports this module without them

    if event.kind != EventKind.DONE:
        return f"{device_id} refused: {what}"
    detail = dict(event.detail)
    action = detail.pop("action", None)
    detail.pop("name", None)
    if action == "remove" and "removed" in detail:
        said = f"v{detail['removed']} removed" if detail["removed"] is not None else "nothing was installed"
    elif action == "rollback" and "version" in detail:
        said = f"now runs v{detail['version']}"
    else:
        said = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in sorted(detail.items()))
    return f"{device_id}: {what}: done ({said})" if said else f"{device_id}: {what}: done"


def collect_line(counts: Mapping[str, int], elapsed_s: float) -> str:
    """One progress line of a running collector: what it took, stored and dropped, and its rate.

    Args:
        counts: :meth:`~host_tools.fleet.collect_service.CollectCounts.to_dict`.
        elapsed_s: seconds since it started.
    """
    rate = counts["received"] / elapsed_s if elapsed_s > 0 else 0.0
    line = (
        f"collect: {counts['received']} received, {counts['stored']} stored, {counts['dropped']} dropped "
        f"({rate:.0f}/s over {elapsed_s:.0f} s)"
    )
    if counts["retries"]:
        line += f", {counts['retries']} batches retried"
    if counts["reconnects"]:
        line += f", {counts['reconnects']} reconnects"
    return line


def collect_text(counts: Mapping[str, int], elapsed_s: float) -> str:
    """What a collector prints when it stops."""
    return f"{collect_line(counts, elapsed_s)}; stopped"
