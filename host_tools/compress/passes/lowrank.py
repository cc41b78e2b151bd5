"""Low-rank factorization: replace a layer's weight by two thinner factors from an SVD.

A ``Gemm``/``MatMul`` weight ``W`` (``[in, out]`` in MatMul layout) becomes
``A @ B`` with ``A = U_r sqrt(S_r)`` (``[in, r]``) and ``B = sqrt(S_r) V_r^T``
(``[r, out]``), the best rank-``r`` approximation (Eckart-Young); the layer becomes two
products through an ``r``-wide bottleneck. A 1x1 ``Conv`` is the same product per pixel
and becomes two 1x1 convolutions. A layer is factorized only when the two factors hold
fewer values than ``W`` (``r * (in + out) < in * out``) by at least ``min_saving``.

The rank of each layer is chosen by retained energy (the smallest ``r`` whose singular
values keep ``energy`` of ``sum(s**2)``). :class:`LowRankFactorization` can instead pick
that one energy threshold, shared by all layers, to meet a target:

- ``param_ratio``, a parameter reduction: the highest threshold at which the eligible
  layers together hold at most ``1 / param_ratio`` of their weight values (an exact
  search over the thresholds where some layer's rank changes). Layers with a flat
  spectrum keep more rank than layers whose energy sits in a few directions.
- ``max_drop``, an accuracy budget: a bisection for the lowest threshold whose quality
  drop on the evaluation data stays within the budget.

Factorizing is usually followed by :class:`~host_tools.compress.passes.finetune.FineTune`,
which trains the two factors of each layer and keeps their shapes (the rank).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_sdk.errors import CompressionError, ConfigError

from ..evaluate import Quality
from ..layers import drop_unused_initializers, node_attributes
from ..pass_manager import PassContext, PassResult

__all__ = ["LowRankFactorization", "rank_for_energy"]

logger = logging.getLogger(__name__)

_BISECTION_STEPS = 7


def rank_for_energy(singular_values: np.ndarray, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` of the total squared sum.

    Args:
        singular_values: in descending order.
        energy: share to keep, in ``(0, 1]``.

    Returns:
        A rank between 1 and ``len(singular_values)``.
    """
    kept = _kept_energy(singular_values)
    if not len(kept):
        return 1
    return int(min(len(kept), np.searchsorted(kept, energy - 1e-12) + 1))


@dataclass(frozen=True)
class _Layer:
    """A factorizable node: where its weight is and how it maps to ``[in, out]``."""

    index: int
    name: str
    kind: str  # "matmul", "gemm" or "conv1x1"
    weight: np.ndarray  # [in, out]
    singular_values: np.ndarray
    u: np.ndarray
    vt: np.ndarray


