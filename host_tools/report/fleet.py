"""What the fleet commands print: devices, metrics reports, deploy and profile outcomes,
and the device's answer to a command.

Every function here takes values and returns text or a JSON-ready dict; none reads a
file, the registry or the network.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from edge_sdk.protocol import EventKind
from host_tools.report.table import Column, format_bytes, render_table

if TYPE_CHECKING:
    from edge_sdk.metrics import PowerMeasurement
    from edge_sdk.protocol import Event, MetricsReport
    from host_tools.fleet.deployer import DeployOutcome
    from host_tools.fleet.profiler import ProfileOutcome
    from host_tools.fleet.registry import DeviceRecord, EnrolmentRecord

__all__ = [
    "command_data",
    "command_text",
    "deploy_data",
    "deploy_text",
    "devices_data",
    "devices_text",
    "enrolments_data",
    "enrolments_text",
    "local_time",
    "metrics_table",
    "metrics_text",
    "outcome_data",
    "power_cell",
    "profile_text",
    "refusal_text",
]


def power_cell(power: PowerMeasurement | None) -> str | None:
    """``1.23 W``, with ``(estimated)`` unless a sensor measured it; ``None`` without a reading."""
    if power is None:
        return None
    label = " (estimated)" if power.estimated else ""
    return f"{power.watts:.2f} W{label}"


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


def devices_data(
    records: Sequence[DeviceRecord], drops: Mapping[str, Mapping[str, int]] | None = None
) -> list[dict[str, Any]]:
    """``edgectl devices --json``: each device's record, with ``dropped``: reason -> messages dropped."""
    drops = drops or {}
    return [{**r.to_dict(), "dropped": dict(drops.get(r.device_id, {}))} for r in records]


def devices_text(
    records: Sequence[DeviceRecord],
    drops: Mapping[str, Mapping[str, int]] | None = None,
    pending: int = 0,
) -> str:
    """``edgectl devices``: one line per known device, or a line saying there is none.

    Args:
        records: the registry's devices.
        drops: device id (``*`` for devices the host does not know) -> reason -> messages dropped.
        pending: how many devices wait for enrolment.

    Returns:
        The table; ``last seen`` in local time; lines about dropped messages and pending devices.
    """
    drops = drops or {}
    lines = []
    unknown = _drops_cell(drops.get("*"))
    if unknown:
        lines.append(f"dropped from unknown devices: {unknown}")
    if pending:
        lines.append(f"{pending} device(s) wait for enrolment: edgectl devices enroll")
    if not records:
        return "\n".join(["no devices known", *lines])
    any_drops = any(drops.get(r.device_id) for r in records)
    table = render_table(
        [
            Column("device", lambda r: r.device_id),
            Column("status", lambda r: r.status),
            Column("platform", lambda r: (r.platform or {}).get("kind")),
            Column("arch", lambda r: (r.platform or {}).get("arch")),
            Column("memory", lambda r: format_bytes((r.platform or {}).get("memory_bytes")), ">"),
            Column("runtimes", lambda r: ", ".join(r.runtimes or {})),
            Column("active", lambda r: r.active_bundle and f"{r.active_bundle.name} v{r.active_bundle.version}"),
            Column("last seen", lambda r: local_time(r.last_seen)),
            *([Column("dropped", lambda r: _drops_cell(drops.get(r.device_id)))] if any_drops else []),
        ],
        records,
    )
    return "\n".join([table, *lines])


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
    """The JSON ``deploy`` prints: :func:`outcome_data` with the device's checks and last detail."""
    return {**outcome_data(outcome), "checks": list(outcome.checks), "detail": outcome.detail}


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
    """The line for the device's answer to ``what`` (e.g. ``remove NAME``)."""
    if event.kind != EventKind.DONE:
        return f"{device_id} refused: {what}"
    return f"{device_id}: {what}: done ({event.detail})"
