"""Graph rewrites that put a model into the form later passes expect.

:class:`DecomposeGemm` splits ``Gemm`` into ``MatMul`` + ``Add``. onnxruntime's dynamic
quantization quantizes ``MatMul`` but leaves ``Gemm`` in float, so
:class:`~host_tools.compress.passes.quantize.DynamicInt8Quantization` runs it first; low-rank
factorization will want it too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..layers import drop_unused_initializers, node_attributes
from ..pass_manager import PassContext, PassResult

__all__ = ["DecomposeGemm", "decompose_gemm"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecomposeGemm:
    """Rewrite ``Gemm(A, B, C)`` with a constant ``B`` as ``MatMul(A, B')`` (+ ``Add(C')``).

    ``transB`` is folded into the stored weight and ``alpha``/``beta`` into the constants.
    Gemms with ``transA=1`` or a non-constant ``B`` are left alone. Numerically the same
    up to float rounding of the folded constants.
    """

    @property
    def name(self) -> str:
        """The pass name."""
        return "decompose-gemm"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Decompose every eligible ``Gemm`` in the main graph.

        Args:
            model: the model, modified in place.
            ctx: unused.

        Returns:
            The model, whether anything changed, and ``notes["gemms_decomposed"]``.
        """
        count = decompose_gemm(model)
        return PassResult(model, changed=count > 0, notes={"gemms_decomposed": count})


def decompose_gemm(model: onnx.ModelProto) -> int:
    """In-place core of :class:`DecomposeGemm`.

    Args:
        model: the model to rewrite.

    Returns:
        How many ``Gemm`` nodes were replaced.
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    replaced = 0
    for node in graph.node:
        if not _eligible(node, inits):
            new_nodes.append(node)
            continue
        attrs = node_attributes(node)
        base = node.name or node.output[0]
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        alpha = attrs.get("alpha", 1.0)
        if alpha != 1.0:
            weight = weight * np.asarray(alpha, dtype=weight.dtype)
        w_name = _add_initializer(graph, inits, np.ascontiguousarray(weight), f"{base}.matmul_weight")
        has_bias = len(node.input) > 2 and bool(node.input[2])
        mm_out = f"{base}.matmul_out" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=f"{base}.matmul"))
        if has_bias:
            c_name = node.input[2]
            beta = attrs.get("beta", 1.0)
            if beta != 1.0:
                bias = numpy_helper.to_array(inits[c_name])
                c_name = _add_initializer(graph, inits, bias * np.asarray(beta, dtype=bias.dtype), f"{base}.bias")
            new_nodes.append(helper.make_node("Add", [mm_out, c_name], [node.output[0]], name=f"{base}.add"))
        replaced += 1
    if replaced:
        del graph.node[:]
        graph.node.extend(new_nodes)
        drop_unused_initializers(graph)
        logger.debug("decomposed %d Gemm nodes", replaced)
    return replaced


def _eligible(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """A Gemm whose weight (and scaled bias, if any) are constants and whose A is not transposed."""
    if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits:
        return False
    attrs = node_attributes(node)
    if attrs.get("transA", 0):
        return False
    has_bias = len(node.input) > 2 and bool(node.input[2])
    return not (has_bias and attrs.get("beta", 1.0) != 1.0 and node.input[2] not in inits)


def _add_initializer(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], values: np.ndarray, name: str) -> str:
    """Store ``values`` under a fresh name; the old initializer may be shared with other nodes."""
    while name in inits:
        name += "_"
    tensor = numpy_helper.from_array(values, name)
    graph.initializer.append(tensor)
    inits[name] = tensor
    return name