@dataclass(frozen=True)
class LowRankFactorization:
    """Factorize large ``Gemm``/``MatMul``/1x1 ``Conv`` weights with a truncated SVD.

    Args:
        energy: retained share of squared singular values per layer, in ``(0, 1]``;
            ignored when ``param_ratio`` or ``max_drop`` is set.
        param_ratio: parameter reduction target (2.0 means at least 2x fewer): choose the
            highest shared energy threshold at which the eligible layers hold at most
            ``1 / param_ratio`` of their weight values, layers left dense counted in full.
        max_drop: quality budget (fraction; 0.01 is one point): choose the lowest shared
            energy threshold whose drop on the evaluation data is within it.
        min_params: leave layers with fewer weight values than this alone.
        min_saving: factorize a layer only when the factors hold at most this share of
            its values (0.8 means at least 20% fewer).
        layers: only these node names (default: every eligible node).

    Raises:
        ConfigError: an option is out of range, or both ``param_ratio`` and ``max_drop``
            are given.
    """

    energy: float = 0.9
    param_ratio: float | None = None
    max_drop: float | None = None
    min_params: int = 4096
    min_saving: float = 0.8
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"energy must be in (0, 1], not {self.energy}", key="energy")
        if self.max_drop is not None and not self.max_drop >= 0.0:
            raise ConfigError(f"max_drop must be >= 0, not {self.max_drop}", key="max_drop")
        if self.param_ratio is not None and not self.param_ratio > 1.0:
            raise ConfigError(f"param_ratio must be > 1, not {self.param_ratio}", key="param_ratio")
        if self.param_ratio is not None and self.max_drop is not None:
            raise ConfigError("give param_ratio or max_drop, not both", key="param_ratio")
        if not 0.0 < self.min_saving <= 1.0:
            raise ConfigError(f"min_saving must be in (0, 1], not {self.min_saving}", key="min_saving")

    @property
    def name(self) -> str:
        """The pass name."""
        return "lowrank"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Factorize the eligible layers.

        Args:
            model: the model (not modified; a factorized copy is returned).
            ctx: with ``max_drop``, must carry evaluation data.

        Returns:
            The factorized model; notes give per-layer shapes, ranks and parameters
            before and after, and the energy threshold used.

        Raises:
            CompressionError: a named layer does not exist or cannot be factorized (says
                why), no layer is eligible, ``param_ratio`` cannot be reached even at rank 1
                (says the most it can reach), or ``max_drop`` is set without evaluation data.
        """
        layers = self._find_layers(model)
        if self.max_drop is None:
            energy = self.energy if self.param_ratio is None else self._energy_for_ratio(layers, self.param_ratio)
            factorized, details = _factorize(model, layers, energy, self.min_saving)
        else:
            if ctx.evaluation is None:
                raise CompressionError("low-rank with an accuracy budget needs evaluation data (--eval)")
            energy, factorized, details = self._search(model, layers, ctx)
        before = sum(int(d["params_before"]) for d in details)
        after = sum(int(d["params_after"]) for d in details)
        return PassResult(
            factorized,
            changed=bool(details),
            notes={
                "energy": energy,
                "param_ratio": self.param_ratio,
                "layers": details,
                "factorized_params_before": before,
                "factorized_params_after": after,
            },
        )

    def _find_layers(self, model: onnx.ModelProto) -> list[_Layer]:
        inits = {i.name: i for i in model.graph.initializer}
        wanted = set(self.layers)
        names = {n.name for n in model.graph.node}
        missing = sorted(wanted - names)
        if missing:
            raise CompressionError(f"low-rank: no node named {', '.join(missing)} in the model", layers=missing)
        found: list[_Layer] = []
        for index, node in enumerate(model.graph.node):
            if wanted and node.name not in wanted:
                continue
            weight, why = _weight_of(node, inits)
            if weight is None:
                if wanted:
                    raise CompressionError(f"low-rank: cannot factorize node {node.name!r}: {why}", layer=node.name)
                continue
            if weight.size < self.min_params and not wanted:
                continue
            u, s, vt = np.linalg.svd(weight.astype(np.float64), full_matrices=False)
            kind = {"MatMul": "matmul", "Gemm": "gemm", "Conv": "conv1x1"}[node.op_type]
            found.append(_Layer(index, node.name or f"{node.op_type}_{index}", kind, weight, s, u, vt))
        if not found:
            raise CompressionError(
                f"low-rank: no Gemm, MatMul or 1x1 Conv with a constant weight of at least {self.min_params} values",
                min_params=self.min_params,
            )
        return found

    def _energy_for_ratio(self, layers: list[_Layer], ratio: float) -> float:
        """The highest shared energy threshold at which ``layers`` shrink by ``ratio`` or more."""
        before = sum(layer.weight.size for layer in layers)
        # Every threshold at which some layer's rank changes; the total size is
        # non-decreasing in the threshold, so a binary search finds the highest that fits.
        thresholds = np.unique(np.concatenate([[1.0], *(_kept_energy(layer.singular_values) for layer in layers)]))
        least = _total_params(layers, float(thresholds[0]), self.min_saving)
        if least * ratio > before:
            best = before / least
            raise CompressionError(
                f"low-rank: cannot reach {ratio:g}x fewer parameters in these layers; at most {best:.2f}x "
                f"(rank 1, min_saving {self.min_saving})",
                param_ratio=ratio,
                reachable=round(best, 4),
            )
        low, high = 0, len(thresholds) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if _total_params(layers, float(thresholds[middle]), self.min_saving) * ratio <= before:
                low = middle
            else:
                high = middle - 1
        energy = float(thresholds[low])
        logger.info("low-rank: energy %.6f gives >= %.2fx fewer parameters", energy, ratio)
        return energy

    def _search(
        self, model: onnx.ModelProto, layers: list[_Layer], ctx: PassContext
    ) -> tuple[float, onnx.ModelProto, list[dict[str, Any]]]:
        assert ctx.evaluation is not None and self.max_drop is not None
        scorer = Quality.for_model(model, ctx.evaluation, ctx.quality_metric)
        quality, base = scorer.of, scorer.original
        low, high = 0.5, 1.0
        best: tuple[float, onnx.ModelProto, list[dict[str, Any]]] | None = None
        for step in range(_BISECTION_STEPS):
            energy = low if step == 0 else (low + high) / 2
            ctx.report(self.name, "search", step + 1, _BISECTION_STEPS)
            candidate, details = _factorize(model, layers, energy, self.min_saving)
            drop = base - quality(candidate)
            logger.info("low-rank energy %.4f: drop %.4f (budget %.4f)", energy, drop, self.max_drop)
            if drop <= self.max_drop:
                best = (energy, candidate, details)
                high = energy
                if step == 0:
                    break
            else:
                low = energy
        if best is None:  # even the highest threshold tried costs too much: leave the model alone
            logger.warning("low-rank: no energy threshold up to %.4f keeps the drop within %.4f", low, self.max_drop)
            best = (1.0, model, [])
        return best


def _kept_energy(singular_values: np.ndarray) -> np.ndarray:
    """Share of the squared singular values kept at each rank 1..n (empty for an all-zero weight)."""
    power = np.asarray(singular_values, dtype=np.float64) ** 2
    total = power.sum()
    return np.cumsum(power) / total if total > 0 else np.zeros(0)


def _rank_if_worth_it(layer: _Layer, energy: float, min_saving: float) -> int | None:
    """The layer's rank at ``energy``, or ``None`` when the factors would not save enough."""
    n_in, n_out = layer.weight.shape
    rank = rank_for_energy(layer.singular_values, energy)
    return None if rank * (n_in + n_out) > min_saving * n_in * n_out else rank


