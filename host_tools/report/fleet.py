"""What the fleet commands print: devices, metrics reports, deploy and profile outcomes,
and the device's answer to a command.

Every function here takes values and returns text or a JSON-ready dict; none reads a
file, the registry or the network.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from edge_sdk.protocol import EventKind
from host_tools.report.table import Column, format_bytes, render_table

if TYPE_CHECKING:
    from edge_sdk.metrics import PowerMeasurement
    from edge_sdk.protocol import Event, MetricsReport
    from host_tools.fleet.deployer import DeployOutcome
    from host_tools.fleet.profiler import ProfileOutcome
    from host_tools.fleet.registry import DeviceRecord

__all__ = [
    "command_data",
    "command_text",
    "deploy_data",
    "deploy_text",
    "devices_text",
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


def devices_text(records: Sequence[DeviceRecord]) -> str:
    """``edgectl devices``: one line per known device, or a line saying there is none.

    Args:
        records: the registry's devices.

    Returns:
        The table; ``last seen`` in local time.
    """
    if not records:
        return "no devices known"
    return render_table(
        [
            Column("device", lambda r: r.device_id),
            Column("status", lambda r: r.status),
            Column("platform", lambda r: (r.platform or {}).get("kind")),
            Column("arch", lambda r: (r.platform or {}).get("arch")),
            Column("memory", lambda r: format_bytes((r.platform or {}).get("memory_bytes")), ">"),
            Column("runtimes", lambda r: ", ".join(r.runtimes or {})),
            Column("active", lambda r: r.active_bundle and f"{r.active_bundle.name} v{r.active_bundle.version}"),
            Column("last seen", lambda r: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.last_seen))),
        ],
        records,
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
    """The line for the device's answer to ``what`` (e.g. ``remove NAME``), its detail in words."""
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
