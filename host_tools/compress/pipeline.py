"""The one-call entry point that ``edgectl compress`` uses."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .data import Dataset
from .model_file import ModelSource, as_model
from .pass_manager import (
    CompressionPass,
    CompressionResult,
    MeasureOptions,
    PassContext,
    PassManager,
    ProgressCallback,
)

__all__ = ["compress"]

logger = logging.getLogger(__name__)


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