def _total_params(layers: list[_Layer], energy: float, min_saving: float) -> int:
    """Weight values of ``layers`` after factorizing at ``energy``, layers left dense counted in full."""
    total = 0
    for layer in layers:
        rank = _rank_if_worth_it(layer, energy, min_saving)
        total += layer.weight.size if rank is None else rank * sum(layer.weight.shape)
    return total


def _weight_of(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[np.ndarray | None, str]:
    """The node's weight in ``[in, out]`` layout, or ``None`` and why not."""
    attrs = node_attributes(node)
    if node.op_type not in ("MatMul", "Gemm", "Conv"):
        return None, f"op {node.op_type} is not Gemm, MatMul or Conv"
    if len(node.input) < 2 or node.input[1] not in inits:
        return None, "its weight is not a constant initializer"
    weight = numpy_helper.to_array(inits[node.input[1]])
    if weight.dtype not in (np.float32, np.float64):
        return None, f"its weight is {weight.dtype}, not float"
    if node.op_type == "MatMul":
        return (weight, "") if weight.ndim == 2 else (None, f"its weight has rank {weight.ndim}, not 2")
    if node.op_type == "Gemm":
        if attrs.get("transA", 0):
            return None, "Gemm with transA=1"
        weight = weight.T if attrs.get("transB", 0) else weight
        return weight * np.float32(attrs.get("alpha", 1.0)), ""
    if weight.ndim != 4 or weight.shape[2:] != (1, 1):
        return None, f"Conv kernel {list(weight.shape[2:])} is not 1x1"
    if attrs.get("group", 1) != 1:
        return None, "grouped Conv"
    # Strides, pads and dilations act on pixels, not channels: the first conv keeps them.
    return weight[:, :, 0, 0].T, ""


def _factorize(
    model: onnx.ModelProto, layers: list[_Layer], energy: float, min_saving: float
) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """A copy of ``model`` with every layer worth it factorized at this energy."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    by_index = {layer.index: layer for layer in layers}
    nodes: list[onnx.NodeProto] = []
    details: list[dict[str, Any]] = []
    taken = {i.name for i in graph.initializer} | {t for n in graph.node for t in (*n.input, *n.output)}

    def fresh(name: str) -> str:
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    for index, node in enumerate(graph.node):
        layer = by_index.get(index)
        if layer is None:
            nodes.append(node)
            continue
        n_in, n_out = layer.weight.shape
        rank = _rank_if_worth_it(layer, energy, min_saving)
        if rank is None:
            nodes.append(node)
            continue
        root = np.sqrt(layer.singular_values[:rank])
        a = (layer.u[:, :rank] * root).astype(np.float32)  # [in, r]
        b = (root[:, None] * layer.vt[:rank]).astype(np.float32)  # [r, out]
        a_name, b_name = fresh(f"{layer.name}.lowrank_a"), fresh(f"{layer.name}.lowrank_b")
        mid = fresh(f"{layer.name}.lowrank_mid")
        attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if layer.kind == "conv1x1":
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(a.T)[:, :, None, None], a_name))
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(b.T)[:, :, None, None], b_name))
            first_attrs = {k: v for k, v in attrs.items() if k in ("strides", "dilations", "pads", "auto_pad")}
            nodes.append(
                helper.make_node("Conv", [node.input[0], a_name], [mid], name=f"{layer.name}.lowrank_a", **first_attrs)
            )
            nodes.append(helper.make_node("Conv", [mid, b_name, *node.input[2:]], list(node.output), name=layer.name))
        else:
            graph.initializer.append(numpy_helper.from_array(a, a_name))
            graph.initializer.append(numpy_helper.from_array(b, b_name))
            op = "MatMul" if layer.kind == "matmul" else "Gemm"
            nodes.append(helper.make_node(op, [node.input[0], a_name], [mid], name=f"{layer.name}.lowrank_a"))
            if layer.kind == "matmul":
                nodes.append(helper.make_node("MatMul", [mid, b_name], list(node.output), name=layer.name))
            else:
                beta = {"beta": attrs["beta"]} if "beta" in attrs else {}
                nodes.append(
                    helper.make_node("Gemm", [mid, b_name, *node.input[2:]], list(node.output), name=layer.name, **beta)
                )
        details.append(
            {
                "layer": layer.name,
                "shape": [int(n_in), int(n_out)],
                "rank": int(rank),
                "full_rank": len(layer.singular_values),
                "params_before": int(n_in * n_out),
                "params_after": int(rank * (n_in + n_out)),
            }
        )
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    return out, details
