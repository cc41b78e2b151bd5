"""Measurements of a model: size, parameters, sparsity, accuracy and host latency.

All functions take a model as ``onnx.ModelProto`` or its serialized bytes and never
touch the disk. Models run through :func:`edge_sdk.runtime.open_session` on the CPU
provider (:func:`open_host_session`), so host numbers come from the same session code
the device agent uses, and no module of ``host_tools`` opens an onnxruntime session
itself. Inputs are one array, or one per input name for a model with several inputs
(:func:`input_feeds`); axis 0 is the batch axis. The first output holds class scores
``[N, classes]`` (or class ids ``[N]``), or, for the cosine quality metric, any
per-sample vector such as an embedding. :class:`Quality` is the one place that scores a
model on evaluation data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from edge_sdk.errors import ConfigError, ModelError
from edge_sdk.metrics import benchmark
from edge_sdk.runtime import InferenceSession, SessionOptions, TensorSpec, open_session

from .data import Dataset, Inputs, match_inputs

__all__ = [
    "QUALITY_METRICS",
    "ModelLike",
    "Quality",
    "check_metric",
    "cosine_similarities",
    "count_parameters",
    "evaluate_accuracy",
    "host_latency_ms",
    "input_feeds",
    "measure_sparsity",
    "model_size_bytes",
    "open_host_session",
    "predict_classes",
    "run_batched",
    "top1_agreement",
]

logger = logging.getLogger(__name__)

ModelLike = onnx.ModelProto | bytes
"""A model in memory: the proto or its serialized bytes."""


def _to_bytes(model: ModelLike) -> bytes:
    return model.SerializeToString() if isinstance(model, onnx.ModelProto) else bytes(model)


def _to_proto(model: ModelLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load_model_from_string(bytes(model))


_HOST_CPU = SessionOptions(threads=1, providers=("CPUExecutionProvider",))
"""CPU only and one thread: stable, comparable numbers on a shared host, GPU or not."""


def open_host_session(model: ModelLike) -> InferenceSession:
    """Open an in-memory model on this host's CPU, one intra-op thread.

    Args:
        model: the model.

    Returns:
        An onnxruntime :class:`~edge_sdk.runtime.InferenceSession`; close it, or use it
        as a context manager.

    Raises:
        ModelLoadError: onnxruntime refused the model.
    """
    return open_session(_to_bytes(model), "onnxruntime", _HOST_CPU)


def _numpy_dtype(spec: TensorSpec) -> np.dtype:
    try:
        return np.dtype(spec.dtype)
    except TypeError:  # bfloat16, strings: not numpy dtypes; our classifiers take floats
        return np.dtype(np.float32)


def input_feeds(session: InferenceSession, x: Inputs) -> dict[str, np.ndarray]:
    """Match data to a session's inputs (:func:`~host_tools.compress.data.match_inputs`),
    each array cast to its input's type.

    Raises:
        ConfigError: the data's input names are not the model's, or one array was given
            for a model with several inputs (names both sides).
    """
    specs = session.inputs()
    arrays = match_inputs([spec.name for spec in specs], x)
    return {spec.name: np.ascontiguousarray(arrays[spec.name], dtype=_numpy_dtype(spec)) for spec in specs}


def run_batched(session: InferenceSession, x: Inputs, batch_size: int) -> np.ndarray:
    """Run the first output of a model over ``x`` in batches.

    A model whose batch dimension is fixed (say 1) gets batches of exactly that size; the
    last one is zero-padded and the padding cut from the result.

    Args:
        session: an open session, e.g. from :func:`open_host_session`.
        x: inputs (see :func:`input_feeds`), first axis is the sample axis.
        batch_size: samples per run when the model's batch dimension is dynamic.

    Returns:
        The first output for every sample, concatenated along axis 0.

    Raises:
        ConfigError: the data does not match the model's inputs.
        ModelError: the model failed while running on these inputs (names the inputs
            and the batch shapes).
    """
    feeds = input_feeds(session, x)
    spec = session.inputs()[0]
    fixed = spec.shape[0] if spec.shape else None
    step = fixed if fixed is not None and fixed > 0 else max(1, batch_size)
    count = len(next(iter(feeds.values())))
    outputs = []
    for start in range(0, count, step):
        chunk = {name: value[start : start + step] for name, value in feeds.items()}
        real = min(step, count - start)
        if fixed is not None and real < step:
            chunk = {
                name: np.concatenate([v, np.zeros((step - real, *v.shape[1:]), v.dtype)]) for name, v in chunk.items()
            }
        try:
            out = session.run(chunk)[0]
        except ModelError as exc:
            shapes = {name: list(v.shape) for name, v in chunk.items()}
            described = ", ".join(f"{name!r} with shape {shape}" for name, shape in shapes.items())
            raise ModelError(
                f"model failed on input {described}: {exc.message}",
                input=next(iter(shapes)) if len(shapes) == 1 else list(shapes),
                shape=next(iter(shapes.values())) if len(shapes) == 1 else shapes,
            ) from exc
        outputs.append(np.asarray(out)[:real])
    return np.concatenate(outputs) if outputs else np.empty((0,))


def predict_classes(model: ModelLike, x: Inputs, batch_size: int = 256) -> np.ndarray:
    """Top-1 class of every sample.

    Args:
        model: the model.
        x: inputs, axis 0 is the sample axis.
        batch_size: samples per onnxruntime run.

    Returns:
        int64 ``[N]`` class ids (argmax of the last axis of the first output).

    Raises:
        ModelLoadError: onnxruntime refused the model.
        ModelError: the model failed on these inputs.
    """
    with open_host_session(model) as session:
        return _top1(run_batched(session, x, batch_size))


def evaluate_accuracy(model: ModelLike, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy on a labelled dataset.

    Args:
        model: the model.
        dataset: inputs and labels.
        batch_size: samples per onnxruntime run.

    Returns:
        Fraction of samples classified correctly, in ``[0, 1]``.

    Raises:
        ConfigError: the dataset has no labels.
        ModelLoadError: onnxruntime refused the model.
        ModelError: the model failed on these inputs.
    """
    if dataset.y is None:
        raise ConfigError("accuracy needs labels; this dataset has none", key="y")
    predictions = predict_classes(model, dataset.x, batch_size)
    return float(np.mean(predictions == dataset.y))


