"""The one-call entry points: :func:`compress` for a model in memory, and
:func:`run_compress_job` for what ``edgectl compress`` does with files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk.errors import CompressionError, ConfigError, ModelLoadError

from .data import Dataset, load_arrays
from .model_file import ModelSource, as_model, load_model, model_from_bytes, save_model_atomic
from .pass_manager import (
    CompressionPass,
    CompressionResult,
    MeasureOptions,
    PassContext,
    PassManager,
    ProgressCallback,
)
from .passes.accuracy_guard import AccuracyGuard
from .passes.quantize import StaticInt8Quantization
from .passes.weight_sharing import pack_model
from .recipe import StepOptions, passes_from_options

if TYPE_CHECKING:
    from .pass_manager import CompressionReport
    from .tflite.quantize import TfliteCompression

__all__ = [
    "DEFAULT_QUANTIZE_WITHOUT_DATA",
    "CompressJob",
    "CompressJobResult",
    "PackedFile",
    "compress",
    "run_compress_job",
]

logger = logging.getLogger(__name__)

DEFAULT_QUANTIZE_WITHOUT_DATA = "int8-dynamic"
"""What ``edgectl compress`` quantizes to without ``--quantize`` and without ``--calib``
(with ``--calib`` the default is ``int8-static``)."""


def compress(
    model: ModelSource,
    steps: Sequence[CompressionPass],
    calibration: Dataset | None = None,
    evaluation: Dataset | None = None,
    progress: ProgressCallback | None = None,
    *,
    seed: int = 0,
    measure: MeasureOptions | None = None,
    training: Dataset | None = None,
    quality_metric: str | None = None,
) -> CompressionResult:
    """Run compression steps on a model and measure every step.

    Args:
        model: an ``onnx.ModelProto`` (not modified), its serialized bytes, or a path to
            an ``.onnx`` file.
        steps: the passes, in order (e.g. ``[StaticInt8Quantization()]``).
        calibration: representative inputs for data-driven passes.
        evaluation: data for the report: labelled gives accuracy, unlabelled gives top-1
            agreement with the input model.
        progress: called with a :class:`~host_tools.compress.pass_manager.ProgressEvent` as work advances.
        seed: seed for passes that use randomness.
        measure: measurement settings; defaults to :class:`MeasureOptions()`.
        training: labelled data for passes that train or measure sensitivity
            (fine-tuning, distillation, sensitivity pruning).
        quality_metric: ``"accuracy"``, ``"agreement"`` or ``"cosine"`` (for models that
            output embeddings rather than class scores); ``None`` picks accuracy for
            labelled evaluation data, else agreement. It scores the report and every
            quality budget (see :class:`~host_tools.compress.evaluate.Quality`).

    Returns:
        The compressed model's bytes and the report. Writing them out is the caller's
        job (see :func:`~host_tools.compress.model_file.save_model_atomic`).

    Raises:
        ModelLoadError: the input model does not load (names the file when given a path).
        CompressionError: a step failed; names the step.
        ConfigError: ``steps`` holds something that is not a pass, or an unknown metric.
    """
    proto = as_model(model)
    manager = PassManager(steps, measure=measure)
    ctx = PassContext(
        calibration=calibration,
        evaluation=evaluation,
        progress=progress,
        seed=seed,
        training=training,
        quality_metric=quality_metric,
    )
    result = manager.run(proto, ctx)
    report = result.report
    logger.info(
        "compressed %d -> %d bytes (%.2fx) in %d steps",
        report.original.size_bytes,
        report.final.size_bytes,
        report.size_ratio,
        len(report.steps),
    )
    return result


@dataclass(frozen=True)
class CompressJob:
    """What ``edgectl compress`` is asked to do: a model file in, compressed files out.

    Data sources are what :func:`~host_tools.compress.data.load_arrays` reads (an
    ``.npz``, an ``.npy`` or ``module:function``).

    Attributes:
        model: the input model, ``.onnx`` or ``.tflite``.
        output: where the compressed model goes.
        steps: the step options (ignored for what a recipe says).
        recipe: a TOML recipe instead of step options.
        packed: where to also write the packed transport form (ONNX only).
        calibration: calibration data.
        evaluation: evaluation data; labelled gives accuracy, unlabelled agreement.
        training: training data for distillation, fine-tuning, sensitivity pruning.
        quality_metric: ``accuracy``, ``agreement`` or ``cosine``; needs ``evaluation``.
    """

    model: Path
    output: Path
    steps: StepOptions = field(default_factory=StepOptions)
    recipe: Path | None = None
    packed: Path | None = None
    calibration: str | None = None
    evaluation: str | None = None
    training: str | None = None
    quality_metric: str | None = None

    @property
    def is_tflite(self) -> bool:
        """Whether the input is a ``.tflite`` model (by its suffix)."""
        return self.model.suffix.lower() == ".tflite"


@dataclass(frozen=True)
class PackedFile:
    """The packed transport form written beside the compressed model.

    Attributes:
        path: where it was written.
        size_bytes: its size.
        shared_tensors: the tensors stored as codebooks and entropy-coded indices.
    """

    path: Path
    size_bytes: int
    shared_tensors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return {"path": str(self.path), "size_bytes": self.size_bytes, "shared_tensors": list(self.shared_tensors)}


@dataclass(frozen=True)
class CompressJobResult:
    """What :func:`run_compress_job` wrote and measured.

    Attributes:
        output: the compressed model file.
        report: the per-step report (ONNX), or the LiteRT comparison (``.tflite``).
        packed: the packed transport form, when asked for.
    """

    output: Path
    report: CompressionReport | TfliteCompression
    packed: PackedFile | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (what ``edgectl compress --json`` prints)."""
        data: dict[str, Any] = {"output": str(self.output), "report": self.report.to_dict()}
        if self.packed is not None:
            data["packed"] = self.packed.to_dict()
        return data


