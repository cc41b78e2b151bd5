"""Accuracy guard: quantize, and keep the most sensitive nodes in float until the drop fits.

:class:`AccuracyGuard` wraps a quantization pass. It runs it, measures quality on the
evaluation data, and when the drop exceeds the budget it ranks the nodes the pass
quantized (:func:`quantized_nodes`), keeps the worst one in float and tries again, until
the drop fits or too many nodes would stay float. The ranking is either the error each
node adds against the float model (:func:`node_sensitivity`, cheap) or the quality
measured with each node alone in float (one quantization per node). The report names
the nodes that stayed float.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import onnx

from edge_sdk.errors import CompressionError, ConfigError

from ..data import Inputs
from ..evaluate import Quality, input_feeds, open_host_session
from ..pass_manager import PassContext, PassResult
from .decompose import decompose_gemm
from .quantize import (
    DynamicInt8Quantization,
    Int4WeightOnlyQuantization,
    QuantizationPass,
)

__all__ = ["WEIGHTED_OPS", "AccuracyGuard", "Ranking", "node_sensitivity", "quantized_nodes"]

logger = logging.getLogger(__name__)

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Attention", "LSTM", "GRU", "Gather"})
"""Op types the guard may keep in float: the ones whose weights quantization changes."""

_SENSITIVITY_SAMPLES = 256


Ranking = Literal["error", "measured"]
"""How the guard orders the nodes it may keep in float (see :class:`AccuracyGuard`)."""


@dataclass(frozen=True)
class AccuracyGuard:
    """Run ``inner`` and keep its most sensitive nodes in float until ``max_drop`` is met.

    Only nodes the inner pass really quantized are candidates (onnxruntime's dynamic mode,
    for one, leaves activation x activation MatMuls in float). Two ways to rank them:

    - ``"error"`` (default, cheap): after each attempt, one run of both models with every
      intermediate tensor exposed; the node that adds the most relative error at its own
      output goes first (:func:`node_sensitivity`). Good for CNNs and MLPs, where local
      error tracks the end result.
    - ``"measured"``: quantize once per candidate with only that node kept in float, and
      rank by the quality each of those models reaches. One quantization per candidate
      (about 2.5 minutes for MiniLM-L6's 38 on a 2-core host), but it ranks by the metric
      itself, which matters for transformers: there a node's local error says little
      about what it does to the output (BERT's FFN outlier channels).

    Args:
        inner: a quantization pass with an ``exclude_nodes`` field.
        max_drop: largest allowed quality drop as a fraction (0.005 is half a point), in
            the run's quality metric (``ctx.quality_metric``: accuracy with labelled
            evaluation data, else top-1 agreement with the input, or cosine).
        max_float_fraction: give up (raise) rather than keep more than this share of the
            nodes the inner pass quantized in float (besides its own ``exclude_nodes``).
        ranking: ``"error"`` or ``"measured"``.

    Raises:
        ConfigError: ``max_drop`` is negative, ``max_float_fraction`` is outside ``(0, 1]``
            or ``ranking`` is unknown.
    """

    inner: QuantizationPass
    max_drop: float
    max_float_fraction: float = 0.5
    ranking: Ranking = "error"

    def __post_init__(self) -> None:
        if not self.max_drop >= 0.0:
            raise ConfigError(f"max accuracy drop must be >= 0, not {self.max_drop}", key="max_accuracy_drop")
        if not 0.0 < self.max_float_fraction <= 1.0:
            raise ConfigError("max_float_fraction must be in (0, 1]", key="max_float_fraction")
        if self.ranking not in get_args(Ranking):
            raise ConfigError(f"guard ranking is 'error' or 'measured', not {self.ranking!r}", key="ranking")

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
            The quantized model; ``notes["float_nodes"]`` lists the nodes kept in float,
            ``notes["guard"]`` every attempt with its drop and, for ``"measured"``, the
            drop with each candidate alone in float.

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
        quality = Quality.for_model(model, ctx.evaluation, ctx.quality_metric)
        base = quality.original
        excluded = list(self.inner.exclude_nodes)
        attempts: list[dict[str, object]] = []
        measured: list[dict[str, object]] | None = None
        limit = 0
        while True:
            result = self._attempt(model, excluded, ctx)
            drop = base - quality.of(result.model)
            attempts.append({"float_nodes": list(excluded), "drop": drop})
            logger.info(
                "%s with %d float nodes: drop %.4f (budget %.4f)", self.name, len(excluded), drop, self.max_drop
            )
            if drop <= self.max_drop:
                notes = dict(result.notes)
                guard: dict[str, object] = {"max_drop": self.max_drop, "ranking": self.ranking, "attempts": attempts}
                if measured is not None:
                    guard["measured"] = measured
                notes.update(float_nodes=list(excluded), guard=guard)
                return PassResult(result.model, result.changed, notes)
            if len(attempts) == 1:
                candidates = quantized_nodes(reference, result.model, candidates)
                limit = int(len(candidates) * self.max_float_fraction)
            if self.ranking == "measured":
                if measured is None:
                    measured = self._measure_each(model, candidates, excluded, ctx, quality, base)
                order = [str(m["node"]) for m in measured]
            else:
                few = ctx.evaluation.take(slice(0, _SENSITIVITY_SAMPLES)).x
                order = [name for name, _ in node_sensitivity(reference, result.model, few, candidates)]
            remaining = [name for name in order if name not in excluded]
            if not remaining or len(excluded) - len(self.inner.exclude_nodes) >= limit:
                best = min(attempts, key=lambda a: float(a["drop"]))  # type: ignore[arg-type]
                raise CompressionError(
                    f"{self.name}: cannot keep the quality drop within {self.max_drop:.4f}; best was "
                    f"{float(best['drop']):.4f} with {len(best['float_nodes'])} node(s) in float "  # type: ignore[arg-type]
                    f"({', '.join(best['float_nodes']) or 'none'}); "  # type: ignore[arg-type]
                    f"the limit is {limit} of {len(candidates)} quantized nodes",
                    max_drop=self.max_drop,
                    attempts=attempts,
                )
            logger.info("keeping %s in float (most sensitive remaining node)", remaining[0])
            excluded.append(remaining[0])

    def _attempt(self, model: onnx.ModelProto, excluded: list[str], ctx: PassContext) -> PassResult:
        step = dataclasses.replace(self.inner, exclude_nodes=tuple(excluded))
        work = onnx.ModelProto()
        work.CopyFrom(model)
        return step.run(work, ctx)

    def _measure_each(
        self,
        model: onnx.ModelProto,
        candidates: list[str],
        excluded: list[str],
        ctx: PassContext,
        quality: Quality,
        base: float,
    ) -> list[dict[str, object]]:
        """The drop with each candidate alone (besides ``excluded``) kept in float, best first."""
        rows: list[dict[str, object]] = []
        todo = [name for name in candidates if name not in excluded]
        for done, name in enumerate(todo):
            ctx.report(self.name, "rank", done, len(todo))
            drop = base - quality.of(self._attempt(model, [*excluded, name], ctx).model)
            rows.append({"node": name, "drop": drop})
        ctx.report(self.name, "rank", len(todo), len(todo))
        rows.sort(key=lambda row: float(row["drop"]))  # type: ignore[arg-type]
        return rows


def quantized_nodes(reference: onnx.ModelProto, quantized: onnx.ModelProto, candidates: Iterable[str]) -> list[str]:
    """The candidates whose weights quantization changed, in graph order.

    Only weight inputs count: the inputs that are float initializers in ``reference``. A
    node counts as quantized when the quantized graph no longer has a node of that name
    and op type (rewritten to an integer op, e.g. ``MatMulInteger``), or when one of its
    weight inputs is now an integer initializer or comes from a ``DequantizeLinear`` of
    one (QDQ, quantized ``Gather`` tables). A node kept in float that merely reads a
    dequantized activation, or a ``Gather`` of int64 shape indices, does not count.
    """
    float_inits = {i.name for i in reference.graph.initializer if i.data_type in _FLOAT_TYPES}
    kinds = {n.name: n for n in reference.graph.node}
    same = {n.name: n for n in quantized.graph.node}
    integer = {i.name for i in quantized.graph.initializer if i.data_type not in _FLOAT_TYPES}
    from_integer = {
        out for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.input and n.input[0] in integer
        for out in n.output
    }  # fmt: skip
    result = []
    for name in candidates:
        before, after = kinds.get(name), same.get(name)
        if before is None:
            continue
        if after is None or after.op_type != before.op_type:
            result.append(name)
            continue
        weights = [i for i, inp in enumerate(before.input) if inp in float_inits]
        if any(i < len(after.input) and (after.input[i] in integer or after.input[i] in from_integer) for i in weights):
            result.append(name)
    return result


_FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)


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
    return dict(zip(outputs, values, strict=False))
