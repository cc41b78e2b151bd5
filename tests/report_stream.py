"""Signed metrics reports from many enrolled devices, published as devices publish them.

Each :class:`ReportingDevice` has its own Ed25519 key, enrolled in the registry, and signs
every report with :func:`edge_sdk.protocol.seal` (what the agent's identity uses) under
its own sequence numbers, on its own metrics topic. One MQTT connection carries all of
them: it stands in for devices that report on a timer (the agent reports after installs),
so the tests and benchmarks of the collector can drive thousands of reports a second.
A report's ``ts`` is the moment it was published (host clock): the collector's
``received_at`` minus it is the publish-to-row latency.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edge_sdk.mqtt import MqttClient, MqttOptions, PublishHandle
from edge_sdk.protocol import DeviceTopics, MetricsReport, seal
from edge_sdk.trust import SigningKey
from host_tools.fleet.registry import Registry


@dataclass
class ReportingDevice:
    device_id: str
    key: SigningKey = field(default_factory=SigningKey.generate)
    seq: int = 0
    sent: list[float] = field(default_factory=list)  # the ts of every report made

    def report(self, ts: float) -> bytes:
        """The next metrics report of this device, signed, dated ``ts``."""
        self.seq += 1
        self.sent.append(ts)
        return seal(MetricsReport(self.device_id, "tiny", 1, "onnxruntime", "fp32", ts), self.key, self.seq, ts)


def reporting_devices(n: int, prefix: str) -> list[ReportingDevice]:
    return [ReportingDevice(f"{prefix}-{i:04d}") for i in range(n)]


def enroll_devices(registry: Registry, devices: Sequence[ReportingDevice]) -> None:
    for d in devices:
        registry.enroll(d.device_id, d.key.public_key.raw.hex(), time.time())


def publisher(url: str, client_id: str) -> MqttClient:
    """A connected client that may have many reports in flight."""
    client = MqttClient(url, MqttOptions(client_id=client_id, max_inflight=1000, protocol="5"))
    client.connect()
    return client


def publish_at_rate(
    client: MqttClient,
    devices: Sequence[ReportingDevice],
    rate_hz: float,
    duration_s: float,
    on_tick: Callable[[float], None] | None = None,
) -> int:
    """Every device publishes one report per ``1/rate_hz`` s for ``duration_s``; returns how many.

    ``on_tick(elapsed_s)`` is called after each round and every 0.05 s between rounds (to kill
    a collector at a set time, and start it again a fraction of a second later).
    Every publish is acknowledged by the broker before this returns.
    """
    period = 1.0 / rate_hz
    started = time.monotonic()
    handles: list[PublishHandle] = []
    rounds = max(1, round(duration_s * rate_hz))
    for r in range(rounds):
        due = started + r * period
        while (left := due - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
            if on_tick is not None:
                on_tick(time.monotonic() - started)
        for d in devices:
            handles.append(client.publish(DeviceTopics(d.device_id).metrics, d.report(time.time()), qos=1))
        if on_tick is not None:
            on_tick(time.monotonic() - started)
    for h in handles:
        h.wait()
    return len(handles)


def publish_burst(client: MqttClient, devices: Sequence[ReportingDevice], count: int) -> int:
    """``count`` reports, round-robin over ``devices``, as fast as the broker takes them; returns how many."""
    handles = []
    for i in range(count):
        d = devices[i % len(devices)]
        handles.append(client.publish(DeviceTopics(d.device_id).metrics, d.report(time.time()), qos=1))
        if len(handles) >= 5000:
            for h in handles:
                h.wait()
            handles.clear()
    for h in handles:
        h.wait()
    return count
