"""The pass framework: compression steps as passes, run and measured by a pass manager.

A pass is anything with a ``name`` and a ``run(model, ctx) -> PassResult`` method: it
takes an ``onnx.ModelProto`` and returns one, says whether it changed anything, and
never touches the disk outside private temp files. Quantization, pruning, low-rank
factorization, distillation and weight sharing are each one pass.

:class:`PassManager` runs a sequence of passes. After each step that changed the model it
checks the result (``onnx.checker`` and an onnxruntime load) and measures it (size,
parameters, sparsity, accuracy or agreement, host latency), so the report shows what
every step bought and what it cost. A failing step is named in the
:class:`~edge_sdk.errors.CompressionError` it raises.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, runtime_checkable

import onnx

from edge_sdk.errors import CompressionError, ConfigError, EdgeError

from .data import Dataset
from .evaluate import (
    Quality,
    count_parameters,
    host_latency_ms,
    measure_sparsity,
    model_size_bytes,
    open_host_session,
)

__all__ = [
    "CompressionPass",
    "CompressionReport",
    "CompressionResult",
    "MeasureOptions",
    "ModelMetrics",
    "PassContext",
    "PassManager",
    "PassResult",
    "ProgressCallback",
    "ProgressEvent",
    "StepReport",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressEvent:
    """One tick of progress, for a CLI progress bar or a log line.

    Attributes:
        step: the pass name, or ``"original"`` while the input model is measured.
        phase: what is happening: ``"measure"``, ``"run"``, ``"check"``, ``"calibrate"``...
        done: units finished so far.
        total: units in all (steps for the manager, batches for calibration).
    """

    step: str
    phase: str
    done: int
    total: int


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class PassContext:
    """What a pass may use besides the model. Built once per compression run.

    Attributes:
        calibration: representative inputs (labels unused), for static quantization and
            other data-driven passes.
        evaluation: data for measuring each step; with labels it gives accuracy, without
            them top-1 agreement with the original model (or see ``quality_metric``).
        progress: called with a :class:`ProgressEvent` as work advances.
        seed: seed for any randomness a pass uses.
        training: labelled data for passes that train (fine-tuning, distillation) or
            measure layer sensitivity; keep it apart from ``evaluation``.
        quality_metric: how quality is scored, for the report and for every pass that
            searches under a quality budget: one of
            :data:`~host_tools.compress.evaluate.QUALITY_METRICS`, or ``None`` for
            accuracy with labels, else agreement (see :class:`~host_tools.compress.evaluate.Quality`).
    """

    calibration: Dataset | None = None
    evaluation: Dataset | None = None
    progress: ProgressCallback | None = None
    seed: int = 0
    training: Dataset | None = None
    quality_metric: str | None = None

    def report(self, step: str, phase: str, done: int, total: int) -> None:
        """Send a progress event if anyone listens; callback errors are logged, not raised."""
        if self.progress is None:
            return
        try:
            self.progress(ProgressEvent(step, phase, done, total))
        except Exception:  # a broken progress bar must not abort a compression run
            logger.exception("progress callback failed")


@dataclass(frozen=True)
class PassResult:
    """What a pass returns.

    Attributes:
        model: the transformed model (may be the input object when nothing changed).
        changed: whether the pass modified the model.
        notes: JSON-serialisable facts about what the pass did (e.g. how many nodes it
            quantized); they appear in the report.
    """

    model: onnx.ModelProto
    changed: bool
    notes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "notes", MappingProxyType(dict(self.notes)))


@runtime_checkable
class CompressionPass(Protocol):
    """A compression step.

    A pass may modify the model it is given in place (the manager hands it a copy that
    nobody else holds) and must return the resulting model. It reports failures as
    exceptions; the manager names the step in the :class:`CompressionError` it raises.
    """

    @property
    def name(self) -> str:
        """Short stable name shown in reports and errors, e.g. ``"int8-static"``."""
        ...

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Transform ``model``.

        Args:
            model: the model after the previous step.
            ctx: data, progress callback and seed.

        Returns:
            The new model and whether it changed.
        """
        ...