def run_compress_job(job: CompressJob, progress: ProgressCallback | None = None) -> CompressJobResult:
    """Compress a model file as ``edgectl compress`` does, and write the results.

    An ONNX model runs through the passes the job's recipe or step options name, measured
    after every step; a ``.tflite`` model is quantized with ai-edge-quantizer and measured
    in LiteRT. Nothing is written when a step fails or the final model misses the quality
    budget (``steps.max_accuracy_drop``); files are written atomically.

    Args:
        job: what to compress, how, and where to write it.
        progress: called as the work advances (ONNX only); events of phase ``"run"`` count
            the passes (``done`` of ``total``), other phases count work inside one pass.

    Returns:
        The output paths and the report.

    Everything that can be checked without doing the work is checked first: the output
    directories exist and are writable, and the data each step needs was given (static
    quantization needs ``--calib``). Without ``--quantize`` or another step the job
    quantizes to int8: static when calibration data is given, dynamic (no data needed)
    when it is not.

    Raises:
        ConfigError: options that do not fit together or do not fit the model, a bad
            option or data file, an output whose directory is missing or not writable, or
            a static quantization without calibration data.
        ModelLoadError: the model (or a student model) does not load.
        CompressionError: a step failed, or the quality budget was missed.
    """
    _check_outputs(job)
    if job.quality_metric is not None and not job.evaluation:
        raise ConfigError("--quality needs evaluation data (--eval)", key="eval")
    if job.is_tflite:
        return _run_tflite_job(job)
    budget = job.steps.max_accuracy_drop
    if budget is not None and budget >= 0 and not job.evaluation:
        raise ConfigError("--max-accuracy-drop needs evaluation data (--eval)", key="eval")
    steps = passes_from_options(job.steps, job.recipe)
    if not job.calibration and any(_needs_calibration(step) for step in steps):
        if job.recipe is None and job.steps.quantize is None:
            # The default quantization: without data it is the one that needs none.
            steps = passes_from_options(dataclasses.replace(job.steps, quantize=DEFAULT_QUANTIZE_WITHOUT_DATA))
        else:
            wanted = ", ".join(step.name for step in steps if _needs_calibration(step))
            raise ConfigError(
                f"{wanted} needs calibration data: give --calib (a .npz with x, or x.NAME per input; a .npy; or "
                f"module:function), or choose --quantize {DEFAULT_QUANTIZE_WITHOUT_DATA}, which needs none",
                key="calib",
            )
    training = load_arrays(job.training) if job.training else None
    calibration = load_arrays(job.calibration) if job.calibration else None
    evaluation = load_arrays(job.evaluation) if job.evaluation else None
    source = load_model(job.model)
    result = compress(
        source, steps, calibration, evaluation, progress=progress, training=training, quality_metric=job.quality_metric
    )
    report = result.report
    drop = report.quality_drop
    if budget is not None and drop is not None and drop > budget:
        raise CompressionError(
            f"{report.final.quality_metric} dropped by {drop:.4f}, more than --max-accuracy-drop {budget}; "
            "nothing written",
            drop=drop,
        )
    packed_model = pack_model(model_from_bytes(result.model_bytes)) if job.packed else None
    save_model_atomic(result.model_bytes, job.output)
    packed = None
    if packed_model is not None and job.packed is not None:
        save_model_atomic(packed_model.data, job.packed)
        packed = PackedFile(job.packed, packed_model.size_bytes, tuple(packed_model.shared_tensors))
    return CompressJobResult(job.output, report, packed)


