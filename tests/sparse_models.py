"""Pruned fully connected models for the sparse execution tests, built with onnx.helper."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def pruned(rng: np.random.Generator, shape: tuple[int, int], sparsity: float) -> np.ndarray:
    """A float32 matrix with ``sparsity`` of its entries set to exactly zero (unstructured)."""
    w = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0.0
    return w


def mlp(dims: list[int], sparsity: float, seed: int = 0, gemm: bool = False, trans_b: bool = False) -> onnx.ModelProto:
    """``x -> (MatMul + Add | Gemm) -> Relu -> ...`` with every weight pruned to ``sparsity``.

    The input is ``x`` of shape ``[batch, dims[0]]`` (dynamic batch); the output ``y``.
    """
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    last = len(dims) - 2
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        w = pruned(rng, (a, b), sparsity)
        bias = rng.standard_normal(b).astype(np.float32) * 0.1
        out = "y" if i == last else f"h{i}"
        pre = f"z{i}" if i != last else "y"
        if gemm:
            inits += [
                numpy_helper.from_array(np.ascontiguousarray(w.T) if trans_b else w, f"W{i}"),
                numpy_helper.from_array(bias, f"B{i}"),
            ]
            nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"B{i}"], [pre], name=f"fc{i}", transB=int(trans_b)))
        else:
            inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(bias, f"B{i}")]
            nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"B{i}"], [pre]))
        if i != last:
            nodes.append(helper.make_node("Relu", [pre], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dims[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
