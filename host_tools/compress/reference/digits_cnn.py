"""Model zoo entry: a small CNN on the 8x8 digits, trained in numpy and exported to ONNX.

No torch: the network is small enough to train with im2col convolutions and Adam in
numpy in a few seconds on two cores, so tests and benchmarks can use a real convolutional
model without the ``train`` extra. Architecture (72k parameters)::

    input [N, 64] -> Reshape [N, 1, 8, 8]
    Conv 3x3, 1 -> 16, pad 1            -> Relu   [N, 16, 8, 8]
    Conv 3x3, 16 -> 32, stride 2, pad 1 -> Relu   [N, 32, 4, 4]
    Flatten -> Gemm 512 -> 128 -> Relu -> Gemm 128 -> 10 -> "logits"
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.errors import CompressionError, ConfigError

from ..data import DigitsSplit
from ..evaluate import predict_classes
from ..model_file import build_model
from .digits import DIGITS_OPSET

__all__ = ["train_digits_cnn"]

logger = logging.getLogger(__name__)


def train_digits_cnn(
    split: DigitsSplit, channels: Sequence[int] = (16, 32), hidden: int = 128, epochs: int = 20, seed: int = 0
) -> bytes:
    """Train the digits CNN and export it as ONNX bytes.

    With the defaults: about 98% test accuracy, a few seconds on two cores.

    Args:
        split: the data, from :func:`~host_tools.compress.data.load_digits_split`.
        channels: output channels of the two convolutions.
        hidden: width of the hidden fully connected layer.
        epochs: passes over the training data (Adam, batch 32).
        seed: seed for initialisation and shuffling.

    Returns:
        The serialized ONNX model (input ``"input"`` float32 ``[N, 64]``).

    Raises:
        ConfigError: a width is not positive or ``epochs`` is below 1.
        CompressionError: the exported graph disagrees with the numpy network.
    """
    c1, c2 = (int(c) for c in channels)
    if min(c1, c2, hidden) < 1 or epochs < 1:
        raise ConfigError("CNN widths must be positive and epochs at least 1", key="channels")
    rng = np.random.default_rng(seed)
    params = {
        "conv1.weight": rng.normal(0, np.sqrt(2 / 9), (c1, 1, 3, 3)),
        "conv1.bias": np.zeros(c1),
        "conv2.weight": rng.normal(0, np.sqrt(2 / (9 * c1)), (c2, c1, 3, 3)),
        "conv2.bias": np.zeros(c2),
        "fc1.weight": rng.normal(0, np.sqrt(2 / (16 * c2)), (hidden, 16 * c2)),
        "fc1.bias": np.zeros(hidden),
        "fc2.weight": rng.normal(0, np.sqrt(1 / hidden), (10, hidden)),
        "fc2.bias": np.zeros(10),
    }
    params = {k: v.astype(np.float32) for k, v in params.items()}
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    x_all = split.x_train.reshape(-1, 1, 8, 8).astype(np.float32)
    y_all = split.y_train
    step = 0
    for epoch in range(epochs):
        order = rng.permutation(len(x_all))
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            grads = _gradients(params, x_all[batch], y_all[batch])
            step += 1
            for key, grad in grads.items():
                m, v = moments[key]
                m *= 0.9
                m += 0.1 * grad
                v *= 0.999
                v += 0.001 * grad * grad
                lr = 2e-3 * np.sqrt(1 - 0.999**step) / (1 - 0.9**step)
                params[key] -= (lr * m / (np.sqrt(v) + 1e-8)).astype(np.float32)
        logger.debug("digits CNN epoch %d done", epoch + 1)
    model = bytes(_to_onnx(params).SerializeToString())
    expected = np.argmax(_forward(params, split.x_test.reshape(-1, 1, 8, 8))[0], axis=1)
    mismatches = int(np.count_nonzero(predict_classes(model, split.x_test) != expected))
    if mismatches > 1:  # float summation order may flip one near-tie
        raise CompressionError(f"ONNX export of the digits CNN disagrees with numpy on {mismatches} test samples")
    return model


def _im2col(x: np.ndarray, stride: int) -> tuple[np.ndarray, int, int]:
    """3x3 patches with padding 1: ``[N*oh*ow, C*9]`` in (C, kh, kw) order."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    patches = [
        padded[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride] for i in range(3) for j in range(3)
    ]
    cols = np.stack(patches, axis=2)  # [N, C, 9, oh, ow]
    return cols.transpose(0, 3, 4, 1, 2).reshape(n * oh * ow, c * 9), oh, ow


