"""Which way to run a bundle on this device: measure the ones that apply, keep the fastest.

A bundle with weight-sparse layers (the manifest's ``sparse`` field) can run these ways:

- ``dense``: the dense graph with its weights rebuilt from the CSR file as float32, in
  memory only; onnxruntime's ordinary (MLAS) matrix products;
- ``dense_int8``: the dense graph with each sparse layer as onnxruntime's
  ``DynamicQuantizeMatMul`` on the file's int8 values and per-row scales
  (:func:`edge_sdk.bundle.sparse.dense_int8_model`). It applies only when the file
  stores int8 values (``edgectl pack --sparse --sparse-int8``): the packer chose to
  quantize the weights; the device does not quantize float weights on its own;
- ``sparse``: the sparse graph, each sparse layer an onnxruntime
  ``SparseToDenseMatMul`` node with its CSR weight bound (:mod:`edge_sdk.runtime._sparse`).

``sparse_int8`` does not exist in this build, and every report says so (see
:data:`UNAVAILABLE`): onnxruntime's ``SparseToDenseMatMul`` has kernels for float,
double and 32/64-bit integers only (an int8 sparse input fails type checking). Running
it on int32 (activations quantized, then widened) works but moves as many bytes as
float and measured no faster than float sparse (4096x4096 at 90% and 95%, batch 1 and
8: from 12% slower to 6% faster; 1024x1024: 25-35% slower). A
real int8 sparse kernel would be a custom operator (onnxruntime-extensions or a
compiled library per device and onnxruntime ABI) or scipy, none of which the agent
ships. With int8 values, ``sparse`` computes in float32 on the dequantized values.

Which is faster depends on the sparsity, the batch size, the layer shapes and the
device's caches, memory bandwidth and integer instructions, so it is measured, here, on
the bundle's sample input: each candidate is health-checked, its outputs compared with
the dense execution's (within :data:`TOLERANCE` of their largest magnitude: int8 is
approximate, the others must agree), then timed with the same machinery as the
benchmark (:func:`edge_sdk.metrics.benchmark_interleaved`), in interleaved rounds so that a burst of
background load does not fall on one candidate only. The lowest median wins. A
candidate that cannot run (an onnxruntime build without the sparse kernel, say) or
disagrees is reported with its error and never chosen; one that does not apply to the
bundle is reported as ``not_applicable`` with the reason.

A pin skips the measurement: the agent's ``execution`` setting (when not ``auto``) wins
over the manifest's ``execution``; a pinned candidate that cannot run falls back to the
first of the others that can, in :data:`CANDIDATES` order, with the reason reported.

:func:`choose` is pure; :func:`select_execution` does the I/O.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from edge_sdk.bundle import Manifest
from edge_sdk.bundle.sparse import CsrMatrix, SparseLimits, decode_sparse_weights, dense_int8_model, dense_model
from edge_sdk.errors import BundleFormatError, EdgeError, StorageError
from edge_sdk.metrics import CandidateTiming, ExecutionChoice, benchmark_interleaved
from edge_sdk.protocol import BenchmarkSpec
from edge_sdk.runtime import InferenceSession, SessionOptions, open_session, open_sparse_session
from edge_sdk.runtime.agreement import TOLERANCE, agreement

__all__ = [
    "CANDIDATES",
    "TOLERANCE",
    "UNAVAILABLE",
    "CandidateTiming",
    "ExecutionChoice",
    "Opener",
    "agreement",
    "choose",
    "execution_opener",
    "measure",
    "not_applicable",
    "select_execution",
]

log = logging.getLogger(__name__)

#: Executions a sparse bundle offers, in the order they are measured and reported.
CANDIDATES = ("dense", "dense_int8", "sparse")
#: Executions this build does not have, with why; reported, never measured.
UNAVAILABLE = {
    "sparse_int8": (
        "not available: onnxruntime's SparseToDenseMatMul has no int8 kernel, and an int32 "
        "emulation measured no faster than float sparse"
    ),
}
#: Timed rounds per candidate; each round runs ``spec.runs / ROUNDS`` times.
ROUNDS = 3
#: Largest sparse weights file read, in bytes.
MAX_WEIGHTS_BYTES = 2 << 30

_REPORTED = (*CANDIDATES, *UNAVAILABLE)

Opener = Callable[[SessionOptions], InferenceSession]
"""Opens one execution of a bundle with the given session options."""


def choose(timings: Sequence[CandidateTiming]) -> tuple[str, str]:
    """The candidate with the lowest median latency among those that ran.

    Args:
        timings: one per candidate (those not applicable are ignored).

    Returns:
        ``(name, reason)``.

    Raises:
        EdgeError: no candidate ran (the errors are in the message).
    """
    ran = [t for t in timings if t.error is None and t.p50_ms is not None]
    if not ran:
        errors = "; ".join(f"{t.name}: {t.error}" for t in timings if t.error)
        raise EdgeError(f"no execution of this bundle could run: {errors}")
    best = min(ran, key=lambda t: t.p50_ms)  # type: ignore[arg-type, return-value]
    others = ", ".join(f"{t.name} {t.p50_ms:.3f} ms" for t in ran if t is not best)
    failed = ", ".join(f"{t.name} could not run ({t.error})" for t in timings if t.error is not None)
    reason = f"measured: {best.name} {best.p50_ms:.3f} ms p50" + (f" vs {others}" if others else "")
    return best.name, reason + (f"; {failed}" if failed else "")


def not_applicable(manifest: Manifest, name: str) -> str | None:
    """Why execution ``name`` does not apply to a sparse bundle, or ``None`` when it does."""
    assert manifest.sparse is not None
    if name in UNAVAILABLE:
        return UNAVAILABLE[name]
    if name == "dense_int8" and manifest.sparse.values != "int8":
        return "the weights file stores float32 values (pack with --sparse-int8 for int8)"
    return None


def _read_weights(payload: Path, manifest: Manifest, limits: SparseLimits) -> dict[str, CsrMatrix]:
    assert manifest.sparse is not None
    spec = manifest.sparse
    path = payload / spec.weights
    try:
        if path.stat().st_size > MAX_WEIGHTS_BYTES:
            raise BundleFormatError(f"sparse weights file {spec.weights} is larger than {MAX_WEIGHTS_BYTES} bytes")
        weights = decode_sparse_weights(path.read_bytes(), limits)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
    expected = {layer.tensor: layer for layer in spec.layers}
    if set(weights) != set(expected) or any(weights[n].shape != expected[n].shape for n in expected):
        raise BundleFormatError(f"sparse weights file {spec.weights} does not hold the layers the manifest lists")
    if any(m.quantized != (spec.values == "int8") for m in weights.values()):
        raise BundleFormatError(f"sparse weights file {spec.weights} does not hold the manifest's {spec.values} values")
    return weights


def _opener(payload: Path, manifest: Manifest, name: str, weights: Mapping[str, CsrMatrix]) -> Opener:
    assert manifest.sparse is not None
    spec = manifest.sparse
    if name not in CANDIDATES:
        raise ValueError(f"unknown execution {name!r}; expected one of {', '.join(CANDIDATES)}")
    if name == "sparse":
        model_path = payload / manifest.model
        return lambda options: open_sparse_session(model_path, weights, options)
    try:
        skeleton = (payload / spec.dense_model).read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {spec.dense_model}: {exc.strerror}") from exc
    transposed = {layer.tensor: layer.transposed for layer in spec.layers}
    build, precision = (dense_int8_model, "int8") if name == "dense_int8" else (dense_model, "fp32")

    def open_dense(options: SessionOptions) -> InferenceSession:
        return open_session(build(skeleton, weights, transposed), "onnxruntime", options, precision_hint=precision)

    return open_dense


def execution_opener(payload: Path, manifest: Manifest, name: str, limits: SparseLimits | None = None) -> Opener:
    """A function that opens execution ``name`` of a sparse bundle unpacked in ``payload``.

    The weights file is read and checked once, here.

    Args:
        payload: directory holding the bundle's files.
        manifest: its manifest (with ``sparse``).
        name: one of :data:`CANDIDATES` (see :func:`not_applicable` for whether it applies).
        limits: bounds on the weights file (default: :class:`~edge_sdk.bundle.sparse.SparseLimits`).

    Raises:
        BundleFormatError: the weights file is corrupt, beyond ``limits`` or does not
            match the manifest; for ``dense_int8``, a file of float32 values (when the
            opener is called).
        StorageError: a file cannot be read.
        ValueError: ``name`` is not a candidate.
    """
    return _opener(payload, manifest, name, _read_weights(payload, manifest, limits or SparseLimits()))


def _pin(manifest: Manifest, configured: str) -> tuple[str | None, str | None]:
    if configured in CANDIDATES:
        return configured, "config"
    if manifest.execution in CANDIDATES:
        return manifest.execution, "manifest"
    return None, None


def select_execution(
    payload: Path,
    manifest: Manifest,
    spec: BenchmarkSpec,
    configured: str = "auto",
    sample_path: Path | None = None,
) -> tuple[ExecutionChoice, Opener]:
    """Pick how to run a sparse bundle here: by pin, else by measuring every candidate that applies.

    Args:
        payload: directory holding the bundle's files.
        manifest: its manifest (with ``sparse``).
        spec: runs, warm-up and threads, as for the benchmark.
        configured: the agent's ``execution`` setting (``auto`` or one of :data:`CANDIDATES`).
        sample_path: the bundle's sample input, or ``None`` for random inputs.

    Returns:
        The choice (to report and persist) and the opener of the chosen execution.

    Raises:
        BundleFormatError, StorageError: the bundle's sparse files are unusable.
        EdgeError: no candidate could run.
    """
    from device_agent.profiler import health_check, load_feeds  # numpy, with the runtimes

    pinned, by = _pin(manifest, configured)
    options = SessionOptions(threads=spec.threads)
    weights = _read_weights(payload, manifest, SparseLimits())
    skipped = {n: why for n in _REPORTED if (why := not_applicable(manifest, n)) is not None}
    sessions: dict[str, InferenceSession] = {}
    openers: dict[str, Opener] = {}
    feeds: dict[str, dict[str, np.ndarray]] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    errors: dict[str, str] = {}

    def opens(name: str) -> bool:
        """Open and health-check ``name``; on failure record why and return False."""
        if name in skipped:
            errors[name] = skipped[name]
            return False
        try:
            openers[name] = _opener(payload, manifest, name, weights)
            session = sessions[name] = openers[name](options)
            feeds[name] = load_feeds(session, sample_path)
            outputs[name] = health_check(session, feeds[name])
            return True
        except (BundleFormatError, StorageError):
            raise
        except EdgeError as exc:
            errors[name] = exc.message
            log.warning("%s v%s: %s execution cannot run here: %s", manifest.name, manifest.version, name, exc.message)
            if name in sessions:
                sessions.pop(name).close()
            return False

    try:
        if pinned:
            if opens(pinned):
                return ExecutionChoice(pinned, f"pinned by {by}", by), openers[pinned]
            fallback = next((n for n in CANDIDATES if n != pinned and n not in skipped and opens(n)), None)
            if fallback is None:
                raise EdgeError(f"pinned {pinned} execution cannot run ({errors[pinned]}), nor any other")
            reason = f"pinned by {by} to {pinned}, which cannot run here ({errors[pinned]}); ran {fallback}"
            return ExecutionChoice(fallback, reason, by), openers[fallback]
        for name in CANDIDATES:
            if name not in skipped:
                opens(name)
        if "dense" in outputs:
            for name in [n for n in sessions if n in TOLERANCE]:
                why = agreement(outputs["dense"], outputs[name], TOLERANCE[name])
                if why is not None:
                    errors[name] = why
                    log.warning("%s v%s: %s execution disagrees: %s", manifest.name, manifest.version, name, why)
                    sessions.pop(name).close()
        timings = measure(sessions, feeds, spec)
        timings += [CandidateTiming(n, error=e) for n, e in errors.items()]
        timings += [CandidateTiming(n, not_applicable=why) for n, why in skipped.items()]
        timings.sort(key=lambda t: _REPORTED.index(t.name))
        chosen, reason = choose(timings)
        log.info("%s v%s: %s", manifest.name, manifest.version, reason)
        return ExecutionChoice(chosen, reason, None, tuple(timings)), openers[chosen]
    finally:
        for session in sessions.values():
            session.close()


def measure(
    sessions: Mapping[str, InferenceSession], feeds: Mapping[str, dict[str, np.ndarray]], spec: BenchmarkSpec
) -> list[CandidateTiming]:
    """Time each open execution on its feeds in :data:`ROUNDS` interleaved rounds.

    Interleaving keeps a burst of background load from falling on one candidate only;
    each candidate's figures are the median (mean for ``mean_ms``) over the rounds.
    """
    rounds = benchmark_interleaved(
        {name: functools.partial(session.run, feeds[name]) for name, session in sessions.items()},
        rounds=ROUNDS,
        runs_per_round=max(1, spec.runs // ROUNDS),
        warmup=spec.warmup,
        later_warmup=max(1, spec.warmup // 4),
        min_duration_s=spec.min_duration_s,
    )
    return [
        CandidateTiming(
            name,
            p50_ms=sorted(s.p50_ms for s in stats)[ROUNDS // 2],
            p90_ms=sorted(s.p90_ms for s in stats)[ROUNDS // 2],
            mean_ms=sum(s.mean_ms for s in stats) / ROUNDS,
            runs=sum(s.count for s in stats),
        )
        for name, stats in rounds.items()
    ]