def top1_agreement(predictions: np.ndarray, reference: np.ndarray) -> float:
    """Share of samples on which two models pick the same class.

    Args:
        predictions: class ids from the model under test.
        reference: class ids from the reference (usually the uncompressed) model.

    Returns:
        Fraction of equal predictions, in ``[0, 1]``.

    Raises:
        ConfigError: the two arrays differ in length.
    """
    if predictions.shape != reference.shape:
        raise ConfigError(
            f"cannot compare {predictions.shape} predictions with {reference.shape} reference predictions"
        )
    return float(np.mean(predictions == reference))


QUALITY_METRICS = ("accuracy", "agreement", "cosine")
"""The ways :class:`Quality` can score a model (see there)."""


class Quality:
    """How well models do on fixed data, scored one way for a whole compression run.

    The one place that turns evaluation data into a quality figure, for the report and
    for every pass that searches under a quality budget (accuracy guard, low-rank,
    sensitivity pruning), whatever runtime produced the outputs. Higher is better, and a
    drop is the original's figure minus the candidate's:

    - ``"accuracy"``: top-1 accuracy against the labels, in ``[0, 1]``;
    - ``"agreement"``: share of samples whose top-1 class is the original model's, in ``[0, 1]``;
    - ``"cosine"``: the lowest per-sample cosine similarity between the candidate's
      first output and the original's, in ``[-1, 1]``, for models that output
      embeddings or other vectors rather than class scores; the lowest, because every
      input should stay close, not just the average (a drop of 0.01 allows 0.99 for the
      worst sample).

    Build it with :meth:`for_model` (runs the original in onnxruntime) or directly from
    the original's outputs computed elsewhere (LiteRT).

    Args:
        reference: the original model's first output on ``data`` (or on its first samples).
        data: the evaluation data.
        metric: one of :data:`QUALITY_METRICS`; ``None`` picks accuracy for labelled
            data, else agreement.
        batch_size: samples per onnxruntime run, for :meth:`of`.

    Attributes:
        metric: the metric in use.
        original: the original model's own figure (1.0 for agreement and cosine).

    Raises:
        ConfigError: an unknown metric, or accuracy without labels.
    """

    def __init__(self, reference: np.ndarray, data: Dataset, metric: str | None = None, batch_size: int = 256) -> None:
        self.metric = check_metric(metric, data)
        self.data = data
        self.batch_size = batch_size
        self._reference = None if self.metric == "accuracy" else self._prepare(reference)
        self.original = self.score(reference)

    @classmethod
    def for_model(cls, original: ModelLike, data: Dataset, metric: str | None = None, batch_size: int = 256) -> Quality:
        """Score against ``original``, run once in onnxruntime on this host.

        Raises:
            ConfigError: an unknown metric, accuracy without labels, or data that does
                not match the model's inputs.
            ModelLoadError, ModelError: the original does not load or run on the data.
        """
        check_metric(metric, data)
        with open_host_session(original) as session:
            reference = run_batched(session, data.x, batch_size)
        return cls(reference, data, metric, batch_size)

    def of(self, model: ModelLike) -> float:
        """The model's figure on the data, run in onnxruntime.

        Raises:
            ModelLoadError, ModelError: the model does not load or run on the data.
            ConfigError: its outputs cannot be compared with the original's (shape).
        """
        with open_host_session(model) as session:
            return self.score(run_batched(session, self.data.x, self.batch_size))

    def score(self, outputs: np.ndarray) -> float:
        """The figure for a model's first output on the data.

        ``outputs`` may cover only the first samples (a runtime that runs whole batches
        only may leave off the remainder); they are scored against those samples.

        Raises:
            ConfigError: the outputs cannot be compared with the original's (shape).
        """
        out = self._prepare(outputs)
        n = len(out)
        if self.metric == "accuracy":
            assert self.data.y is not None
            return float(np.mean(out == self.data.y[:n]))
        assert self._reference is not None
        reference = self._reference[:n]
        if out.shape != reference.shape:
            raise ConfigError(
                f"cannot compare outputs of shape {list(out.shape)} with the original's {list(reference.shape)}"
            )
        if self.metric == "agreement":
            return top1_agreement(out, reference)
        return float(np.min(cosine_similarities(out, reference)))

    def _prepare(self, outputs: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            return np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
        return _top1(np.asarray(outputs))


def check_metric(metric: str | None, data: Dataset) -> str:
    """The quality metric to use on ``data``: ``metric``, or accuracy with labels, else agreement.

    Raises:
        ConfigError: an unknown metric, or accuracy on data without labels.
    """
    metric = metric or ("accuracy" if data.labelled else "agreement")
    if metric not in QUALITY_METRICS:
        raise ConfigError(
            f"unknown quality metric {metric!r}; choose one of {', '.join(QUALITY_METRICS)}", key="metric"
        )
    if metric == "accuracy" and not data.labelled:
        raise ConfigError(
            "quality metric 'accuracy' needs labelled evaluation data (labels y); this data has none: "
            "add labels, or choose agreement or cosine",
            key="metric",
        )
    return metric


def cosine_similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row pair of two ``[N, D]`` arrays; two zero rows count as
    identical, one zero row as orthogonal."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    norms = norm_a * norm_b
    dots = np.sum(a * b, axis=1)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where((norm_a == 0) & (norm_b == 0), 1.0, np.clip(cos, -1.0, 1.0))


def _top1(scores: np.ndarray) -> np.ndarray:
    if scores.ndim == 1:
        return scores.astype(np.int64)
    return np.asarray(np.argmax(scores.reshape(len(scores), -1), axis=-1), dtype=np.int64)


def model_size_bytes(model: ModelLike) -> int:
    """Serialized size of the model, which is what a bundle ships.

    Args:
        model: the model.

    Returns:
        Size in bytes.
    """
    if isinstance(model, onnx.ModelProto):
        return int(model.ByteSize())
    return len(model)


def count_parameters(model: ModelLike) -> int:
    """Number of stored values: the elements of every initializer of the main graph.

    Quantization scales and zero points count too; they are stored and shipped.

    Args:
        model: the model.

    Returns:
        Total element count.
    """
    return sum(int(np.prod(init.dims, dtype=np.int64)) for init in _to_proto(model).graph.initializer)


def measure_sparsity(model: ModelLike) -> float:
    """Fraction of weight values that are zero.

    Weights are initializers of rank >= 2 (matrices and kernels; biases, scales and zero
    points are left out). A quantized weight counts as zero when it equals the zero point
    of the ``DequantizeLinear`` that reads it, i.e. when it dequantizes to exactly 0.

    Args:
        model: the model.

    Returns:
        Zero weights over all weights, in ``[0, 1]``; 0.0 for a model with no weights.
    """
    proto = _to_proto(model)
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    zero_points: dict[str, tuple[str, int]] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) > 2 and node.input[2]:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            zero_points[node.input[0]] = (node.input[2], axis)
    zeros = total = 0
    for name, init in inits.items():
        if len(init.dims) < 2:
            continue
        values = numpy_helper.to_array(init)
        zero = np.zeros((), dtype=values.dtype)
        if name in zero_points and zero_points[name][0] in inits:
            zp_name, axis = zero_points[name]
            zero = numpy_helper.to_array(inits[zp_name])
            if zero.ndim == 1 and zero.size > 1:
                shape = [1] * values.ndim
                shape[axis % values.ndim] = zero.size
                zero = zero.reshape(shape)
        zeros += int(np.count_nonzero(values == zero))
        total += values.size
    return zeros / total if total else 0.0


