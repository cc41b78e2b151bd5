"""Models for the agent's integration tests, built with onnx.helper at test time.

Each builder writes ``<name>.onnx`` and a sample ``<name>.npz`` under a directory and
returns both paths; the sample is what the device's health check runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["Built", "big_model", "int8_qdq_onnx", "nan_model", "slow_model", "wrong_shape_model"]

Built = tuple[Path, Path]


def _save(d: Path, name: str, graph: onnx.GraphProto, sample: dict[str, np.ndarray]) -> Built:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = d / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    npz = d / f"{name}.npz"
    np.savez(npz, **sample)
    return path, npz


def _x(rows: int = 2) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(1).standard_normal((rows, 16)).astype(np.float32)}


def nan_model(d: Path) -> Built:
    """input[N,16] @ w -> logits[N,4], plus a NaN bias: every output is NaN."""
    w = numpy_helper.from_array(np.ones((16, 4), np.float32), "w")
    bias = numpy_helper.from_array(np.full(4, np.nan, np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["h"]), helper.make_node("Add", ["h", "bias"], ["logits"])],
        "nan",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [w, bias],
    )
    return _save(d, "nan", graph, _x())


def wrong_shape_model(d: Path) -> Built:
    """Declares logits[N,4] but returns [N,16]: its input, through a data-dependent Compress.

    The column count comes from the data (a mask computed from the input), so the
    runtime cannot see the mismatch when it loads the model; only running it shows it.
    """
    floor = numpy_helper.from_array(np.array(-1e30, np.float32), "floor")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMin", ["input"], ["colmin"], axes=[0], keepdims=0),
            helper.make_node("Greater", ["colmin", "floor"], ["keep"]),
            helper.make_node("Compress", ["input", "keep"], ["logits"], axis=1),
        ],
        "wrong-shape",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [floor],
    )
    return _save(d, "wrong_shape", graph, _x())


def slow_model(d: Path, size: int = 512, layers: int = 3) -> Built:
    """input[N,size,size] through ``layers`` dense size x size MatMuls.

    About 0.8 GFLOP a run, some ten times the 1 ms budget the tests give it.
    """
    rng = np.random.default_rng(2)
    inits, nodes, prev = [], [], "input"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((size, size)) / size).astype(np.float32), f"w{i}"))
        out = "out" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", size, size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", size, size])],
        inits,
    )
    return _save(d, "slow", graph, {"input": rng.standard_normal((1, size, size)).astype(np.float32)})


def big_model(d: Path, mib: int = 24) -> Built:
    """input[N,16] @ W[16, k] with ``mib`` MiB of incompressible weights: slow to move and unpack."""
    k = mib * (1 << 20) // (16 * 4)
    w = numpy_helper.from_array(np.random.default_rng(3).standard_normal((16, k)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["h"]),
            helper.make_node("ReduceMax", ["h"], ["out"], keepdims=1, axes=None),
        ],
        "big",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 1])],
        [w],
    )
    return _save(d, "big", graph, _x())


def int8_qdq_onnx(model: Path, sample: Path, out: Path) -> Path:
    """``model`` quantized to int8 QDQ (activations and weights), calibrated on ``sample``'s ``input`` rows."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    x = np.load(sample)["input"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter([{"input": x[i : i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.rows, None)

    quantize_static(
        str(model),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return out
