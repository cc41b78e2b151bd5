"""Which way to run a bundle on this device: measure the ones that apply, keep the fastest.

A bundle with weight-sparse layers (the manifest's ``sparse`` field) can run two ways:

- ``dense``: the dense graph with its weights rebuilt from the CSR file, in memory only;
  onnxruntime's ordinary (MLAS) matrix products;
- ``sparse``: the sparse graph, each sparse layer an onnxruntime
  ``SparseToDenseMatMul`` node with its CSR weight bound (:mod:`edge_sdk.runtime._sparse`).

Which is faster depends on the sparsity, the batch size, the layer shapes and the
device's caches and memory bandwidth, so it is measured, here, on the bundle's sample
input: each candidate is health-checked, then timed with the same machinery as the
benchmark (:func:`edge_sdk.metrics.benchmark`), in interleaved rounds so that a burst of
background load does not fall on one candidate only. The lowest median wins. A
candidate that cannot run (an onnxruntime build without the sparse kernel, say) is
reported with its error and never chosen.

A pin skips the measurement: the agent's ``execution`` setting (when not ``auto``) wins
over the manifest's ``execution``; a pinned candidate that cannot run falls back to the
other one, with the reason reported.

:func:`choose` is pure; :func:`select_execution` does the I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.bundle import Manifest
from edge_sdk.bundle.sparse import SparseLimits, decode_sparse_weights, dense_model
from edge_sdk.errors import BundleFormatError, EdgeError, StorageError
from edge_sdk.metrics import benchmark
from edge_sdk.protocol import BenchmarkSpec
from edge_sdk.runtime import InferenceSession, SessionOptions, open_session, open_sparse_session

__all__ = [
    "CANDIDATES",
    "CandidateTiming",
    "ExecutionChoice",
    "Opener",
    "choose",
    "execution_opener",
    "select_execution",
]

log = logging.getLogger(__name__)

#: Executions a sparse bundle offers, in the order they are measured.
CANDIDATES = ("dense", "sparse")
#: Timed rounds per candidate; each round runs ``spec.runs / ROUNDS`` times.
ROUNDS = 3
#: Largest sparse weights file read, in bytes.
MAX_WEIGHTS_BYTES = 2 << 30

Opener = Callable[[SessionOptions], InferenceSession]
"""Opens one execution of a bundle with the given session options."""


@dataclass(frozen=True)
class CandidateTiming:
    """How one execution measured, or why it could not run.

    Attributes:
        name: ``dense`` or ``sparse``.
        p50_ms, p90_ms, mean_ms: latency over the timed runs (``None`` on error).
        runs: timed runs.
        error: why it could not run, or ``None``.
    """

    name: str
    p50_ms: float | None = None
    p90_ms: float | None = None
    mean_ms: float | None = None
    runs: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "mean_ms": self.mean_ms, "runs": self.runs}
        if self.error is not None:
            d["error"] = self.error
        return d


@dataclass(frozen=True)
class ExecutionChoice:
    """The execution picked for a bundle on this device, and why.

    Attributes:
        chosen: ``dense`` or ``sparse``.
        reason: one line for humans.
        pinned_by: ``"config"``, ``"manifest"`` or ``None`` (measured).
        candidates: what each candidate measured (empty when pinned).
    """

    chosen: str
    reason: str
    pinned_by: str | None = None
    candidates: tuple[CandidateTiming, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "reason": self.reason,
            "pinned_by": self.pinned_by,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def choose(timings: Sequence[CandidateTiming]) -> tuple[str, str]:
    """The candidate with the lowest median latency among those that ran.

    Args:
        timings: one per candidate.

    Returns:
        ``(name, reason)``.

    Raises:
        EdgeError: no candidate ran (the errors are in the message).
    """
    ran = [t for t in timings if t.error is None and t.p50_ms is not None]
    if not ran:
        raise EdgeError("no execution of this bundle could run: " + "; ".join(f"{t.name}: {t.error}" for t in timings))
    best = min(ran, key=lambda t: t.p50_ms)  # type: ignore[arg-type, return-value]
    others = ", ".join(f"{t.name} {t.p50_ms:.3f} ms" for t in ran if t is not best)
    failed = ", ".join(f"{t.name} could not run ({t.error})" for t in timings if t.error is not None)
    reason = f"measured: {best.name} {best.p50_ms:.3f} ms p50" + (f" vs {others}" if others else "")
    return best.name, reason + (f"; {failed}" if failed else "")


def execution_opener(payload: Path, manifest: Manifest, name: str, limits: SparseLimits = SparseLimits()) -> Opener:
    """A function that opens execution ``name`` of a sparse bundle unpacked in ``payload``.

    The weights file is read and checked once, here.

    Raises:
        BundleFormatError: the weights file is corrupt or beyond ``limits``.
        StorageError: a file cannot be read.
    """
    assert manifest.sparse is not None
    spec = manifest.sparse
    path = payload / spec.weights
    try:
        if path.stat().st_size > MAX_WEIGHTS_BYTES:
            raise BundleFormatError(f"sparse weights file {spec.weights} is larger than {MAX_WEIGHTS_BYTES} bytes")
        weights = decode_sparse_weights(path.read_bytes(), limits)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
    expected = {l.tensor: l for l in spec.layers}
    if set(weights) != set(expected) or any(weights[n].shape != expected[n].shape for n in expected):
        raise BundleFormatError(f"sparse weights file {spec.weights} does not hold the layers the manifest lists")
    if name == "sparse":
        model_path = payload / manifest.model
        return lambda options: open_sparse_session(model_path, weights, options)
    try:
        skeleton = (payload / spec.dense_model).read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {spec.dense_model}: {exc.strerror}") from exc
    transposed = {l.tensor: l.transposed for l in spec.layers}

    def open_dense(options: SessionOptions) -> InferenceSession:
        return open_session(dense_model(skeleton, weights, transposed), "onnxruntime", options, precision_hint="fp32")

    return open_dense


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
    """Pick how to run a sparse bundle here: by pin, else by measuring every candidate.

    Args:
        payload: directory holding the bundle's files.
        manifest: its manifest (with ``sparse``).
        spec: runs, warm-up and threads, as for the benchmark.
        configured: the agent's ``execution`` setting (``auto``, ``dense``, ``sparse``).
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
    sessions: dict[str, InferenceSession] = {}
    openers: dict[str, Opener] = {}
    errors: dict[str, str] = {}
    names = [pinned] if pinned else list(CANDIDATES)
    if pinned:
        names += [c for c in CANDIDATES if c != pinned]  # the fallback, opened only if needed
    try:
        for name in names:
            if pinned and name != pinned and pinned not in errors:
                break
            try:
                openers[name] = execution_opener(payload, manifest, name)
                session = openers[name](options)
                sessions[name] = session
                feeds = load_feeds(session, sample_path)
                health_check(session, feeds)
            except (BundleFormatError, StorageError):
                raise
            except EdgeError as exc:
                errors[name] = exc.message
                log.warning("%s v%s: %s execution cannot run here: %s", manifest.name, manifest.version, name, exc.message)
                if name in sessions:
                    sessions.pop(name).close()
        if pinned:
            if pinned not in errors:
                return ExecutionChoice(pinned, f"pinned by {by}", by), openers[pinned]
            fallback = next((n for n in sessions if n != pinned), None)
            if fallback is None:
                raise EdgeError(f"pinned {pinned} execution cannot run ({errors[pinned]}), nor any other")
            reason = f"pinned by {by} to {pinned}, which cannot run here ({errors[pinned]}); ran {fallback}"
            return ExecutionChoice(fallback, reason, by), openers[fallback]
        timings = _measure(sessions, sample_path, spec, load_feeds)
        timings += [CandidateTiming(n, error=e) for n, e in errors.items()]
        timings.sort(key=lambda t: CANDIDATES.index(t.name))
        chosen, reason = choose(timings)
        log.info("%s v%s: %s", manifest.name, manifest.version, reason)
        return ExecutionChoice(chosen, reason, None, tuple(timings)), openers[chosen]
    finally:
        for session in sessions.values():
            session.close()