@dataclass(frozen=True)
class MeasureOptions:
    """How the pass manager measures each step.

    Attributes:
        latency: whether to time the model on this host at all.
        latency_runs: timed runs per step (batch 1, one thread).
        latency_warmup: untimed runs before them.
        batch_size: batch size for accuracy runs.
    """

    latency: bool = True
    latency_runs: int = 30
    latency_warmup: int = 5
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.latency_runs < 1 or self.latency_warmup < 0 or self.batch_size < 1:
            raise ConfigError(
                "measure options need latency_runs >= 1, latency_warmup >= 0 and batch_size >= 1",
                latency_runs=self.latency_runs,
                latency_warmup=self.latency_warmup,
                batch_size=self.batch_size,
            )


@dataclass(frozen=True)
class ModelMetrics:
    """Measurements of one model.

    Attributes:
        size_bytes: serialized size.
        parameters: elements of all initializers.
        sparsity: fraction of zero weights (initializers of rank >= 2).
        quality: the figure of ``quality_metric`` (accuracy and agreement in ``[0, 1]``,
            cosine in ``[-1, 1]``); ``None`` without evaluation data.
        quality_metric: ``"accuracy"`` (labelled data), ``"agreement"`` (top-1 agreement
            with the original model), ``"cosine"`` (lowest per-sample cosine similarity of
            the first output to the original's; see :class:`~host_tools.compress.evaluate.Quality`)
            or ``None``.
        latency_p50_ms: median latency on this host, or ``None`` when not measured.
    """

    size_bytes: int
    parameters: int
    sparsity: float
    quality: float | None
    quality_metric: str | None
    latency_p50_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StepReport:
    """One pass as it ran.

    Attributes:
        name: the pass name.
        changed: whether it changed the model (unchanged steps repeat the previous metrics).
        seconds: wall time of the pass itself, measurements excluded.
        metrics: the model after this step.
        notes: what the pass said about its work.
    """

    name: str
    changed: bool
    seconds: float
    metrics: ModelMetrics
    notes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "notes", MappingProxyType(dict(self.notes)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return {
            "name": self.name,
            "changed": self.changed,
            "seconds": self.seconds,
            "metrics": self.metrics.to_dict(),
            "notes": dict(self.notes),
        }


@dataclass(frozen=True)
class CompressionReport:
    """The original model's metrics and every step's, in order.

    Attributes:
        original: metrics of the input model.
        steps: one report per pass.
    """

    SCHEMA_VERSION: ClassVar[int] = 1

    original: ModelMetrics
    steps: tuple[StepReport, ...] = ()

    @property
    def final(self) -> ModelMetrics:
        """Metrics of the output model."""
        return self.steps[-1].metrics if self.steps else self.original

    @property
    def size_ratio(self) -> float:
        """Original size over final size (3.0 means three times smaller)."""
        return self.original.size_bytes / max(1, self.final.size_bytes)

    @property
    def quality_drop(self) -> float | None:
        """Original quality minus final quality (0.01 is one point), when measured."""
        if self.original.quality is None or self.final.quality is None:
            return None
        return self.original.quality - self.final.quality

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form, with a schema version."""
        return {
            "schema_version": self.SCHEMA_VERSION,
            "original": self.original.to_dict(),
            "steps": [step.to_dict() for step in self.steps],
            "final": self.final.to_dict(),
            "size_ratio": self.size_ratio,
            "quality_drop": self.quality_drop,
        }


@dataclass(frozen=True)
class CompressionResult:
    """The compressed model and the report on how it got there.

    Attributes:
        model_bytes: the serialized output model.
        report: per-step measurements.
    """

    model_bytes: bytes
    report: CompressionReport


class PassManager:
    """Runs passes in order, checking and measuring the model after each.

    Args:
        passes: the steps, run in the order given.
        measure: how to measure each step.

    Raises:
        ConfigError: an element of ``passes`` is not a :class:`CompressionPass`.
    """

    def __init__(self, passes: Sequence[CompressionPass], *, measure: MeasureOptions | None = None) -> None:
        for step in passes:
            if not isinstance(step, CompressionPass):
                raise ConfigError(f"{step!r} is not a compression pass (needs name and run())")
        self.passes: tuple[CompressionPass, ...] = tuple(passes)
        self.measure = measure or MeasureOptions()

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> CompressionResult:
        """Run every pass on a copy of ``model``.

        Args:
            model: the input model; it is not modified.
            ctx: data, progress and seed; an empty context when omitted.

        Returns:
            The final model's bytes and the report.

        Raises:
            CompressionError: a pass raised, returned something that is not a
                :class:`PassResult`, or produced a model that fails ``onnx.checker`` or does
                not load in onnxruntime; ``details["step"]`` and the message name the step.
            ModelLoadError: the input model itself does not load in onnxruntime.
        """
        ctx = ctx or PassContext()
        total = len(self.passes)
        current = onnx.ModelProto()
        current.CopyFrom(model)
        ctx.report("original", "measure", 0, total)
        meter = _Meter(current, ctx, self.measure)
        original = meter.measure(current, original=True)
        logger.info("original model: %s", original)
        steps: list[StepReport] = []
        metrics = original
        for index, step in enumerate(self.passes):
            name = step.name
            ctx.report(name, "run", index, total)
            started = time.perf_counter()
            result = self._run_step(step, name, index, current, ctx)
            seconds = time.perf_counter() - started
            if result.changed:
                ctx.report(name, "check", index, total)
                _check(result.model, name, index)
                ctx.report(name, "measure", index, total)
                metrics = meter.measure(result.model)
            current = result.model
            logger.info("step %d/%d %s: changed=%s %.2fs %s", index + 1, total, name, result.changed, seconds, metrics)
            steps.append(StepReport(name, result.changed, seconds, metrics, result.notes))
        ctx.report("final", "done", total, total)
        return CompressionResult(current.SerializeToString(), CompressionReport(original, tuple(steps)))

    @staticmethod
    def _run_step(step: CompressionPass, name: str, index: int, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        try:
            result: object = step.run(model, ctx)  # a plug-in pass may return anything
        except Exception as exc:  # any failure inside a pass becomes a CompressionError naming it
            details = dict(exc.details) if isinstance(exc, EdgeError) else {}
            message = exc.message if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"
            details.update(step=name, step_index=index)
            raise CompressionError(f"compression step {index + 1} ({name}) failed: {message}", **details) from exc
        if not isinstance(result, PassResult) or not isinstance(result.model, onnx.ModelProto):
            raise CompressionError(
                f"compression step {index + 1} ({name}) returned {type(result).__name__}, "
                "not a PassResult with a model",
                step=name,
                step_index=index,
            )
        return result


class _Meter:
    """Measures models the same way for every step of one run."""

    def __init__(self, original: onnx.ModelProto, ctx: PassContext, options: MeasureOptions) -> None:
        self.options = options
        self.quality = (
            None if ctx.evaluation is None
            else Quality.for_model(original, ctx.evaluation, ctx.quality_metric, options.batch_size)
        )  # fmt: skip
        # Calibration data is not used as the latency sample: checking its shape is the
        # job of the pass that needs it, which names the problem better.
        self.sample = ctx.evaluation.take(slice(0, 1)).x if ctx.evaluation is not None else None

    def measure(self, model: onnx.ModelProto, *, original: bool = False) -> ModelMetrics:
        """``original``: ``model`` is the run's input, whose quality :class:`Quality` has already
        scored when it ran it for reference; it is not run again."""
        model_bytes = model.SerializeToString()
        quality: float | None = None
        metric: str | None = None
        if self.quality is not None:
            quality = self.quality.original if original else self.quality.of(model_bytes)
            metric = self.quality.metric
        latency = None
        if self.options.latency:
            latency = host_latency_ms(
                model_bytes, self.sample, runs=self.options.latency_runs, warmup=self.options.latency_warmup
            )
        return ModelMetrics(
            size_bytes=model_size_bytes(model_bytes),
            parameters=count_parameters(model),
            sparsity=measure_sparsity(model),
            quality=quality,
            quality_metric=metric,
            latency_p50_ms=latency,
        )


def _check(model: onnx.ModelProto, name: str, index: int) -> None:
    """Postcondition of every changing step: a valid ONNX model that onnxruntime loads."""
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError and size limits
        raise CompressionError(
            f"compression step {index + 1} ({name}) produced an invalid ONNX model: {exc}", step=name, step_index=index
        ) from exc
    try:
        open_host_session(model).close()
    except EdgeError as exc:
        raise CompressionError(
            f"compression step {index + 1} ({name}) produced a model onnxruntime cannot load: {exc.message}",
            step=name,
            step_index=index,
        ) from exc
