"""A synthetic fleet written into a real registry, for the report and exporter tests and benchmark.

Everything goes through the registry's own writers (devices, deployments, metrics reports,
drops, runs), so what the report reads is what a collector would have stored. Figures are
drawn from a seeded generator; the tests compare what was drawn with what was written here
(the :class:`FleetSpec` and the registry), never with numbers typed into the test.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from edge_sdk.metrics import LatencyStats, ModelMemory, PowerMeasurement
from edge_sdk.protocol import MetricsReport
from host_tools.fleet.registry import BundleRef, DeviceRecord, Registry
from host_tools.fleet.runs import record_run

__all__ = ["FleetSpec", "fill_fleet"]

T0 = 1_780_000_000.0


@dataclass(frozen=True)
class FleetSpec:
    """How big a fleet to write.

    Args:
        devices: device count (``pi-0000``...).
        versions: model versions per device, each with a metrics report.
        bundle: the bundle name.
        samples: latency runs per report (its kept samples are at most 64 of them).
        offline_every: every Nth device is offline.
        estimated_every: every Nth device's power is estimated, the others measured.
        percentiles_only_every: every Nth device sends no samples (an older agent); 0 for none.
        variants: compression runs kept.
        seed: the generator's seed.
    """

    devices: int = 12
    versions: int = 3
    bundle: str = "cnn"
    samples: int = 200
    offline_every: int = 4
    estimated_every: int = 3
    percentiles_only_every: int = 5
    variants: int = 5
    seed: int = 7


def device_id(i: int) -> str:
    return f"pi-{i:04d}"


def fill_fleet(registry: Registry, spec: FleetSpec = FleetSpec()) -> None:
    """Write ``spec``'s fleet into ``registry``: devices, deployments, metrics, drops, compression runs."""
    rng = random.Random(spec.seed)
    for i in range(spec.devices):
        dev = device_id(i)
        registry.upsert_device(
            DeviceRecord(
                dev, "offline" if spec.offline_every and i % spec.offline_every == 0 else "online",
                last_seen=T0 + 3600 + i, first_seen=T0, platform={"machine": "aarch64"},
                active_bundles=(BundleRef(spec.bundle, spec.versions),), broker="mqtt://127.0.0.1:1",
            )
        )  # fmt: skip
        base = 1.0 + (i % 17) * 0.1
        for v in range(1, spec.versions + 1):
            started = T0 + v * 600 + i * 0.01
            dep = registry.record_deployment(dev, spec.bundle, v, "ab" * 32, started_at=started, state="sent")
            state = "installed" if (i + v) % 11 else "failed"
            registry.update_deployment(dep, state=state, finished_at=started + 5)
            seconds = [max(1e-6, rng.lognormvariate(0, 0.25) * base / v / 1000) for _ in range(spec.samples)]
            latency = LatencyStats.from_samples(seconds)
            if spec.percentiles_only_every and i % spec.percentiles_only_every == 1:
                latency = LatencyStats.from_dict({k: val for k, val in latency.to_dict().items() if k != "samples_ms"})
            estimated = bool(spec.estimated_every) and i % spec.estimated_every == 0
            jpi = base * 1e-3 / v
            power = PowerMeasurement(jpi * 1000, 1.0, jpi * 1000, "model" if estimated else "ina3221", estimated, jpi)
            memory = ModelMemory(50_000_000, 50_000_000 + v * 1_000_000, v * 1_000_000, 0, 60_000_000, 0, None, 10)
            report = MetricsReport(
                device_id=dev, bundle_name=spec.bundle, bundle_version=v, runtime="onnxruntime", precision="int8",
                ts=started + 6, latency=latency, memory=memory, power=power,
            )  # fmt: skip
            registry.add_metrics(report, received_at=started + 7)
    registry.count_drops({(device_id(0), "bad_signature"): 3, ("*", "unknown_device"): 2}, at=T0 + 10)
    for k in range(spec.variants):
        size = 100_000 // (k + 1)
        final = {"size_bytes": size, "quality": 0.99 - 0.01 * k * k / 2, "quality_metric": "accuracy",
                 "latency_p50_ms": 1.0 / (k + 1)}  # fmt: skip
        params = {"model": {"sha256": "0" * 64}, "output": {"sha256": f"{k:064x}"}, "options": {"variant": k}}
        record_run(registry, "compress", params, {"report": {"final": final}}, at=T0 + k)
