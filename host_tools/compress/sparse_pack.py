"""Turn a pruned ONNX model into the files of a sparse bundle.

A pruned model's zeros save nothing at run time unless a sparse kernel skips them.
:func:`sparsify` finds the fully connected layers (``MatMul`` with a 2-D input, ``Gemm``)
whose constant weight is at least ``min_sparsity`` zeros and writes three things:

- the **sparse graph**: each such layer becomes onnxruntime's
  ``com.microsoft.SparseToDenseMatMul`` fed by a ``sparse_tensor`` graph input that
  holds the weight (transposed where needed), followed by a ``Transpose`` (and the
  ``Gemm``'s bias ``Add``); everything else is unchanged. This is the bundle's model;
  onnxruntime runs it whole, the device binds the weights (see
  :mod:`edge_sdk.runtime._sparse`).
- the **dense graph**: the original model without those weights (a few KB); the device
  fills them in, in memory only, to measure or run the dense execution (and, for int8
  values, rewrites those layers into the dense int8 execution: ``dense_int8_model`` in
  :mod:`edge_sdk.bundle.sparse`).
- the **sparse weights** file: CSR, indices in the smallest unsigned type that fits,
  values float32 or int8 with a scale per row (:mod:`edge_sdk.bundle.sparse`).

Convolutions stay dense: onnxruntime has no sparse convolution kernel (see
``docs/benchmarks.md``, "Sparse").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from edge_sdk.bundle import SparseLayer, SparseSpec
from edge_sdk.bundle.sparse import CsrMatrix, encode_sparse_weights
from edge_sdk.errors import CompressionError, ConfigError

from .layers import consumers_of, layer_name, node_attributes

__all__ = ["SparsePack", "sparsify", "write_sparse_files"]

logger = logging.getLogger(__name__)

_MS_DOMAIN = "com.microsoft"


@dataclass
class SparsePack:
    """What :func:`sparsify` produced.

    Attributes:
        sparse_graph: the model with sparse layers as ``SparseToDenseMatMul`` nodes.
        dense_graph: the original model without the sparse layers' weights.
        matrices: the sparse weights, named after their graph inputs.
        layers: one entry per sparse layer, for the manifest.
        skipped: layer name -> why it stays dense.
    """

    sparse_graph: onnx.ModelProto
    dense_graph: onnx.ModelProto
    matrices: list[CsrMatrix]
    layers: list[SparseLayer]
    skipped: dict[str, str] = field(default_factory=dict)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = shape_inference.infer_shapes(model)
    ranks = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    for init in model.graph.initializer:
        ranks[init.name] = len(init.dims)
    return ranks


def _without(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` without the initializers and graph inputs called ``names``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = copy.graph
    kept = [i for i in g.initializer if i.name not in names]
    del g.initializer[:]
    g.initializer.extend(kept)
    inputs = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(inputs)
    return copy


def sparsify(model: onnx.ModelProto, min_sparsity: float = 0.5) -> SparsePack:
    """Split a pruned model into a sparse graph, a dense graph and CSR weights.

    Args:
        model: a float model (not modified).
        min_sparsity: a layer's weight must be at least this fraction zeros to go sparse.

    Returns:
        The pack.

    Raises:
        ConfigError: ``min_sparsity`` outside ``[0, 1)``.
        CompressionError: no layer qualifies (the message says why each stayed dense).
    """
    if not 0.0 <= min_sparsity < 1.0:
        raise ConfigError(f"min_sparsity must be in [0, 1), got {min_sparsity}", key="min_sparsity")
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = consumers_of(graph)
    ranks = _ranks(model)
    new_nodes: list[onnx.NodeProto] = []
    matrices: list[CsrMatrix] = []
    layers: list[SparseLayer] = []
    skipped: dict[str, str] = {}
    for node in graph.node:
        name = layer_name(node)
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        weight_name = node.input[1]
        init = inits[weight_name]
        attrs = node_attributes(node)
        reason = None
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2:
            reason = "weight is not a 2-D float32 matrix"
        elif len(readers.get(weight_name, ())) != 1:
            reason = "weight is shared with another node"
        elif node.op_type == "MatMul" and ranks.get(node.input[0]) != 2:
            reason = "input is not 2-D (batch x features)"
        elif node.op_type == "Gemm" and (
            attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
        ):
            reason = "Gemm with transA, alpha or beta"
        weight = numpy_helper.to_array(init) if reason is None else None
        if weight is not None:
            sparsity = 1.0 - np.count_nonzero(weight) / weight.size
            if sparsity < min_sparsity:
                reason = f"sparsity {sparsity:.1%} below {min_sparsity:.0%}"
        if reason is not None:
            skipped[name] = reason
            new_nodes.append(node)
            continue
        assert weight is not None
        # SparseToDenseMatMul(A, x, transB=1) = A @ x^T; with A = W^T that is (x @ W)^T.
        transposed = not (node.op_type == "Gemm" and attrs.get("transB", 0))
        stored = np.ascontiguousarray(weight.T if transposed else weight)
        matrices.append(CsrMatrix.from_dense(weight_name, stored))
        layers.append(SparseLayer(name, weight_name, tuple(stored.shape), int(np.count_nonzero(stored)), transposed))
        out = node.output[0]
        product = f"{out}__sparse_t"
        new_nodes.append(
            helper.make_node(
                "SparseToDenseMatMul",
                [weight_name, node.input[0]],
                [product],
                name=f"{name}__sparse",
                domain=_MS_DOMAIN,
                transB=1,
            )
        )
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            new_nodes.append(helper.make_node("Transpose", [product], [f"{out}__sparse"], perm=[1, 0]))
            new_nodes.append(helper.make_node("Add", [f"{out}__sparse", node.input[2]], [out], name=f"{name}__bias"))
        else:
            new_nodes.append(helper.make_node("Transpose", [product], [out], perm=[1, 0], name=f"{name}__t"))
    if not layers:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no MatMul or Gemm with a constant weight"
        raise CompressionError(f"no layer qualifies for sparse execution ({why})", skipped=skipped)
    sparse_names = {layer.tensor for layer in layers}

    sparse_graph = _without(model, sparse_names)
    g = sparse_graph.graph
    del g.node[:]
    g.node.extend(new_nodes)
    real_inputs = list(g.input)
    del g.input[:]
    # The sparse inputs are declared without a shape on purpose: onnxruntime's shape
    # inference for SparseToDenseMatMul ignores transB (1.32) and would refuse the graph.
    # The weights' shapes are in the manifest and checked when they are bound.
    g.input.extend(
        [helper.make_sparse_tensor_value_info(layer.tensor, onnx.TensorProto.FLOAT, None) for layer in layers]
    )
    g.input.extend(real_inputs)
    if not any(o.domain == _MS_DOMAIN for o in sparse_graph.opset_import):
        sparse_graph.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))

    dense_graph = _without(model, sparse_names)
    for name, why in skipped.items():
        logger.info("layer %s stays dense: %s", name, why)
    return SparsePack(sparse_graph, dense_graph, matrices, layers, skipped)


def write_sparse_files(
    pack: SparsePack, out_dir: Path, stem: str, *, int8_values: bool = False
) -> tuple[Path, dict[str, Path], SparseSpec]:
    """Write the pack's three files for :func:`edge_sdk.bundle.pack_bundle`.

    Args:
        pack: from :func:`sparsify`.
        out_dir: an existing directory.
        stem: file name stem (``<stem>.sparse.onnx``, ``<stem>.dense.onnx``, ``<stem>.csr``).
        int8_values: store the weights' values as int8 with per-row scales.

    Returns:
        The sparse graph's path (the bundle's model), the other files by bundle path,
        and the manifest's ``sparse`` field.
    """
    model_path = out_dir / f"{stem}.sparse.onnx"
    dense_path = out_dir / f"{stem}.dense.onnx"
    weights_path = out_dir / f"{stem}.csr"
    model_path.write_bytes(pack.sparse_graph.SerializeToString())
    dense_path.write_bytes(pack.dense_graph.SerializeToString())
    weights_path.write_bytes(encode_sparse_weights(pack.matrices, int8_values=int8_values))
    spec = SparseSpec(
        weights=weights_path.name,
        dense_model=dense_path.name,
        layers=tuple(pack.layers),
        values="int8" if int8_values else "fp32",
    )
    return model_path, {dense_path.name: dense_path, weights_path.name: weights_path}, spec
