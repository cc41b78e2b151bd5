"""Accuracy guard: quantize, and keep the most sensitive nodes in float until the drop fits.

:class:`AccuracyGuard` wraps a quantization pass. It runs it, measures quality on the
evaluation data, and when the drop exceeds the budget it ranks the quantized nodes by
the error each one adds against the float model (:func:`node_sensitivity`), keeps the
worst one in float and tries again, until the drop fits or too many nodes would stay
float. The report names the nodes that stayed float.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from edge_sdk.errors import CompressionError, ConfigError

from .data import Inputs
from .decompose import decompose_gemm
from .evaluate import Quality, input_feeds, open_host_session
from .passes import PassContext, PassResult
from .quantize import (
    DynamicInt8Quantization,
    Int4WeightOnlyQuantization,
    QuantizationPass,
)

__all__ = ["AccuracyGuard", "node_sensitivity", "WEIGHTED_OPS"]

logger = logging.getLogger(__name__)

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Attention", "LSTM", "GRU", "Gather"})
"""Op types the guard may keep in float: the ones whose weights quantization changes."""

_SENSITIVITY_SAMPLES = 256


@dataclass(frozen=True)
class AccuracyGuard:
    """Run ``inner`` and keep its most sensitive nodes in float until ``max_drop`` is met.

    Args:
        inner: a quantization pass with an ``exclude_nodes`` field.
        max_drop: largest allowed quality drop as a fraction (0.005 is half a point), in
            the run's quality metric (``ctx.quality_metric``: accuracy with labelled
            evaluation data, else top-1 agreement with the input, or cosine).
        max_float_fraction: give up (raise) rather than keep more than this share of the
            quantizable nodes in float.

    Raises:
        ConfigError: ``max_drop`` is negative or ``max_float_fraction`` is outside ``(0, 1]``.
    """

    inner: QuantizationPass
    max_drop: float
    max_float_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not self.max_drop >= 0.0:
            raise ConfigError(f"max accuracy drop must be >= 0, not {self.max_drop}", key="max_accuracy_drop")
        if not 0.0 < self.max_float_fraction <= 1.0:
            raise ConfigError("max_float_fraction must be in (0, 1]", key="max_float_fraction")

    @property
    def name(self) -> str:
        """The inner pass's name: the guard changes which nodes it quantizes, not what it is."""
        return self.inner.name

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Quantize within the accuracy budget.

        Args:
            model: the float model (not modified).
            ctx: must carry evaluation data; calibration data if the inner pass needs it.

        Returns:
            The quantized model; ``notes["float_nodes"]`` lists the nodes kept in float and
            ``notes["guard"]`` every attempt with its drop.

        Raises:
            CompressionError: no evaluation data, or the budget cannot be met without
                keeping more than ``max_float_fraction`` of the nodes in float (names the
                nodes tried and the best drop reached).
        """
        if ctx.evaluation is None:
            raise CompressionError("the accuracy guard needs evaluation data (--eval)")
        reference = onnx.ModelProto()
        reference.CopyFrom(model)
        if isinstance(self.inner, (DynamicInt8Quantization, Int4WeightOnlyQuantization)):
            decompose_gemm(reference)  # the inner pass sees (and names) MatMul nodes
        candidates = [n.name for n in reference.graph.node if n.op_type in WEIGHTED_OPS and n.name]
        limit = int(len(candidates) * self.max_float_fraction)
        quality = Quality(model, ctx.evaluation, ctx.quality_metric)
        base = quality.of(model)
        excluded = list(self.inner.exclude_nodes)
        attempts: list[dict[str, object]] = []
        while True:
            step = dataclasses.replace(self.inner, exclude_nodes=tuple(excluded))
            work = onnx.ModelProto()
            work.CopyFrom(model)
            result = step.run(work, ctx)
            drop = base - quality.of(result.model)
            attempts.append({"float_nodes": list(excluded), "drop": drop})
            logger.info("%s with %d float nodes: drop %.4f (budget %.4f)", self.name, len(excluded), drop, self.max_drop)
            if drop <= self.max_drop:
                notes = dict(result.notes)
                notes.update(float_nodes=list(excluded), guard={"max_drop": self.max_drop, "attempts": attempts})
                return PassResult(result.model, result.changed, notes)
            few = ctx.evaluation.take(slice(0, _SENSITIVITY_SAMPLES)).x
            ranking = node_sensitivity(reference, result.model, few, candidates)
            remaining = [name for name, _ in ranking if name not in excluded]
            if not remaining or len(excluded) >= limit:
                best = min(attempts, key=lambda a: float(a["drop"]))  # type: ignore[arg-type]
                raise CompressionError(
                    f"{self.name}: cannot keep the quality drop within {self.max_drop:.4f}; best was "
                    f"{float(best['drop']):.4f} with {len(best['float_nodes'])} node(s) in float "  # type: ignore[arg-type]
                    f"({', '.join(best['float_nodes']) or 'none'}); "  # type: ignore[arg-type]
                    f"the limit is {limit} of {len(candidates)} quantizable nodes",
                    max_drop=self.max_drop,
                    attempts=attempts,
                )
            logger.info("keeping %s in float (most sensitive remaining node)", remaining[0])
            excluded.append(remaining[0])


def node_sensitivity(
    reference: onnx.ModelProto, quantized: onnx.ModelProto, x: Inputs, candidates: Iterable[str]
) -> list[tuple[str, float]]:
    """Rank nodes by the error they add, comparing intermediate tensors with the float model.

    For every tensor that both models compute (same name), the relative error is
    ``||q - f||^2 / ||f||^2`` on ``x``. A candidate node's score is the error at its
    output (followed through single-consumer non-candidate nodes such as a bias ``Add``,
    when the output itself was fused away) minus the largest error on its inputs: the
    error it adds itself, not the error it inherited.

    Args:
        reference: the float model, with the node names the quantizer was given.
        quantized: the quantized model.
        x: a few evaluation inputs (one array, or one per input name).
        candidates: names of the nodes that may be kept in float.

    Returns:
        ``(node name, added error)`` pairs, worst first; nodes whose output cannot be
        compared are left out.
    """
    quantized_tensors = {out for node in quantized.graph.node for out in node.output}
    float_tensors = [out for node in reference.graph.node for out in node.output if out]
    common = [t for t in float_tensors if t in quantized_tensors]
    f_values = _intermediates(reference, common, x)
    q_values = _intermediates(quantized, common, x)
    error: dict[str, float] = {}
    for name in common:
        f, q = f_values[name].astype(np.float64), q_values[name].astype(np.float64)
        if f.shape != q.shape:
            continue
        error[name] = float(np.sum((q - f) ** 2) / max(np.sum(f**2), 1e-12))
    wanted = set(candidates)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in reference.graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    scores: list[tuple[str, float]] = []
    for node in reference.graph.node:
        if node.name not in wanted or not node.output:
            continue
        tensor: str | None = node.output[0]
        while tensor is not None and tensor not in error:
            following = consumers.get(tensor, [])
            tensor = following[0].output[0] if len(following) == 1 and following[0].name not in wanted else None
        if tensor is None:
            continue
        inherited = max((error.get(inp, 0.0) for inp in node.input), default=0.0)
        scores.append((node.name, error[tensor] - inherited))
    scores.sort(key=lambda item: item[1], reverse=True)
    return scores


def _intermediates(model: onnx.ModelProto, names: list[str], x: Inputs) -> Mapping[str, np.ndarray]:
    """Run ``model`` on ``x`` with ``names`` exposed as extra outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    with open_host_session(probe) as session:
        outputs = [spec.name for spec in session.outputs()]
        feeds = input_feeds(session, x)
        batch = session.inputs()[0].shape[0] if session.inputs()[0].shape else None
        if batch not in (None, 0):
            feeds = {name: value[:batch] for name, value in feeds.items()}
        values = session.run(feeds)
    return dict(zip(outputs, values))