def _measure(
    sessions: dict[str, InferenceSession], sample_path: Path | None, spec: BenchmarkSpec, load_feeds: Callable[..., Any]
) -> list[CandidateTiming]:
    feeds = {name: load_feeds(s, sample_path) for name, s in sessions.items()}
    per_round = max(1, spec.runs // ROUNDS)
    medians: dict[str, list[float]] = {n: [] for n in sessions}
    p90s: dict[str, list[float]] = {n: [] for n in sessions}
    means: dict[str, list[float]] = {n: [] for n in sessions}
    runs = dict.fromkeys(sessions, 0)
    for r in range(ROUNDS):
        for name, session in sessions.items():
            f = feeds[name]
            stats = benchmark(
                lambda s=session, f=f: s.run(f),
                warmup=spec.warmup if r == 0 else max(1, spec.warmup // 4),
                runs=per_round,
                min_duration_s=spec.min_duration_s / ROUNDS,
            )
            d = stats.to_dict()
            medians[name].append(d["p50_ms"])
            p90s[name].append(d["p90_ms"])
            means[name].append(d["mean_ms"])
            runs[name] += int(d["count"])
    return [
        CandidateTiming(
            name,
            p50_ms=sorted(medians[name])[ROUNDS // 2],
            p90_ms=sorted(p90s[name])[ROUNDS // 2],
            mean_ms=sum(means[name]) / ROUNDS,
            runs=runs[name],
        )
        for name in sessions
    ]
