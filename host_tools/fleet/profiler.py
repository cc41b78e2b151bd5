"""Ask a device to benchmark a bundle without installing it, and keep the result.

The transfer is the deploy's (same offer, chunks, resends; :mod:`host_tools.fleet.deployer`
does the sending, :mod:`host_tools.fleet.conversation` the listening, through the
connection's :class:`~host_tools.fleet.router.Router`); only the command's
``action`` differs. The device verifies the bundle as for an install, unpacks it into a
scratch directory, benchmarks it, sends a metrics report (``mode: profile``, not
retained) and a ``profiled`` event, and removes the scratch. What is active on the
device does not change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.errors import DeviceTimeoutError, EdgeError
from edge_sdk.mqtt import MqttClient
from edge_sdk.protocol import DeployCommand, DeviceTopics, Event, EventKind, MetricsReport
from host_tools.fleet.collector import record_message
from host_tools.fleet.conversation import TERMINAL_KINDS, Conversation, end_state, error_of
from host_tools.fleet.deployer import DeployOptions, send_bundle, transfer_command
from host_tools.fleet.registry import Registry
from host_tools.fleet.router import Router, gated, routed

__all__ = ["ProfileOutcome", "profile_and_record", "profile_bundle"]

#: What a call given no options uses (frozen, so one instance serves every call).
_DEFAULT_OPTIONS = DeployOptions()


@dataclass(frozen=True)
class ProfileOutcome:
    """How a remote profile ended.

    Attributes:
        device_id, bundle_name, bundle_version: what was measured where.
        state: ``profiled``, ``refused`` or ``failed``.
        error: the device's error when not profiled.
        metrics: the device's report.
        seconds: wall time of the whole exchange.
    """

    device_id: str
    bundle_name: str
    bundle_version: int
    state: str
    error: EdgeError | None = None
    metrics: MetricsReport | None = None
    seconds: float = 0.0


def profile_bundle(
    client: MqttClient,
    device_id: str,
    bundle_path: Path,
    options: DeployOptions = _DEFAULT_OPTIONS,
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.time,
    *,
    router: Router | None = None,
) -> ProfileOutcome:
    """Send a bundle for profiling only and wait for the device's report.

    Args:
        client: a connected client.
        device_id: target device.
        bundle_path: the signed bundle.
        options: chunking, timeouts and the benchmark (runs, warm-up, threads).
        progress: called with (bytes sent, total bytes).
        clock: wall clock for message timestamps.
        router: the running router of ``client``, when other threads share the connection.

    Returns:
        The outcome; refusals are outcomes, not exceptions.

    Raises:
        DeviceTimeoutError: the device did not accept, or did not report, in time.
        TransportError: the broker connection failed while sending.
    """
    started = time.monotonic()
    cmd = transfer_command(device_id, bundle_path, options, clock, action="profile")
    with (
        routed(client, router) as live,
        Conversation.open(
            live, DeviceTopics(device_id), cmd.command_id, metrics=True, transfer_id=cmd.transfer.transfer_id
        ) as convo,
    ):
        return _follow_profile(client, convo, cmd, bundle_path, options, progress, started)


def _follow_profile(
    client: MqttClient,
    convo: Conversation,
    cmd: DeployCommand,
    bundle_path: Path,
    options: DeployOptions,
    progress: Callable[[int, int], None] | None,
    started: float,
) -> ProfileOutcome:
    """:func:`profile_bundle`'s work, once ``convo`` listens: send, then wait for the report and ``profiled``."""
    device_id = convo.topics.device_id

    def outcome(state: str, **kw: object) -> ProfileOutcome:
        return ProfileOutcome(
            device_id,
            cmd.bundle_name,
            cmd.bundle_version,
            state,
            seconds=time.monotonic() - started,
            **kw,  # type: ignore[arg-type]
        )

    event = send_bundle(client, convo, cmd, bundle_path, options, progress, "profile request")
    if event.kind != EventKind.RECEIVED:
        return outcome(end_state(event), error=error_of(event))
    deadline = time.monotonic() + options.finish_timeout_s
    metrics: MetricsReport | None = None
    done = False
    while not (done and metrics is not None):
        msg = convo.next(deadline)
        if msg is None:
            raise DeviceTimeoutError(
                f"device {device_id} did not report the profile within {options.finish_timeout_s:g} s"
            )
        if isinstance(msg, MetricsReport):
            metrics = msg
        elif isinstance(msg, Event):
            if msg.kind in TERMINAL_KINDS:
                return outcome(end_state(msg), error=error_of(msg))
            done = done or msg.kind == EventKind.PROFILED
    return outcome("profiled", metrics=metrics)


def profile_and_record(
    client: MqttClient,
    registry: Registry,
    device_id: str,
    bundle_path: Path,
    options: DeployOptions = _DEFAULT_OPTIONS,
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.time,
    *,
    router: Router | None = None,
) -> ProfileOutcome:
    """:func:`profile_bundle`, with the device's report stored in the registry."""
    with gated(client, registry, router) as live:  # only enrolled devices' signed answers count
        outcome = profile_bundle(client, device_id, bundle_path, options, progress, clock, router=live)
    if outcome.metrics is not None:
        record_message(registry, outcome.metrics, clock())
    return outcome
