"""Model zoo entry for the demo: a small MLP on the 8x8 digits, exported to ONNX.

Training uses scikit-learn (no torch) and takes a few seconds on two cores. The export is
built node by node with ``onnx.helper``: input ``"input"`` float32 ``[N, 64]``, one
``Gemm`` + ``Relu`` per hidden layer, a final ``Gemm`` producing ``"logits"`` ``[N, 10]``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.errors import CompressionError, ConfigError

from ..data import DigitsSplit
from ..evaluate import predict_classes
from ..model_file import build_model

__all__ = ["DIGITS_OPSET", "mlp_to_onnx", "train_digits_mlp"]

logger = logging.getLogger(__name__)

DIGITS_OPSET = 17
"""ONNX opset of the exported model; supported by every onnxruntime >= 1.14."""


def train_digits_mlp(
    split: DigitsSplit, hidden: Sequence[int] = (256, 128), seed: int = 0, max_iter: int = 100
) -> bytes:
    """Train an MLP classifier on the digits and export it as ONNX bytes.

    With the defaults it converges after about 80 epochs (about 2 s on two cores) at
    about 98% test accuracy. Stopping at ``max_iter`` before scikit-learn's tolerance is
    met is allowed and only logged.

    Args:
        split: the data, from :func:`~host_tools.compress.data.load_digits_split`.
        hidden: widths of the hidden layers.
        seed: seed for weight initialisation and batch shuffling.
        max_iter: training epochs at most.

    Returns:
        The serialized ONNX model.

    Raises:
        ConfigError: ``hidden`` is empty or has a non-positive width.
        CompressionError: the exported graph does not reproduce scikit-learn's predictions.
    """
    if not hidden or any(int(h) < 1 for h in hidden):
        raise ConfigError(f"hidden layer widths must be positive, got {tuple(hidden)}", key="hidden")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    classifier = MLPClassifier(
        hidden_layer_sizes=tuple(int(h) for h in hidden),
        max_iter=max_iter,
        random_state=seed,
        batch_size=64,
        learning_rate_init=1e-3,
    )
    with warnings.catch_warnings():
        # Stopping at max_iter is the point of a fast demo model, not a failure.
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        classifier.fit(split.x_train, split.y_train)
    logger.info(
        "digits MLP %s: %d epochs, train accuracy %.4f",
        tuple(hidden),
        classifier.n_iter_,
        classifier.score(split.x_train, split.y_train),
    )
    model = mlp_to_onnx(classifier)
    model_bytes = bytes(model.SerializeToString())
    expected = classifier.predict(split.x_test).astype(np.int64)
    got = predict_classes(model_bytes, split.x_test)
    mismatches = int(np.count_nonzero(got != expected))
    if mismatches:
        raise CompressionError(
            f"ONNX export of the digits MLP disagrees with scikit-learn on {mismatches} of {len(expected)} "
            "test samples",
            mismatches=mismatches,
        )
    return model_bytes


def mlp_to_onnx(classifier: Any, *, input_name: str = "input", output_name: str = "logits") -> onnx.ModelProto:
    """Export a fitted ``sklearn.neural_network.MLPClassifier`` (ReLU, multi-class) to ONNX.

    The output is the logits (pre-softmax scores), whose argmax is the predicted class
    index; ``classifier.classes_[index]`` maps it back to the label.

    Args:
        classifier: a fitted ``MLPClassifier`` with ``activation="relu"`` and more than two classes.
        input_name: name of the graph input.
        output_name: name of the graph output.

    Returns:
        The checked model, weights stored as float32 ``Gemm`` initializers (``transB=1``,
        ``[out, in]``, the layout per-channel quantization expects).

    Raises:
        ConfigError: the classifier is not fitted, not ReLU, or binary.
    """
    coefs = getattr(classifier, "coefs_", None)
    if coefs is None:
        raise ConfigError("classifier is not fitted")
    if classifier.activation != "relu":
        raise ConfigError(f"only ReLU MLPs can be exported, not {classifier.activation!r}", key="activation")
    if classifier.out_activation_ != "softmax":
        raise ConfigError("only multi-class (softmax) MLPs can be exported", key="out_activation")
    n_in = coefs[0].shape[0]
    n_out = coefs[-1].shape[1]
    nodes, inits = [], []
    current = input_name
    for i, (weight, bias) in enumerate(zip(coefs, classifier.intercepts_, strict=False)):
        last = i == len(coefs) - 1
        w_name, b_name = f"fc{i}.weight", f"fc{i}.bias"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(weight.T, dtype=np.float32), w_name))
        inits.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), b_name))
        gemm_out = output_name if last else f"fc{i}"
        nodes.append(helper.make_node("Gemm", [current, w_name, b_name], [gemm_out], name=f"fc{i}", transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"relu{i}"], name=f"relu{i}"))
            current = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", n_out])],
        initializer=inits,
    )
    model = build_model(graph, DIGITS_OPSET, doc_string="digits MLP")
    return model
