"""Health checks and benchmark runs of an installed model -> a metrics report.

The profiler runs on the agent's worker thread, never on the MQTT network thread.
What it measures, in order: the model's own memory share around loading (below), then
warm-up and timed runs while a sampler records peak RSS, CPU use and energy from the
best power source (labelled ``estimated`` when it is a model, not a sensor), and finally
the thermal zones.

The model's memory share must not depend on what the agent loaded before. A plain RSS
difference does: memory freed by an earlier model stays resident in the C heap and the
next load reuses it, so the same bundle measured 10.4 MiB first and 4 KiB later. So:

1. the model is loaded once and closed, unmeasured: the runtime's one-time state
   (its environment, kernel registries, thread pools) is set up by then and is not
   charged to this model, whichever model came first;
2. freed heap pages are handed back to the OS (:func:`~edge_sdk.metrics.release_free_heap`);
3. the C heap's bytes in use (:func:`~edge_sdk.metrics.heap_in_use_bytes`) and RSS are
   read, the model is loaded again, and both are read again. The heap's growth is the
   model's share (``model_bytes_method: "heap"``): it counts what loading allocated,
   whether or not those pages were resident already. Where the C library cannot say
   (not glibc), RSS's growth is used after step 2 (``"rss"``), which is less stable.

Repeated installs of one bundle in one agent process then report the same share within
a few percent (the tests allow 25 % or 256 KiB). The extra, unmeasured load costs one
model load's time; its memory is freed before the measured one.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sdk.errors import HealthCheckError
from edge_sdk.metrics import (
    CpuMeasurement,
    CpuSampler,
    EnergyWindow,
    LatencyStats,
    ModelMemory,
    PeakRssSampler,
    PowerMeasurement,
    PowerSource,
    ThermalReading,
    benchmark,
    heap_in_use_bytes,
    read_thermal_zones,
    release_free_heap,
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
    latency: LatencyStats
    memory: ModelMemory
    cpu: CpuMeasurement
    power: PowerMeasurement
    temperature: tuple[ThermalReading, ...]


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
    options = SessionOptions(threads=spec.threads)

    def open_model() -> InferenceSession:
        if opener is not None:
            return opener(options)
        return open_session(model_path, runtime, options, precision_hint=precision)

    with open_model():
        pass  # unmeasured: the runtime's one-time state is set up now (see the module docs)
    gc.collect()
    release_free_heap()
    heap_before, rss_before = heap_in_use_bytes(), rss_bytes()
    with open_model() as session:
        heap_loaded, rss_loaded = heap_in_use_bytes(), rss_bytes()
        heap_growth = None if heap_before is None or heap_loaded is None else heap_loaded - heap_before
        feeds = load_feeds(session, sample_path)
        health_check(session, feeds, max_latency_ms)
        cpu_window = CpuSampler(threads=session.threads)
        with PeakRssSampler() as mem, cpu_window as cpu, EnergyWindow(power_source) as energy:
            stats = benchmark(
                lambda: session.run(feeds),
                warmup=spec.warmup,
                runs=spec.runs,
                min_duration_s=spec.min_duration_s,
            )
        return Profile(
            runtime=session.runtime,
            precision=session.precision,
            threads=session.threads,
            providers=tuple(session.providers),
            latency=stats,
            memory=ModelMemory.from_window(rss_before, rss_loaded, mem.result, heap_growth),
            cpu=cpu.result,
            # The window spans warm-up and timed runs alike.
            power=PowerMeasurement.from_energy(energy.result, stats.count + spec.warmup),
            temperature=tuple(read_thermal_zones(root)),
        )