def _col2im(dcols: np.ndarray, shape: tuple[int, ...], stride: int, oh: int, ow: int) -> np.ndarray:
    n, c, h, w = shape
    d = dcols.reshape(n, oh, ow, c, 9).transpose(0, 3, 4, 1, 2)
    padded = np.zeros((n, c, h + 2, w + 2), dtype=dcols.dtype)
    for k in range(9):
        i, j = divmod(k, 3)
        padded[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride] += d[:, :, k]
    return padded[:, :, 1:-1, 1:-1]


def _conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    cols, oh, ow = _im2col(x, stride)
    out = cols @ weight.reshape(len(weight), -1).T + bias
    return out.reshape(len(x), oh, ow, -1).transpose(0, 3, 1, 2), cols, oh, ow


def _forward(p: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    z1, cols1, _oh1, _ow1 = _conv(x, p["conv1.weight"], p["conv1.bias"], 1)
    a1 = np.maximum(z1, 0)
    z2, cols2, oh2, ow2 = _conv(a1, p["conv2.weight"], p["conv2.bias"], 2)
    a2 = np.maximum(z2, 0)
    flat = a2.reshape(len(x), -1)
    z3 = flat @ p["fc1.weight"].T + p["fc1.bias"]
    a3 = np.maximum(z3, 0)
    logits = a3 @ p["fc2.weight"].T + p["fc2.bias"]
    cache = {"cols1": cols1, "z1": z1, "a1": a1, "cols2": cols2, "z2": z2, "flat": flat, "z3": z3, "a3": a3,
             "shape2": (oh2, ow2)}  # fmt: skip
    return logits, cache


def _gradients(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    logits, c = _forward(p, x)
    n = len(x)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    probs[np.arange(n), y] -= 1
    d4 = probs / n
    g = {"fc2.weight": d4.T @ c["a3"], "fc2.bias": d4.sum(0)}
    d3 = (d4 @ p["fc2.weight"]) * (c["z3"] > 0)
    g["fc1.weight"], g["fc1.bias"] = d3.T @ c["flat"], d3.sum(0)
    d2 = (d3 @ p["fc1.weight"]).reshape(c["z2"].shape) * (c["z2"] > 0)
    d2cols = d2.transpose(0, 2, 3, 1).reshape(-1, d2.shape[1])
    g["conv2.weight"] = (d2cols.T @ c["cols2"]).reshape(p["conv2.weight"].shape)
    g["conv2.bias"] = d2cols.sum(0)
    oh2, ow2 = c["shape2"]
    da1 = _col2im(d2cols @ p["conv2.weight"].reshape(len(p["conv2.weight"]), -1), c["a1"].shape, 2, oh2, ow2)
    d1 = da1 * (c["z1"] > 0)
    d1cols = d1.transpose(0, 2, 3, 1).reshape(-1, d1.shape[1])
    g["conv1.weight"] = (d1cols.T @ c["cols1"]).reshape(p["conv1.weight"].shape)
    g["conv1.bias"] = d1cols.sum(0)
    return g


def _to_onnx(p: dict[str, np.ndarray]) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.ascontiguousarray(v, dtype=np.float32), k) for k, v in p.items()]
    inits.append(numpy_helper.from_array(np.array([-1, 1, 8, 8], dtype=np.int64), "image_shape"))
    nodes = [
        helper.make_node("Reshape", ["input", "image_shape"], ["image"], name="reshape"),
        helper.make_node("Conv", ["image", "conv1.weight", "conv1.bias"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node(
            "Conv", ["relu1", "conv2.weight", "conv2.bias"], ["conv2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("Flatten", ["relu2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1"], ["relu3"], name="relu3"),
        helper.make_node("Gemm", ["relu3", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = build_model(graph, DIGITS_OPSET, doc_string="digits CNN")
    return model
