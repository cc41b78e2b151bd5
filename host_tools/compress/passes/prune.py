"""Unstructured magnitude pruning, by a global threshold, per layer, or by sensitivity.

Pruning sets the weights with the smallest magnitudes to zero. The dense model does not
get smaller or faster by itself; the zeros pay off when the model is weight-shared and
entropy coded for shipping, or run by a sparse kernel. Fine-tuning
(:class:`~host_tools.compress.passes.finetune.FineTune`) then wins back most of the accuracy
while keeping the zeros.

Three ways to choose how much each layer loses:

- :class:`MagnitudePruning` with ``scope="global"``: one threshold for all layers, so
  layers with many small weights lose more (Han et al., 2015, prune this way);
- :class:`MagnitudePruning` with ``scope="layer"``: every layer to the same sparsity;
- :class:`SensitivityPruning`: prune each layer alone at several sparsities, measure how
  much quality it costs, then give the insensitive layers the higher sparsities so that
  the whole model reaches the target.

Sparsity is counted over the weights of the ``Conv``, ``Gemm`` and ``MatMul`` layers
(biases stay dense), which for these models is what the report's ``sparsity`` shows.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

from edge_sdk.errors import CompressionError, ConfigError

from ..evaluate import Quality
from ..layers import WeightLayer, find_layers, replace_initializer, select_layers
from ..pass_manager import PassContext, PassResult

__all__ = ["MagnitudePruning", "SensitivityPruning", "prune_to_sparsity", "weight_sparsity"]

logger = logging.getLogger(__name__)


def _check_fraction(value: float, key: str, *, allow_zero: bool = True) -> None:
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value < 1.0) or math.isnan(value):
        raise ConfigError(f"{key} must be in [0, 1), got {value}", key=key, value=value)


@dataclass(frozen=True)
class MagnitudePruning:
    """Zero the smallest-magnitude weights until the layers reach a target sparsity.

    Args:
        sparsity: fraction of the layers' weights that are zero afterwards, in ``[0, 1)``.
            Zeros already there count; skipped layers count with the zeros they have.
        scope: ``"global"``: one magnitude threshold across all pruned layers;
            ``"layer"``: every pruned layer to ``sparsity`` on its own.
        layer_sparsity: per-layer targets (layer name -> sparsity) that override the
            rest; with ``scope="global"`` the other layers make up the difference.
        skip: layers left as they are (often the first and last).

    Raises:
        ConfigError: a sparsity outside ``[0, 1)`` or an unknown scope.
    """

    sparsity: float = 0.5
    scope: Literal["global", "layer"] = "global"
    layer_sparsity: Mapping[str, float] = field(default_factory=dict)
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_fraction(self.sparsity, "sparsity")
        if self.scope not in ("global", "layer"):
            raise ConfigError(f"pruning scope must be 'global' or 'layer', not {self.scope!r}", key="scope")
        for name, value in self.layer_sparsity.items():
            _check_fraction(value, f"layer_sparsity[{name!r}]")
        object.__setattr__(self, "layer_sparsity", MappingProxyType(dict(self.layer_sparsity)))
        object.__setattr__(self, "skip", tuple(self.skip))

    @property
    def name(self) -> str:
        """The pass name."""
        return f"prune-{self.scope}"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Prune ``model`` in place.

        Args:
            model: a float model.
            ctx: unused.

        Returns:
            The model, with ``notes["layer_sparsity"]`` (sparsity of every layer after)
            and ``notes["sparsity"]``.

        Raises:
            CompressionError: the model has no prunable layers, a named layer does not
                exist, a weight is not float, or the target cannot be reached because the
                skipped layers hold too many of the weights (names them).
        """
        layers = _prunable(model)
        select_layers(layers, self.layer_sparsity, self.name)
        select_layers(layers, self.skip, self.name)
        targets = dict(self.layer_sparsity)
        if self.scope == "layer":
            targets.update({layer.name: self.sparsity for layer in layers if layer.name not in targets})
            for name in self.skip:
                targets.pop(name, None)
        else:
            targets = {k: v for k, v in targets.items() if k not in self.skip}
        return _finish(model, layers, prune_to_sparsity(model, layers, self.sparsity, targets, self.skip, self.scope))


