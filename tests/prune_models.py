"""Small generated ONNX models for the pruning, fine-tuning and distillation tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inits, in_shape, out_shape, in_name="input", out_name="logits") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", *out_shape])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp(seed: int = 0, widths=(12, 32, 24, 5)) -> onnx.ModelProto:
    """Gemm(transB=1) -> Relu -> Gemm(transB=0) -> Relu -> MatMul + Add: every weight layout."""
    rng = np.random.default_rng(seed)
    a, b, c, d = widths
    inits = {
        "w0": rng.normal(0, 0.5, (b, a)), "b0": rng.normal(0, 0.1, b),
        "w1": rng.normal(0, 0.5, (b, c)), "b1": rng.normal(0, 0.1, c),
        "w2": rng.normal(0, 0.5, (c, d)), "b2": rng.normal(0, 0.1, d),
    }  # fmt: skip
    nodes = [
        helper.make_node("Gemm", ["input", "w0", "b0"], ["h0"], name="fc0", transB=1),
        helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
        helper.make_node("Gemm", ["r0", "w1", "b1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "b2"], ["logits"], name="fc2_bias"),
    ]
    return _model(nodes, inits, [a], [d])


def cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> MaxPool -> Conv -> Relu -> Flatten -> Gemm, input [N, 2, 8, 8]."""
    rng = np.random.default_rng(seed)
    inits = {
        "c0.w": rng.normal(0, 0.4, (8, 2, 3, 3)), "c0.b": rng.normal(0, 0.1, 8),
        "bn.scale": rng.uniform(0.5, 1.5, 8), "bn.bias": rng.normal(0, 0.1, 8),
        "bn.mean": rng.normal(0, 0.1, 8), "bn.var": rng.uniform(0.5, 1.5, 8),
        "c1.w": rng.normal(0, 0.3, (6, 8, 3, 3)), "c1.b": rng.normal(0, 0.1, 6),
        "fc.w": rng.normal(0, 0.2, (4, 6 * 4 * 4)), "fc.b": rng.normal(0, 0.1, 4),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["input", "c0.w", "c0.b"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["bn"], name="bn0"),
        helper.make_node("Relu", ["bn"], ["r0"], name="relu0"),
        helper.make_node("MaxPool", ["r0"], ["p0"], name="pool0", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p0", "c1.w", "c1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Flatten", ["r1"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, inits, [2, 8, 8], [4])


def residual() -> onnx.ModelProto:
    """fc0's output is read twice (a residual Add): channel pruning must refuse it."""
    rng = np.random.default_rng(0)
    inits = {"w0": rng.normal(0, 1, (6, 6)), "w1": rng.normal(0, 1, (6, 6)), "w2": rng.normal(0, 1, (3, 6))}
    nodes = [
        helper.make_node("Gemm", ["input", "w0"], ["h0"], name="fc0", transB=1),
        helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
        helper.make_node("Gemm", ["r0", "w1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Add", ["h1", "r0"], ["sum"], name="skip"),
        helper.make_node("Gemm", ["sum", "w2"], ["logits"], name="fc2", transB=1),
    ]
    return _model(nodes, inits, [6], [3])


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
