"""What the fleet commands print: devices, metrics reports, deploy and profile outcomes,
and the device's answer to a command.

Every function here takes values and returns text or a JSON-ready dict; none reads a
file, the registry or the network.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
    "device_rows_json",
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
    building the record, the view and the dict (see :func:`device_rows_json`).

    Args:
        row: the row, as :meth:`~host_tools.fleet.registry.Registry.iter_device_rows` checked it.
        state: its state now (``online``, ``stale``, ``offline``).
        operator_labels: the labels the operator set on it.
        now: unix seconds now, for ``last_seen_text``.
        drops: device id -> reason -> messages dropped.

    Returns:
        The device's JSON object, one line.
    """
    return next(device_rows_json([(row, state, operator_labels)], now, drops))


#: Distinct values each cache of :func:`device_rows_json` holds before it starts afresh.
_SHARED_TEXTS = 16_384
#: The largest finite float: ``-_FLOAT_MAX <= x <= _FLOAT_MAX`` is ``math.isfinite(x)`` for a float.
_FLOAT_MAX = sys.float_info.max


def device_rows_json(
    rows: Iterable[tuple[DeviceRow, str, Mapping[str, str]]],
    now: float,
    drops: Mapping[str, Mapping[str, int]] | None = None,
) -> Iterator[str]:
    """What :func:`device_row_json` writes for each of ``rows``: a whole listing's JSON, one
    device at a time, byte for byte what the record -> view -> dict -> ``json.dumps`` path writes.

    What many devices share is encoded once per distinct value and spliced in: the broker,
    status, platform, runtimes, agent version and bundles together; the device's own labels
    (when the operator has labelled it not); the date and hour of ``last_seen_text`` and its
    "ago". Per device, only its id, its times and what is its alone are encoded. Each cache
    holds at most 16,384 values, so a fleet whose devices all differ costs no more memory
    than one whose devices report alike.

    Args:
        rows: ``(row, state, operator labels)``, as
            :func:`~host_tools.fleet.inventory.list_device_rows` yields them.
        now: unix seconds now, for ``last_seen_text``.
        drops: device id -> reason -> messages dropped.

    Yields:
        Each device's JSON object, one line.
    """
    text, number, interval, floor, big = encode_basestring_ascii, _number_json, _interval_json, math.floor, _FLOAT_MAX
    write_float, clock, drops = float.__repr__, _clock_texts(), drops or {}
    heads: dict[tuple[str | None, ...], str] = {}
    owns: dict[str | None, tuple[str, str, str, str]] = {}
    hours: dict[int, str] = {}
    agos: dict[int, str] = {}
    for row, state, mine in rows:
        device_id, status, platform, runtimes, version, bundles, first_at, seen_at, broker, labels, beat, heard = row
        key = (broker, status, platform, runtimes, version, bundles)
        head = heads.get(key)
        if head is None:
            if len(heads) >= _SHARED_TEXTS:
                heads.clear()
            head = heads[key] = _head_json(*key)
        if mine:
            own, merged, sources, operator = _labels_json(row.device_labels(), mine)
        else:
            parts = owns.get(labels)
            if parts is None:
                if len(owns) >= _SHARED_TEXTS:
                    owns.clear()
                parts = owns[labels] = _labels_json(row.device_labels(), mine)
            own, merged, sources, operator = parts
        # The times are each device's own: a finite float is written as json writes it, without a call.
        seen = write_float(seen_at) if type(seen_at) is float and -big <= seen_at <= big else number(seen_at)
        # A device whose status was recorded once was first seen then: the same number, the same text.
        same = first_at == seen_at and first_at and type(first_at) is type(seen_at)
        first = seen if same else number(first_at)
        heard_text = write_float(heard) if type(heard) is float and -big <= heard <= big else number(heard)
        # last_seen_text: "YYYY-MM-DD HH:" per hour, "MM:SS UTC (" per second of the hour, then how long ago.
        hour, second = divmod(floor(seen_at), 3600)
        stamp = hours.get(hour)
        if stamp is None:
            if len(hours) >= _SHARED_TEXTS:
                hours.clear()
            stamp = hours[hour] = '"' + time.strftime("%Y-%m-%d %H:", time.gmtime(hour * 3600))
        ago_s = floor(now - seen_at)  # ago_text says the same of a time and of its whole second
        ago = agos.get(ago_s)
        if ago is None:
            if len(agos) >= _SHARED_TEXTS:
                agos.clear()
            ago = agos[ago_s] = ago_text(ago_s) + ')"'
        dropped = drops.get(device_id)
        yield (
            f'{{"device_id": {text(device_id)}{head}{first}, "last_seen": {seen}, "device_labels": {own}, '
            f'"heartbeat_s": {interval(beat)}, "last_heard": {heard_text}, "last_status": {text(status)}, '
            f'"status_confirmed": false, "state": {text(state)}, "labels": {merged}, "label_sources": {sources}, '
            f'"operator_labels": {operator}, "last_seen_text": {stamp}{clock[second]}{ago}, '
            f'"dropped": {_dumps(dict(dropped)) if dropped else "{}"}}}'
        )


@functools.cache
def _clock_texts() -> tuple[str, ...]:
    """``MM:SS UTC (`` for each second of an hour: the middle of ``last_seen_text`` (UTC hours have
    3,600 seconds: Unix time counts no leap second)."""
    return tuple(f"{m:02d}:{s:02d} UTC (" for m in range(60) for s in range(60))


def _head_json(
    broker: str, status: str, platform: str | None, runtimes: str | None, version: str | None, bundles: str | None
) -> str:
    """From ``, "broker": `` to ``"first_seen": ``: what devices that report alike share."""
    text = encode_basestring_ascii
    active_bundles, active_bundle = _bundles_json(bundles)
    return (
        f', "broker": {text(broker)}, "status": {text(status)}, '
        f'"platform": {_object_json(platform)}, "runtimes": {_object_json(runtimes)}, '
        f'"agent_version": {"null" if version is None else text(version)}, '
        f'"active_bundles": {active_bundles}, "active_bundle": {active_bundle}, "first_seen": '
    )


def _labels_json(own: Mapping[str, str] | None, operator: Mapping[str, str]) -> tuple[str, str, str, str]:
    """``device_labels``, ``labels``, ``label_sources`` and ``operator_labels`` (see DeviceView.to_dict)."""
    labels = dict(sorted({**(own or {}), **operator}.items()))
    sources = _dumps({k: ("operator" if k in operator else "device") for k in labels})
    merged = _dumps(labels)
    if own is None:
        device_labels = "null"
    elif not operator and list(own) == list(labels):
        device_labels = merged  # already in order: the same dict, the same text
    else:
        device_labels = _dumps(dict(own))
    return device_labels, merged, sources, _dumps(dict(operator)) if operator else "{}"


#: The encoder ``edgectl devices --json`` writes with (see ``_print_json_stream`` in the CLI),
#: made once: ``json.dumps`` with other than its default arguments makes one per call.
_dumps = json.JSONEncoder(default=str, ensure_ascii=True).encode


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
