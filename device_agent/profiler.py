"""Health checks and benchmark runs of an installed model -> a metrics report.

The profiler runs on the agent's worker thread, never on the MQTT network thread.
What it measures, in order: RSS before loading, RSS after loading (the model's own share
is the difference), then warm-up and timed runs while a sampler records peak RSS, CPU
use and energy from the best power source (labelled ``estimated`` when it is a model,
not a sensor), and finally the thermal zones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.errors import HealthCheckError
from edge_sdk.metrics import (
    CpuSampler,
    EnergyWindow,
    PeakRssSampler,
    PowerSource,
    benchmark,
    read_thermal_zones,
    rss_bytes,
)
from edge_sdk.protocol import BenchmarkSpec
from edge_sdk.runtime import (
    InferenceSession,
    SessionOptions,
    open_session,
    preload,
    sample_feeds,
)

__all__ = ["Profile", "health_check", "load_feeds", "profile_model"]

log = logging.getLogger(__name__)

#: Timed runs of the sample input behind a latency budget (after one untimed run).
HEALTH_TIMED_RUNS = 5


@dataclass(frozen=True)
class Profile:
    """What one benchmark run measured; fields map onto :class:`~edge_sdk.protocol.MetricsReport`."""

    runtime: str
    precision: str
    threads: int
    providers: tuple[str, ...]
    latency: dict[str, Any]
    memory: dict[str, Any]
    cpu: dict[str, Any]
    power: dict[str, Any]
    temperature: tuple[dict[str, Any], ...]


def load_feeds(session: InferenceSession, sample_path: Path | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for one inference: the bundle's sample (first item of each array), or random.

    Raises:
        HealthCheckError: the sample file is unreadable or does not name the model's inputs.
    """
    specs = session.inputs()
    if sample_path is None:
        return sample_feeds(specs, np.random.default_rng(seed))
    try:
        with np.load(sample_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise HealthCheckError(f"sample input {sample_path.name} is unreadable: {exc}") from exc
    feeds = {}
    for spec in specs:
        if spec.name not in arrays:
            raise HealthCheckError(
                f"sample input has no array for model input {spec.name!r} (has: {', '.join(arrays)})"
            )
        feeds[spec.name] = arrays[spec.name][:1].astype(spec.dtype, copy=False)
    return feeds


def health_check(
    session: InferenceSession,
    feeds: dict[str, np.ndarray],
    max_latency_ms: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[np.ndarray]:
    """Run the sample input and check the outputs, and the latency when a budget is given.

    Every output must be finite and shaped as the model declares (dynamic dimensions
    match anything). With ``max_latency_ms``, the median of :data:`HEALTH_TIMED_RUNS`
    further runs must be within it.

    Args:
        session: the loaded model.
        feeds: one sample input.
        max_latency_ms: the manifest's ``health.max_latency_ms``, or None.
        clock: seconds, for the timed runs (injectable).

    Raises:
        HealthCheckError: the run failed, an output is non-finite or misshaped, or the
            model is slower than its budget; ``details["check"]`` names which
            (``run``, ``finite``, ``shape``, ``latency``).
    """
    try:
        outputs = session.run(feeds)
    except Exception as exc:  # any runtime failure is a failed health check
        raise HealthCheckError(f"model failed to run on its sample input: {exc}", check="run") from exc
    specs = session.outputs()
    if len(outputs) != len(specs):
        raise HealthCheckError(f"model returned {len(outputs)} outputs, declares {len(specs)}", check="shape")
    for spec, out in zip(specs, outputs, strict=False):
        if np.issubdtype(out.dtype, np.floating) and not np.all(np.isfinite(out)):
            raise HealthCheckError(f"output {spec.name!r} contains NaN or infinity", output=spec.name, check="finite")
        if len(spec.shape) != out.ndim or any(
            d is not None and d != got for d, got in zip(spec.shape, out.shape, strict=False)
        ):
            raise HealthCheckError(
                f"output {spec.name!r} has shape {list(out.shape)}, model declares {list(spec.shape)}",
                output=spec.name,
                check="shape",
            )
    if max_latency_ms is not None:
        times = []
        for _ in range(HEALTH_TIMED_RUNS):
            t0 = clock()
            try:
                session.run(feeds)
            except Exception as exc:
                raise HealthCheckError(f"model failed on a repeated run: {exc}", check="run") from exc
            times.append((clock() - t0) * 1000.0)
        median_ms = float(np.median(times))
        if median_ms > max_latency_ms:
            raise HealthCheckError(
                f"median latency {median_ms:.3f} ms over {HEALTH_TIMED_RUNS} runs exceeds the "
                f"budget of {max_latency_ms:g} ms",
                check="latency",
                median_ms=median_ms,
                max_latency_ms=max_latency_ms,
            )
    return outputs


def profile_model(
    model_path: Path,
    runtime: str,
    precision: str,
    sample_path: Path | None,
    spec: BenchmarkSpec,
    power_source: PowerSource,
    root: Path = Path("/"),
    max_latency_ms: float | None = None,
    opener: Callable[[SessionOptions], InferenceSession] | None = None,
) -> Profile:
    """Load a model, health-check it, benchmark it and measure what it cost.

    Args:
        model_path: the installed model file.
        runtime: ``onnxruntime`` or ``litert``.
        precision: the manifest's precision, for onnxruntime sessions.
        sample_path: the bundle's sample input, if any.
        spec: runs, warm-up, threads.
        power_source: from :func:`edge_sdk.metrics.detect_power_source`.
        root: filesystem root for thermal zones.
        max_latency_ms: the health check's latency budget (the manifest's ``health``).
        opener: opens the session instead of ``open_session(model_path, ...)``; the
            execution :mod:`device_agent.selection` chose for a sparse bundle.

    Raises:
        ModelError: load or health check failed.
    """
    preload(runtime)
    rss_before = rss_bytes()
    options = SessionOptions(threads=spec.threads)
    opened = open_session(model_path, runtime, options, precision_hint=precision) if opener is None else opener(options)
    with opened as session:
        rss_loaded = rss_bytes()
        feeds = load_feeds(session, sample_path)
        health_check(session, feeds, max_latency_ms)
        with PeakRssSampler() as mem, CpuSampler() as cpu, EnergyWindow(power_source) as energy:
            stats = benchmark(
                lambda: session.run(feeds),
                warmup=spec.warmup,
                runs=spec.runs,
                min_duration_s=spec.min_duration_s,
            )
        memory = {
            "rss_before_load_bytes": rss_before,
            "rss_after_load_bytes": rss_loaded,
            "model_bytes": max(0, rss_loaded - rss_before),
            **mem.result.to_dict(),
        }
        joules = energy.result.joules
        power = {
            **energy.result.to_dict(),
            # The window spans warm-up and timed runs alike.
            "joules_per_inference": joules / max(1, stats.count + spec.warmup),
        }
        return Profile(
            runtime=session.runtime,
            precision=session.precision,
            threads=session.threads,
            providers=tuple(session.providers),
            latency=stats.to_dict(),
            memory=memory,
            cpu=cpu.result.to_dict(),
            power=power,
            temperature=tuple(t.to_dict() for t in read_thermal_zones(root)),
        )
