"""Which nodes of a graph are weight layers, and where their weights sit.

Pruning, channel removal and fine-tuning all need the same facts about a model: which
``Conv``, ``Gemm`` and ``MatMul`` nodes have a constant weight, which initializer holds
it, which weight axis indexes the layer's outputs (its neurons or filters), and which
constant is its bias. :func:`find_layers` reads them once from the graph; the passes
share the answer instead of each re-deriving it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_sdk.errors import CompressionError

__all__ = ["WeightLayer", "consumers_of", "find_layers", "layer_name", "replace_initializer", "select_layers"]

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


@dataclass(frozen=True)
class WeightLayer:
    """One layer with a constant weight.

    Attributes:
        name: the node's name (its first output when the node has no name).
        op_type: ``"Conv"``, ``"Gemm"`` or ``"MatMul"``.
        node_index: position of the node in ``graph.node``.
        weight: name of the weight initializer.
        bias: name of the bias initializer (a ``MatMul``'s bias is the constant of the
            ``Add`` right after it), or ``None``.
        bias_node: index of that ``Add`` node for a ``MatMul``, else ``None``.
        out_axis: the weight axis that indexes the layer's output channels or neurons.
        in_axis: the weight axis that indexes its input channels or features.
        output: the tensor that carries the layer's result (after the ``MatMul`` bias).
    """

    name: str
    op_type: str
    node_index: int
    weight: str
    bias: str | None
    bias_node: int | None
    out_axis: int
    in_axis: int
    output: str


def layer_name(node: onnx.NodeProto) -> str:
    """The name a layer goes by in options, notes and errors."""
    return node.name or node.output[0]


def node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes as Python values, by name."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def consumers_of(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Map each tensor name to the indices of the nodes that read it."""
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name:
                readers.setdefault(name, []).append(index)
    return readers


def find_layers(model: onnx.ModelProto) -> list[WeightLayer]:
    """Every ``Conv``, ``Gemm`` and ``MatMul`` of the main graph whose weight is an initializer.

    Args:
        model: the model.

    Returns:
        The layers in graph order.

    Raises:
        CompressionError: a layer's weight is not floating point (for instance already
            quantized to int8); the message names the layer and says to prune first.
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    readers = consumers_of(graph)
    layers: list[WeightLayer] = []
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        name = layer_name(node)
        if weight.data_type not in _FLOAT_TYPES:
            raise CompressionError(
                f"layer {name!r} ({node.op_type}) has a {onnx.TensorProto.DataType.Name(weight.data_type)} weight; "
                "prune and fine-tune the float model, then quantize",
                layer=name,
            )
        attrs = node_attributes(node)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        bias_node = None
        output = node.output[0]
        if node.op_type == "Conv":
            out_axis, in_axis = 0, 1
        elif node.op_type == "Gemm":
            out_axis, in_axis = (0, 1) if attrs.get("transB", 0) else (1, 0)
        else:
            if len(weight.dims) != 2:
                continue  # batched MatMul against a constant: not a layer we understand
            out_axis, in_axis = 1, 0
            after = readers.get(output, [])
            if len(after) == 1:
                add = graph.node[after[0]]
                other = [i for i in add.input if i != output]
                if (
                    add.op_type == "Add"
                    and len(other) == 1
                    and other[0] in inits
                    and int(np.prod(inits[other[0]].dims)) == weight.dims[1]
                ):
                    bias, bias_node, output = other[0], after[0], add.output[0]
        layers.append(WeightLayer(name, node.op_type, index, node.input[1], bias, bias_node, out_axis, in_axis, output))
    return layers


def select_layers(layers: Sequence[WeightLayer], names: Sequence[str] | Mapping[str, object], what: str) -> None:
    """Check that every name the user gave is a layer of the model.

    Raises:
        CompressionError: an unknown name; the message lists the layers there are.
    """
    known = {layer.name for layer in layers}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise CompressionError(
            f"{what}: no prunable layer named {unknown[0]!r}; the model's layers are {sorted(known)}",
            layer=unknown[0],
            layers=sorted(known),
        )


def replace_initializer(graph: onnx.GraphProto, name: str, values: np.ndarray) -> None:
    """Overwrite the initializer ``name`` with ``values`` (same name, dtype of ``values``)."""
    for index, init in enumerate(graph.initializer):
        if init.name == name:
            graph.initializer[index].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values), name))
            return
    raise CompressionError(f"initializer {name!r} is missing from the graph", initializer=name)


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove the initializers nothing in ``graph`` (or its subgraphs, or its outputs) reads."""
    used = _names_used(graph) | {out.name for out in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _names_used(graph: onnx.GraphProto) -> set[str]:
    """Every input name read in ``graph`` and its subgraphs (which may read outer initializers)."""
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                used |= _names_used(sub)
    return used