@dataclass(frozen=True)
class SensitivityPruning:
    """Prune insensitive layers harder: per-layer sparsities chosen from measured sensitivity.

    Each layer is pruned alone at every sparsity of ``grid`` and the model's quality
    measured on ``ctx.training`` (else ``ctx.calibration``): accuracy when the data has
    labels, top-1 agreement with the unpruned model when it does not. For a tolerated
    quality drop ``t``, every layer gets the highest sparsity whose drop stays within
    ``t`` (interpolated between grid points); the smallest ``t`` that reaches the
    overall target decides the allocation.

    Args:
        sparsity: overall target, as for :class:`MagnitudePruning`.
        grid: sparsities tried per layer, increasing, each in ``(0, 1)``.
        max_layer_sparsity: no layer is pruned beyond this.
        skip: layers left as they are.
        max_samples: measure on at most this many samples (a seeded random subset).

    Raises:
        ConfigError: a value out of range, or a grid that is not increasing.
    """

    sparsity: float = 0.8
    grid: tuple[float, ...] = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98)
    max_layer_sparsity: float = 0.98
    skip: tuple[str, ...] = ()
    max_samples: int = 1000

    def __post_init__(self) -> None:
        _check_fraction(self.sparsity, "sparsity")
        _check_fraction(self.max_layer_sparsity, "max_layer_sparsity", allow_zero=False)
        object.__setattr__(self, "grid", tuple(float(g) for g in self.grid))
        object.__setattr__(self, "skip", tuple(self.skip))
        if not self.grid or any(not 0.0 < g < 1.0 for g in self.grid) or list(self.grid) != sorted(set(self.grid)):
            raise ConfigError(f"sensitivity grid must be increasing values in (0, 1), got {self.grid}", key="grid")
        if self.max_samples < 1:
            raise ConfigError("max_samples must be at least 1", key="max_samples")

    @property
    def name(self) -> str:
        """The pass name."""
        return "prune-sensitivity"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Measure every layer's sensitivity, allocate sparsities, prune.

        Args:
            model: a float model.
            ctx: needs ``training`` or ``calibration`` data.

        Returns:
            The model, with notes ``layer_sparsity``, ``sensitivity`` (layer -> list of
            ``[sparsity, quality drop]``), ``tolerated_drop`` and ``sparsity``.

        Raises:
            CompressionError: no data, no prunable layers, an unknown skipped layer, or a
                target above what ``max_layer_sparsity`` allows (says the most it allows).
        """
        data = ctx.training or ctx.calibration
        if data is None:
            raise CompressionError(
                "sensitivity pruning needs data to measure on (training or calibration); none was given"
            )
        layers = _prunable(model)
        select_layers(layers, self.skip, self.name)
        free = [layer for layer in layers if layer.name not in self.skip]
        sizes = {layer.name: _weight(model, layer).size for layer in layers}
        total = sum(sizes.values())
        fixed_zeros = sum(
            int(np.count_nonzero(_weight(model, layer) == 0)) for layer in layers if layer.name in self.skip
        )
        reachable = (fixed_zeros + sum(sizes[layer.name] * self.max_layer_sparsity for layer in free)) / total
        if self.sparsity > reachable + 1e-9:
            raise CompressionError(
                f"{self.name}: target sparsity {self.sparsity:.3f} cannot be met; with max_layer_sparsity "
                f"{self.max_layer_sparsity} and skipped layers {list(self.skip)} at most {reachable:.3f} is reachable",
                target=self.sparsity,
                reachable=reachable,
            )
        if len(data) > self.max_samples:
            data = data.take(
                np.sort(np.random.default_rng(ctx.seed).choice(len(data), self.max_samples, replace=False))
            )
        quality = Quality.for_model(model, data, ctx.quality_metric)
        base = quality.original
        grid = [g for g in self.grid if g <= self.max_layer_sparsity]
        if not grid or grid[-1] < self.max_layer_sparsity:
            grid.append(self.max_layer_sparsity)
        curves: dict[str, list[tuple[float, float]]] = {}
        for done, layer in enumerate(free):
            ctx.report(self.name, "sensitivity", done, len(free))
            curve = [(0.0, 0.0)]
            for level in grid:
                trial = onnx.ModelProto()
                trial.CopyFrom(model)
                prune_to_sparsity(trial, layers, 0.0, {layer.name: level}, (), "layer")
                curve.append((level, max(0.0, base - quality.of(trial))))
            curves[layer.name] = curve
            logger.debug("sensitivity of %s: %s", layer.name, curve)
        allocation, tolerated = _allocate(curves, sizes, self.sparsity * total - fixed_zeros)
        prune_to_sparsity(model, layers, 0.0, allocation, self.skip, "layer")
        result = _finish(model, layers, None)
        notes = dict(result.notes)
        notes.update(
            sensitivity={k: [[round(p, 4), round(d, 4)] for p, d in v] for k, v in curves.items()},
            tolerated_drop=round(tolerated, 4),
            quality_metric=quality.metric,
        )
        return PassResult(model, changed=True, notes=notes)


def _inverse(curve: Sequence[tuple[float, float]], tolerance: float) -> float:
    """Highest sparsity whose (monotone, interpolated) drop is within ``tolerance``."""
    best = 0.0
    running = 0.0
    points = [(p, running := max(running, d)) for p, d in curve]
    for (p0, d0), (p1, d1) in itertools.pairwise(points):
        if d1 <= tolerance:
            best = p1
            continue
        if d0 <= tolerance < d1:
            best = p0 + (p1 - p0) * (tolerance - d0) / (d1 - d0)
        break
    return best


def _allocate(
    curves: Mapping[str, Sequence[tuple[float, float]]], sizes: Mapping[str, int], zeros_needed: float
) -> tuple[dict[str, float], float]:
    """Smallest tolerated drop whose allocation holds ``zeros_needed`` zeros; scaled to hit it."""

    def zeros(tolerance: float) -> float:
        return sum(_inverse(curve, tolerance) * sizes[name] for name, curve in curves.items())

    candidates = sorted({0.0} | {d for curve in curves.values() for _, d in curve})
    tolerance = next((t for t in candidates if zeros(t) >= zeros_needed - 1e-6), candidates[-1])
    # Between the last candidate below and this one the allocation is continuous: bisect.
    below = max([t for t in candidates if t < tolerance], default=0.0)
    if below < tolerance and zeros(below) < zeros_needed:
        low, high = below, tolerance
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if zeros(mid) < zeros_needed else (low, mid)
        tolerance = high
    allocation = {name: _inverse(curve, tolerance) for name, curve in curves.items()}
    have = sum(allocation[n] * sizes[n] for n in allocation)
    if have > zeros_needed > 0:
        allocation = {n: p * zeros_needed / have for n, p in allocation.items()}
    elif zeros_needed <= 0:
        allocation = {n: 0.0 for n in allocation}
    return allocation, tolerance


def _prunable(model: onnx.ModelProto) -> list[WeightLayer]:
    layers = find_layers(model)
    if not layers:
        ops = sorted({n.op_type for n in model.graph.node})
        raise CompressionError(
            f"nothing to prune: no Conv, Gemm or MatMul with a constant weight (ops: {ops})", ops=ops
        )
    return layers


def _weight(model: onnx.ModelProto, layer: WeightLayer) -> np.ndarray:
    init = next(i for i in model.graph.initializer if i.name == layer.weight)
    return numpy_helper.to_array(init)


def prune_to_sparsity(
    model: onnx.ModelProto,
    layers: Sequence[WeightLayer],
    sparsity: float,
    layer_targets: Mapping[str, float],
    skip: Sequence[str],
    scope: str,
) -> dict[str, float]:
    """Zero weights in place: named layers to their own targets, the rest to ``sparsity``.

    With ``scope="layer"`` only the layers in ``layer_targets`` are pruned. With
    ``scope="global"`` the layers neither targeted nor skipped share one magnitude
    threshold, chosen so that all layers together reach ``sparsity``.

    Args:
        model: the model, modified in place.
        layers: its layers, from :func:`~host_tools.compress.layers.find_layers`.
        sparsity: the overall target (global scope).
        layer_targets: layer name -> sparsity of that layer.
        skip: layers not touched.
        scope: ``"global"`` or ``"layer"``.

    Returns:
        Layer name -> sparsity after pruning.

    Raises:
        CompressionError: the global target cannot be met by the free layers.
    """
    graph = model.graph
    weights = {layer.name: _weight(model, layer) for layer in layers}
    # Each layer's zeros stay zeros; ties at the threshold are broken by position.
    for name, target in layer_targets.items():
        weights[name] = _zero_smallest(weights[name], round(target * weights[name].size))
    if scope == "global":
        free = [layer.name for layer in layers if layer.name not in layer_targets and layer.name not in skip]
        total = sum(w.size for w in weights.values())
        fixed = sum(int(np.count_nonzero(weights[n] == 0)) for n in weights if n not in free)
        needed = math.ceil(sparsity * total - 1e-9) - fixed
        room = sum(weights[n].size for n in free)
        if needed > room:
            most = (fixed + room) / total
            raise CompressionError(
                f"target sparsity {sparsity:.3f} cannot be met: the layers left dense or pruned to their own "
                f"targets ({sorted(set(weights) - set(free))}) hold too many weights; at most {most:.3f} is reachable",
                target=sparsity,
                reachable=most,
            )
        if needed > 0:
            flat = np.concatenate([np.abs(weights[n]).ravel() for n in free])
            order = np.argsort(flat, kind="stable")
            mask = np.ones(flat.size, dtype=bool)
            mask[order[:needed]] = False
            offset = 0
            for n in free:
                size = weights[n].size
                weights[n] = np.where(mask[offset : offset + size].reshape(weights[n].shape), weights[n], 0).astype(
                    weights[n].dtype
                )
                offset += size
    by_name = {layer.name: layer for layer in layers}
    for name, values in weights.items():
        replace_initializer(graph, by_name[name].weight, values)
    return {name: float(np.mean(values == 0)) for name, values in weights.items()}


def _zero_smallest(values: np.ndarray, count: int) -> np.ndarray:
    """``values`` with at least its ``count`` smallest magnitudes set to zero."""
    if count <= 0:
        return values
    flat = values.ravel().copy()
    order = np.argsort(np.abs(flat), kind="stable")
    flat[order[: min(count, flat.size)]] = 0
    zeroed: np.ndarray = flat.reshape(values.shape)
    return zeroed


def weight_sparsity(model: onnx.ModelProto) -> dict[str, float]:
    """Sparsity of every layer's weight, counted from the values.

    Args:
        model: the model.

    Returns:
        Layer name -> fraction of zeros in its weight.
    """
    return {layer.name: float(np.mean(_weight(model, layer) == 0)) for layer in find_layers(model)}


def _finish(model: onnx.ModelProto, layers: Sequence[WeightLayer], per_layer: Mapping[str, float] | None) -> PassResult:
    per_layer = dict(per_layer) if per_layer is not None else weight_sparsity(model)
    sizes = {layer.name: _weight(model, layer).size for layer in layers}
    overall = sum(per_layer[n] * sizes[n] for n in sizes) / max(1, sum(sizes.values()))
    logger.info("pruned to sparsity %.3f: %s", overall, per_layer)
    return PassResult(
        model,
        changed=True,
        notes={"sparsity": round(overall, 6), "layer_sparsity": {k: round(v, 6) for k, v in per_layer.items()}},
    )
