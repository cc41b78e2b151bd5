"""Structured pruning: remove whole channels and neurons, so the dense model shrinks.

Unstructured zeros only pay off with sparse kernels or entropy coding. Removing an
output channel of a ``Conv`` (a filter) or an output neuron of a ``Gemm``/``MatMul``,
together with the matching input channel (or input rows) of the next layer, makes every
matrix smaller, so the ordinary dense runtime gets faster.

:class:`ChannelPruning` follows each layer's output forward through the ops that act on
each channel separately (``Relu``, pooling, ``BatchNormalization``, ``Dropout``...) and
through ``Flatten`` into the next weight layer, and keeps the channels with the largest
L1 or L2 norm. It stops with a :class:`~edge_sdk.errors.CompressionError` naming the
layer and the op at anything it does not understand (residual ``Add``, ``Concat``,
grouped convolutions, a branch), rather than guessing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_sdk.errors import CompressionError, ConfigError

from ..layers import WeightLayer, consumers_of, find_layers, replace_initializer, select_layers
from ..pass_manager import PassContext, PassResult

__all__ = ["ChannelPruning"]

logger = logging.getLogger(__name__)

_PER_CHANNEL_OPS = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Elu",
        "Selu",
        "HardSigmoid",
        "HardSwish",
        "Softplus",
        "Dropout",
        "Identity",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "LpPool",
    }
)
"""Ops whose output channel c depends only on input channel c: they pass a chain through."""


@dataclass(frozen=True)
class _Chain:
    """What must shrink along with one layer's output channels."""

    consumer: WeightLayer
    per_channel: tuple[str, ...]  # initializers indexed by channel on axis 0 (BatchNormalization)
    flattened: bool  # a Flatten/Reshape between: the consumer sees channel x spatial features


@dataclass(frozen=True)
class ChannelPruning:
    """Remove a share of every layer's output channels/neurons, and the inputs that read them.

    Args:
        ratio: share of each layer's output channels to remove, in ``[0, 1)``.
        layers: the layers to prune; ``None`` means every layer except the ones that
            feed the model's outputs (the classifier head keeps its classes).
        layer_ratio: per-layer ratios that override ``ratio``.
        criterion: ``"l1"`` or ``"l2"`` norm of a channel's weights; the smallest go.

    Raises:
        ConfigError: a ratio out of range or an unknown criterion.
    """

    ratio: float = 0.5
    layers: tuple[str, ...] | None = None
    layer_ratio: Mapping[str, float] = field(default_factory=dict)
    criterion: Literal["l1", "l2"] = "l1"

    def __post_init__(self) -> None:
        for key, value in [("ratio", self.ratio), *((f"layer_ratio[{k!r}]", v) for k, v in self.layer_ratio.items())]:
            if math.isnan(value) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {value}", key=key, value=value)
        if self.criterion not in ("l1", "l2"):
            raise ConfigError(f"channel criterion must be 'l1' or 'l2', not {self.criterion!r}", key="criterion")
        object.__setattr__(self, "layer_ratio", MappingProxyType(dict(self.layer_ratio)))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def name(self) -> str:
        """The pass name."""
        return "prune-channels"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Remove channels in place.

        Args:
            model: a float model.
            ctx: unused.

        Returns:
            The model, with ``notes["channels"]`` (layer -> ``[before, after]``) and the
            parameter counts before and after.

        Raises:
            CompressionError: a layer's output passes through an op this pass does not
                understand, is read twice or is a model output (names the layer and the
                node); a named layer does not exist; a ratio leaves a layer no channel.
        """
        layers = find_layers(model)
        if not layers:
            ops = sorted({n.op_type for n in model.graph.node})
            raise CompressionError(f"no Conv, Gemm or MatMul layer with a constant weight to prune (ops: {ops})")
        select_layers(layers, self.layer_ratio, self.name)
        if self.layers is not None:
            select_layers(layers, self.layers, self.name)
            chosen = [layer for layer in layers if layer.name in self.layers]
        else:
            chosen = [layer for layer in layers if _feeds_another_layer(model.graph, layer, layers)]
            if not chosen:
                raise CompressionError("no layer feeds another one: only the output layer is left, nothing to prune")
        params_before = _weight_count(model)
        plans = [(layer, _trace(model.graph, layer, layers)) for layer in chosen]
        channels: dict[str, list[int]] = {}
        for layer, chain in plans:
            ratio = self.layer_ratio.get(layer.name, self.ratio)
            channels[layer.name] = _prune_layer(model.graph, layer, chain, ratio, self.criterion)
        # Shapes recorded for intermediate tensors are stale now; onnxruntime re-infers them.
        del model.graph.value_info[:]
        params_after = _weight_count(model)
        changed = any(before != after for before, after in channels.values())
        logger.info("channel pruning: %s, parameters %d -> %d", channels, params_before, params_after)
        return PassResult(
            model,
            changed=changed,
            notes={"channels": channels, "parameters_before": params_before, "parameters_after": params_after},
        )


def _weight_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(init.dims, dtype=np.int64)) for init in model.graph.initializer)


def _feeds_another_layer(graph: onnx.GraphProto, layer: WeightLayer, layers: Sequence[WeightLayer]) -> bool:
    """Whether any weight layer lies downstream of ``layer`` (the head does not have one)."""
    layer_nodes = {layer.node_index for layer in layers}
    readers = consumers_of(graph)
    seen: set[str] = set()
    frontier = [layer.output]
    while frontier:
        tensor = frontier.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for index in readers.get(tensor, []):
            if index in layer_nodes:
                return True
            frontier.extend(graph.node[index].output)
    return False


def _trace(graph: onnx.GraphProto, layer: WeightLayer, layers: Sequence[WeightLayer]) -> _Chain:
    """Follow ``layer``'s output to the next weight layer, through per-channel ops only."""
    readers = consumers_of(graph)
    inits = {init.name: init for init in graph.initializer}
    by_index = {layer.node_index: layer for layer in layers}
    outputs = {o.name for o in graph.output}
    producer = graph.node[layer.node_index]
    if layer.op_type == "Conv" and _attr(producer, "group", 1) != 1:
        raise CompressionError(
            f"layer {layer.name!r}: grouped or depthwise Conv (group={_attr(producer, 'group', 1)}) is not supported "
            "by channel pruning",
            layer=layer.name,
        )
    per_channel: list[str] = []
    flattened = False
    tensor = layer.output

    def stop(why: str, node: str | None = None) -> CompressionError:
        return CompressionError(f"cannot prune channels of layer {layer.name!r}: {why}", layer=layer.name, node=node)

    while True:
        if tensor in outputs:
            raise stop(f"its output reaches the model output {tensor!r}; the output layer keeps its channels")
        after = readers.get(tensor, [])
        if len(after) != 1:
            raise stop(f"tensor {tensor!r} is read by {len(after)} nodes; only simple chains are supported")
        node = graph.node[after[0]]
        label = node.name or node.output[0]
        if after[0] in by_index and node.input[0] == tensor:
            consumer = by_index[after[0]]
            if node.op_type == "Gemm" and _attr(node, "transA", 0):
                raise stop(f"the next layer {label!r} is a Gemm with transA=1", label)
            if node.op_type == "Conv" and _attr(node, "group", 1) != 1:
                raise stop(f"the next layer {label!r} is a grouped Conv", label)
            if flattened and node.op_type == "Conv":
                raise stop(f"a Conv {label!r} after a Flatten/Reshape", label)
            return _Chain(consumer, tuple(per_channel), flattened)
        if node.op_type in _PER_CHANNEL_OPS:
            if any(name in inits for name in node.input[1:] if name):
                raise stop(f"{node.op_type} node {label!r} has constant inputs", label)
        elif node.op_type == "BatchNormalization" and node.input[0] == tensor:
            per_channel.extend(node.input[1:5])
        elif (node.op_type == "Flatten" and _attr(node, "axis", 1) == 1 and not flattened) or (
            node.op_type == "Reshape" and not flattened and _is_flatten_shape(node, inits)
        ):
            flattened = True
        else:
            raise stop(f"it feeds {node.op_type} node {label!r}, which this pass does not understand", label)
        tensor = node.output[0]