def host_latency_ms(model: ModelLike, sample: Inputs | None = None, *, runs: int = 50, warmup: int = 5) -> float:
    """Median latency of one inference on this host: onnxruntime CPU, 1 thread, batch 1.

    This is a quick comparison between compression steps, not a device benchmark;
    devices report their own numbers through ``edge_sdk.metrics``.

    Args:
        model: the model.
        sample: one input row (without or with a batch axis of 1), or a batch of one per
            input name for a model with several inputs; zeros of each input's shape
            (dynamic dimensions as 1) when omitted.
        runs: timed runs.
        warmup: untimed runs first.

    Returns:
        p50 latency in milliseconds.

    Raises:
        ConfigError: ``runs`` is below 1, or ``sample`` does not match the model's inputs.
        ModelLoadError: onnxruntime refused the model.
        ModelError: the model failed on the sample.
    """
    if runs < 1:
        raise ConfigError(f"latency needs at least one run, got {runs}", key="runs")
    with open_host_session(model) as session:
        specs = session.inputs()
        if sample is None:
            sample = {
                s.name: np.zeros([1 if d is None or d == 0 else d for d in s.shape], _numpy_dtype(s)) for s in specs
            }
        elif not isinstance(sample, Mapping) and np.ndim(sample) == len(specs[0].shape) - 1:
            sample = np.asarray(sample)[np.newaxis]
        feeds = input_feeds(session, sample)
        run_batched(session, feeds, 1)  # validates the sample and maps errors
        stats = benchmark(lambda: session.run(feeds), warmup=max(0, warmup - 1), runs=runs)
    return stats.p50_ms