def _check_outputs(job: CompressJob) -> None:
    """Check, before any work, that the job's output files can be written.

    Args:
        job: the job; its ``output`` and ``packed`` paths are checked.

    Raises:
        ConfigError: a path is a directory, or its directory is missing, not a directory
            or not writable; the message names the path and the option.
    """
    for flag, key, path in (("-o/--output", "output", job.output), ("--packed", "packed", job.packed)):
        if path is None:
            continue
        parent = path.parent if str(path.parent) else Path(".")
        problem = None
        if path.is_dir():
            problem = "is a directory"
        elif not parent.exists():
            problem = f"cannot be written: directory {parent} does not exist"
        elif not parent.is_dir():
            problem = f"cannot be written: {parent} is not a directory"
        elif not os.access(parent, os.W_OK | os.X_OK):
            problem = f"cannot be written: directory {parent} is not writable"
        if problem is not None:
            raise ConfigError(f"{flag} {path} {problem}; nothing was done", key=key, path=str(path))


def _needs_calibration(step: CompressionPass) -> bool:
    """Whether a step quantizes statically (directly or inside the accuracy guard)."""
    if isinstance(step, AccuracyGuard):
        return _needs_calibration(step.inner)
    return isinstance(step, StaticInt8Quantization)


def _run_tflite_job(job: CompressJob) -> CompressJobResult:
    """``run_compress_job`` for a ``.tflite`` model: ai-edge-quantizer, measured in LiteRT."""
    from .tflite.quantize import compress_tflite

    steps = job.steps
    unsupported = {"--lowrank": steps.lowrank, "--weight-share": steps.weight_share, "--distill": steps.distill,
                   "--prune": steps.prune, "--finetune": steps.finetune_epochs, "--train": job.training,
                   "--recipe": job.recipe, "--packed": job.packed, "--max-accuracy-drop": steps.max_accuracy_drop,
                   "--guard-ranking": steps.guard_ranking}  # fmt: skip
    given = [flag for flag, value in unsupported.items() if value is not None]
    if given:
        raise ConfigError(
            f"a .tflite model takes --quantize, --calib, --eval and --quality only, not {', '.join(given)}"
        )
    try:
        data = job.model.read_bytes()
    except OSError as exc:
        raise ModelLoadError(
            f"{job.model}: cannot read model file ({exc.strerror or exc})", file=str(job.model)
        ) from exc
    calibration = load_arrays(job.calibration) if job.calibration else None
    evaluation = load_arrays(job.evaluation) if job.evaluation else None
    result = compress_tflite(
        data,
        job.steps.quantize or ("int8-static" if job.calibration else DEFAULT_QUANTIZE_WITHOUT_DATA),
        calibration=calibration,
        evaluation=evaluation,
        quality_metric=job.quality_metric,
    )
    save_model_atomic(result.model_bytes, job.output)
    return CompressJobResult(job.output, result)