def _is_flatten_shape(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> bool:
    """A Reshape to ``[batch, -1]`` with a constant shape."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return False
    shape = numpy_helper.to_array(inits[node.input[1]]).tolist()
    return len(shape) == 2 and shape[1] == -1


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(helper.get_attribute_value(a))
    return default


def _array(graph: onnx.GraphProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in graph.initializer if i.name == name))


def _prune_layer(graph: onnx.GraphProto, layer: WeightLayer, chain: _Chain, ratio: float, criterion: str) -> list[int]:
    """Keep the strongest channels of ``layer``; shrink what reads them. Returns [before, after]."""
    weight = _array(graph, layer.weight)
    count = weight.shape[layer.out_axis]
    remove = round(ratio * count)
    if remove >= count:
        raise CompressionError(
            f"layer {layer.name!r} has {count} channels; removing {ratio:.0%} would leave none",
            layer=layer.name,
            channels=count,
        )
    if remove == 0:
        return [count, count]
    other = tuple(a for a in range(weight.ndim) if a != layer.out_axis)
    norms = (
        np.abs(weight).sum(axis=other)
        if criterion == "l1"
        else np.sqrt((weight.astype(np.float64) ** 2).sum(axis=other))
    )
    keep = np.sort(np.argsort(-norms, kind="stable")[: count - remove])
    replace_initializer(graph, layer.weight, np.take(weight, keep, axis=layer.out_axis))
    for name in ([layer.bias] if layer.bias else []) + list(chain.per_channel):
        values = _array(graph, name)
        if values.size == 1:
            continue  # a broadcast scalar serves any channel count
        if values.size != count:
            raise CompressionError(
                f"layer {layer.name!r}: per-channel constant {name!r} has {values.size} values for {count} channels",
                layer=layer.name,
            )
        axis = next(i for i, d in enumerate(values.shape) if d == count)  # [C], [1, C] or [C, 1, 1]
        replace_initializer(graph, name, np.take(values, keep, axis=axis))
    consumer = chain.consumer
    following = _array(graph, consumer.weight)
    width = following.shape[consumer.in_axis]
    rows = keep
    if chain.flattened:
        if width % count:
            raise CompressionError(
                f"layer {consumer.name!r} reads {width} features after a Flatten of {count} channels of "
                f"{layer.name!r}; not a whole number per channel",
                layer=consumer.name,
            )
        spatial = width // count
        rows = (keep[:, None] * spatial + np.arange(spatial)[None, :]).ravel()
    elif width != count:
        raise CompressionError(
            f"layer {consumer.name!r} reads {width} inputs, but {layer.name!r} makes {count} channels",
            layer=consumer.name,
        )
    replace_initializer(graph, consumer.weight, np.take(following, rows, axis=consumer.in_axis))
    return [count, len(keep)]
