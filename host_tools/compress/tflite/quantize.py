"""Quantize ``.tflite`` models with Google's ai-edge-quantizer, without TensorFlow.

ai-edge-quantizer (``pip install 'edge-sdk[host]'``) reads and writes TFLite flatbuffers
directly and calibrates with the LiteRT interpreter, so a ``.tflite`` model is quantized
without converting it to ONNX and back. Its recipes are named after what they do
(``dynamic_wi8_afp32``: int8 weights, float activations quantized at run time); the
CLI spellings of :data:`TFLITE_QUANTIZE_MODES` map ``edgectl compress --quantize``
values onto them.

Everything here takes and returns bytes. :func:`quantize_tflite` is the transform;
:func:`measure_tflite` runs a model in LiteRT (through :mod:`edge_sdk.runtime`) for the
report ``edgectl compress`` prints. The flatbuffer schema that ships inside
``ai-edge-litert`` is used to read input shapes and tensor types, and to give a model
without a signature the ``serving_default`` signature that calibration needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from edge_sdk.errors import (
    CompressionError,
    ConfigError,
    ModelLoadError,
    RuntimeUnavailableError,
)
from edge_sdk.metrics import benchmark
from edge_sdk.runtime import SessionOptions, open_session

from ..data import Dataset
from ..evaluate import Quality, check_metric

__all__ = [
    "TFLITE_QUANTIZE_MODES",
    "TFLITE_RECIPES",
    "TfliteCompression",
    "TfliteMetrics",
    "TfliteTensor",
    "compress_tflite",
    "is_tflite",
    "measure_tflite",
    "quantize_tflite",
    "tflite_tensors",
]

logger = logging.getLogger(__name__)

HOST_EXTRA_HINT = "pip install 'edge-sdk[host]'"

TFLITE_RECIPES: Mapping[str, bool] = MappingProxyType(
    {
        "dynamic_wi8_afp32": False,
        "weight_only_wi8_afp32": False,
        "weight_only_wi4_afp32": False,
        "static_wi8_ai8": True,
        "static_wi8_ai16": True,
    }
)
"""ai-edge-quantizer recipes :func:`quantize_tflite` accepts, and whether each needs calibration data."""

TFLITE_QUANTIZE_MODES: Mapping[str, str] = MappingProxyType(
    {
        "int8-dynamic": "dynamic_wi8_afp32",
        "int8-weight-only": "weight_only_wi8_afp32",
        "int4-weight-only": "weight_only_wi4_afp32",
        "int8-static": "static_wi8_ai8",
        "int16-static": "static_wi8_ai16",
    }
)
"""``edgectl compress --quantize`` values for a ``.tflite`` model and the recipe each uses."""

_SIGNATURE = "serving_default"
_IDENTIFIER = b"TFL3"


def is_tflite(data: bytes) -> bool:
    """Whether ``data`` carries the TFLite flatbuffer file identifier (``TFL3`` at byte 4)."""
    return len(data) >= 8 and bytes(data[4:8]) == _IDENTIFIER


@dataclass(frozen=True)
class TfliteTensor:
    """One tensor of a ``.tflite`` model's main subgraph.

    Attributes:
        name: the tensor name.
        shape: its static shape (``-1`` where the signature leaves it open).
        dtype: numpy-style type name (``"float32"``, ``"int8"``...).
        constant: whether it holds data in the file (a weight or bias).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    constant: bool


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f".tflite quantization needs ai-edge-litert: {HOST_EXTRA_HINT}", package="ai-edge-litert"
        ) from exc
    return schema_py_generated


def _read(data: bytes) -> Any:
    """The flatbuffer as the schema's object API (``ModelT``)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ConfigError(f"a .tflite model is given as bytes, not {type(data).__name__}")
    if not is_tflite(bytes(data[:8])):
        raise ModelLoadError("not a .tflite model: the TFL3 flatbuffer identifier is missing", size=len(data))
    schema = _schema()
    try:
        model = schema.ModelT.InitFromPackedBuf(bytes(data), 0)
    except Exception as exc:  # flatbuffers raises struct.error, IndexError... on damaged files
        raise ModelLoadError(f"damaged .tflite model: {exc}") from exc
    if not model.subgraphs:
        raise ModelLoadError(".tflite model has no subgraph")
    return model


def _name(value: bytes | str | None) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


def _type_names() -> dict[int, str]:
    tensor_type = _schema().TensorType
    return {
        getattr(tensor_type, key): key.lower()
        for key in dir(tensor_type)
        if not key.startswith("_") and isinstance(getattr(tensor_type, key), int)
    }


def tflite_tensors(data: bytes) -> list[TfliteTensor]:
    """The tensors of a ``.tflite`` model's first subgraph, in file order.

    Args:
        data: the model.

    Returns:
        One :class:`TfliteTensor` per tensor.

    Raises:
        ModelLoadError: not a ``.tflite`` model, or a damaged one.
    """
    model = _read(data)
    names = _type_names()
    tensors = []
    for t in model.subgraphs[0].tensors or []:
        buffer = model.buffers[t.buffer] if t.buffer < len(model.buffers or []) else None
        constant = buffer is not None and (
            (buffer.data is not None and len(buffer.data) > 0) or bool(getattr(buffer, "size", 0))
        )
        dims = t.shapeSignature if t.shapeSignature is not None and len(t.shapeSignature) else t.shape
        shape = tuple(int(d) for d in (dims if dims is not None else ()))
        tensors.append(TfliteTensor(_name(t.name), shape, names.get(t.type, str(t.type)), constant))
    return tensors


def _inputs(model: Any) -> list[tuple[str, tuple[int, ...]]]:
    graph = model.subgraphs[0]
    return [
        (
            _name(graph.tensors[i].name),
            tuple(int(d) for d in (graph.tensors[i].shape if graph.tensors[i].shape is not None else ())),
        )
        for i in graph.inputs
    ]


def _with_signature(data: bytes, model: Any) -> tuple[bytes, str, list[str]]:
    """The model with a signature (added for subgraph 0 if it has none), its key and input names."""
    schema = _schema()
    if model.signatureDefs:
        sig = model.signatureDefs[0]
        return data, _name(sig.signatureKey), [_name(m.name) for m in sig.inputs or []]
    import flatbuffers  # type: ignore[import-untyped]  # flatbuffers ships no type information

    graph = model.subgraphs[0]

    def tensor_map(index: int) -> Any:
        entry = schema.TensorMapT()
        entry.name = _name(graph.tensors[index].name)
        entry.tensorIndex = index
        return entry

    sig = schema.SignatureDefT()
    sig.signatureKey = _SIGNATURE
    sig.subgraphIndex = 0
    sig.inputs = [tensor_map(i) for i in graph.inputs]
    sig.outputs = [tensor_map(i) for i in graph.outputs]
    model.signatureDefs = [sig]
    builder = flatbuffers.Builder(max(1024, len(data) + 4096))
    builder.Finish(model.Pack(builder), file_identifier=_IDENTIFIER)
    return bytes(builder.Output()), _SIGNATURE, [e.name for e in sig.inputs]


def _calibration_batches(
    inputs: list[tuple[str, tuple[int, ...]]],
    signature_inputs: list[str],
    calibration: np.ndarray | Mapping[str, np.ndarray],
    max_samples: int,
) -> list[dict[str, np.ndarray]]:
    """Calibration feeds in the model's own batch size, keyed by signature input name."""
    if isinstance(calibration, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in calibration.items()}
    else:
        if len(inputs) != 1:
            raise CompressionError(
                f"one calibration array was given, but the model has {len(inputs)} inputs "
                f"({', '.join(n for n, _ in inputs)}); give one array per input name",
                inputs=[n for n, _ in inputs],
            )
        arrays = {inputs[0][0]: np.asarray(calibration)}
    tensor_names = [n for n, _ in inputs]
    if set(arrays) != set(tensor_names):
        raise CompressionError(
            f"calibration data has arrays {sorted(arrays)}, but the model's inputs are {tensor_names}",
            inputs=tensor_names,
        )
    rows = {len(a) for a in arrays.values()}
    if len(rows) != 1 or 0 in rows:
        raise CompressionError(f"calibration arrays must have the same, non-zero number of rows; got {sorted(rows)}")
    feeds: list[dict[str, np.ndarray]] = []
    for (name, shape), key in zip(inputs, signature_inputs, strict=False):
        x = arrays[name]
        if not np.issubdtype(x.dtype, np.number) or tuple(x.shape[1:]) != tuple(shape[1:]):
            raise CompressionError(
                f"calibration data for input {name!r} has shape {list(x.shape)} ({x.dtype}), but the model "
                f"expects {list(shape)}",
                input=name,
                expected=list(shape),
                got=list(x.shape),
            )
        batch = max(1, shape[0]) if shape else 1
        count = min(len(x), max_samples) // batch
        if count == 0:
            raise CompressionError(f"calibration data for {name!r} has fewer rows ({len(x)}) than one batch ({batch})")
        for i in range(count):
            if len(feeds) <= i:
                feeds.append({})
            feeds[i][key] = np.ascontiguousarray(x[i * batch : (i + 1) * batch], dtype=np.float32)
    return feeds


def _running_min_max(seen: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Calibration statistics: the smallest min and largest max over every sample so far."""
    if not seen:
        return dict(new)
    return {**new, "min": np.minimum(seen["min"], new["min"]), "max": np.maximum(seen["max"], new["max"])}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Calibration asks LiteRT to keep every intermediate tensor, which it warns about once
    per interpreter; that is what calibration needs, so the warning is not passed on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*", category=UserWarning)
        yield


def quantize_tflite(
    model: bytes,
    recipe: str = "dynamic_wi8_afp32",
    *,
    calibration: np.ndarray | Mapping[str, np.ndarray] | None = None,
    max_calibration_samples: int = 512,
) -> bytes:
    """Quantize a ``.tflite`` model with one of ai-edge-quantizer's recipes.

    Args:
        model: the float ``.tflite`` model.
        recipe: one of :data:`TFLITE_RECIPES`: ``dynamic_wi8_afp32`` (int8 weights,
            activations quantized at run time), ``weight_only_wi8_afp32`` /
            ``weight_only_wi4_afp32`` (weights stored in int8/int4, dequantized for
            float compute), ``static_wi8_ai8`` / ``static_wi8_ai16`` (integer compute,
            calibrated).
        calibration: representative inputs for the static recipes: one array (a model
            with one input) or one per input tensor name, rows along the first axis. Each
            activation's range is the running min/max over all rows (not
            ai-edge-quantizer's moving average of per-batch ranges, which clips values
            beyond a typical sample's range when the model takes one row at a time).
        max_calibration_samples: use at most this many rows.

    Returns:
        The quantized model. A model without a signature gets ``serving_default``
        (subgraph 0's inputs and outputs), which calibration needs.

    Raises:
        ConfigError: unknown recipe (lists the known ones), or ``model`` is not bytes.
        ModelLoadError: ``model`` is not a ``.tflite`` flatbuffer.
        RuntimeUnavailableError: ai-edge-quantizer is not installed.
        CompressionError: a static recipe without calibration data; calibration data
            that does not fit the inputs (names the input and both shapes); or
            ai-edge-quantizer failed.
    """
    if recipe not in TFLITE_RECIPES:
        raise ConfigError(
            f"unknown .tflite recipe {recipe!r}; choose one of: {', '.join(TFLITE_RECIPES)}", key="recipe"
        )
    if max_calibration_samples < 1:
        raise ConfigError("max_calibration_samples must be at least 1", key="max_calibration_samples")
    parsed = _read(model)
    needs_calibration = TFLITE_RECIPES[recipe]
    if needs_calibration and calibration is None:
        raise CompressionError(f".tflite recipe {recipe} is static and needs calibration data; none was given")
    try:
        from ai_edge_quantizer import calibrator, quantizer, recipe_manager
        from ai_edge_quantizer import recipe as recipes
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f".tflite quantization needs ai-edge-quantizer, which is not installed: {HOST_EXTRA_HINT}",
            package="ai-edge-quantizer",
        ) from exc
    source = bytes(model)
    feeds = None
    signature = _SIGNATURE
    if needs_calibration and calibration is not None:
        source, signature, names = _with_signature(source, parsed)
        feeds = _calibration_batches(_inputs(parsed), names, calibration, max_calibration_samples)
    try:
        with _quiet():
            steps = getattr(recipes, recipe)()
            ranges = None
            if feeds is not None:
                # Quantizer.calibrate() averages each batch's min/max (smoothing 0.95): with
                # a batch-1 model that is the typical sample's range, and larger values clip.
                # The running min/max over all samples (onnxruntime's MinMax) clips none.
                manager = recipe_manager.RecipeManager()
                manager.load_quantization_recipe(steps)
                calib = calibrator.Calibrator(bytearray(source), num_threads=1, qsv_update_func=_running_min_max)
                calib.calibrate({signature: feeds}, manager)
                ranges = calib.get_model_qsvs()
            engine = quantizer.Quantizer(bytearray(source), steps)
            quantized = engine.quantize(ranges, enable_progress_report=False).quantized_model
    except Exception as exc:  # ai-edge-quantizer raises ValueError, RuntimeError, KeyError...
        raise CompressionError(
            f"ai-edge-quantizer ({recipe}) failed: {type(exc).__name__}: {exc}", recipe=recipe
        ) from exc
    if quantized is None:
        raise CompressionError(f"ai-edge-quantizer ({recipe}) returned no model", recipe=recipe)
    logger.info("quantized .tflite with %s: %d -> %d bytes", recipe, len(model), len(quantized))
    return bytes(quantized)


@dataclass(frozen=True)
class TfliteMetrics:
    """A ``.tflite`` model measured on this host with LiteRT.

    Attributes:
        size_bytes: file size.
        weight_types: element type -> number of constant tensors of that type.
        quality: the figure of ``quality_metric`` (see
            :class:`~host_tools.compress.evaluate.Quality`); ``None`` without evaluation data.
        quality_metric: ``"accuracy"``, ``"agreement"``, ``"cosine"`` or ``None``.
        latency_p50_ms: median latency, batch 1, one thread; ``None`` when not measured.
    """

    size_bytes: int
    weight_types: Mapping[str, int]
    quality: float | None
    quality_metric: str | None
    latency_p50_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form: every field, ``weight_types`` as a plain dict."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "weight_types": dict(self.weight_types)}


def _predict(session: Any, x: np.ndarray) -> np.ndarray:
    """First output for every row of ``x``, run in the model's own batch size."""
    spec = session.inputs()[0]
    batch = spec.shape[0] if spec.shape and spec.shape[0] else len(x)
    outputs = []
    for start in range(0, len(x) - batch + 1, batch):
        outputs.append(np.asarray(session.run({spec.name: x[start : start + batch]})[0]))
    if not outputs:
        raise CompressionError(f"evaluation data has {len(x)} rows, fewer than the model's batch of {batch}")
    return np.concatenate(outputs)


def measure_tflite(
    model: bytes,
    evaluation: Dataset | None = None,
    *,
    quality: Quality | None = None,
    latency_runs: int = 50,
) -> tuple[TfliteMetrics, np.ndarray | None]:
    """Measure a single-input ``.tflite`` model in LiteRT: size, weights, quality, latency.

    Args:
        model: the model.
        evaluation: inputs to run (and to time on).
        quality: scores the outputs on ``evaluation`` (built from the original model's
            outputs, :class:`~host_tools.compress.evaluate.Quality`);
            quality is not measured without it.
        latency_runs: timed batch-1 runs (0 to skip timing).

    Returns:
        The metrics, and this model's first output on ``evaluation`` (or ``None``).

    Raises:
        RuntimeUnavailableError: LiteRT is not installed.
        ModelLoadError: LiteRT refused the model.
        ModelError: it failed on the evaluation data.
        CompressionError: evaluation data smaller than one batch.
    """
    weights: dict[str, int] = {}
    for tensor in tflite_tensors(model):
        if tensor.constant:
            weights[tensor.dtype] = weights.get(tensor.dtype, 0) + 1
    score: float | None = None
    metric: str | None = None
    outputs: np.ndarray | None = None
    latency: float | None = None
    x = None if evaluation is None else np.asarray(evaluation.array("tflite evaluation"), dtype=np.float32)
    with open_session(model, "litert", SessionOptions(threads=1)) as session:
        spec = session.inputs()[0]
        if x is not None:
            outputs = _predict(session, x)
            if quality is not None:
                score, metric = quality.score(outputs), quality.metric
        if latency_runs > 0:
            shape = [1 if d is None else d for d in spec.shape]
            sample = x[: shape[0] or 1] if x is not None else np.zeros(shape, dtype=np.float32)
            feeds = {spec.name: sample}
            latency = benchmark(lambda: session.run(feeds), warmup=5, runs=latency_runs).p50_ms
    return TfliteMetrics(len(model), MappingProxyType(weights), score, metric, latency), outputs


@dataclass(frozen=True)
class TfliteCompression:
    """A quantized ``.tflite`` model and how it compares with the original.

    Attributes:
        model_bytes: the quantized model.
        mode: the ``--quantize`` value.
        recipe: the ai-edge-quantizer recipe it ran.
        original: the float model, measured.
        final: the quantized model, measured the same way.
    """

    model_bytes: bytes
    mode: str
    recipe: str
    original: TfliteMetrics
    final: TfliteMetrics

    @property
    def size_ratio(self) -> float:
        """Original size over quantized size."""
        return self.original.size_bytes / max(1, self.final.size_bytes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (the report part of ``edgectl compress --json``)."""
        drop = None
        if self.original.quality is not None and self.final.quality is not None:
            drop = self.original.quality - self.final.quality
        return {
            "format": "tflite",
            "mode": self.mode,
            "recipe": self.recipe,
            "original": self.original.to_dict(),
            "final": self.final.to_dict(),
            "size_ratio": self.size_ratio,
            "quality_drop": drop,
        }


def compress_tflite(
    model: bytes,
    mode: str = "int8-static",
    *,
    calibration: Dataset | None = None,
    evaluation: Dataset | None = None,
    latency_runs: int = 50,
    quality_metric: str | None = None,
) -> TfliteCompression:
    """Quantize a ``.tflite`` model and measure it beside the original in LiteRT.

    Args:
        model: the float model.
        mode: one of :data:`TFLITE_QUANTIZE_MODES` (``_`` may stand for ``-``).
        calibration: representative inputs, for the static modes.
        evaluation: inputs with labels (accuracy) or without (top-1 agreement with the
            original model); quality is not measured without it.
        latency_runs: timed batch-1 runs per model (0 to skip).
        quality_metric: ``"accuracy"``, ``"agreement"`` or ``"cosine"``; ``None`` picks
            accuracy for labelled data, else agreement (see
            :class:`~host_tools.compress.evaluate.Quality`).

    Returns:
        The quantized model and both measurements.

    Raises:
        ConfigError: unknown mode (lists the known ones).
        ModelLoadError: not a ``.tflite`` model, or LiteRT refused it.
        CompressionError: see :func:`quantize_tflite`.
    """
    if evaluation is not None:
        check_metric(quality_metric, evaluation)  # before the quantizer's minutes, not after
    key = mode.strip().lower().replace("_", "-")
    recipe = TFLITE_QUANTIZE_MODES.get(key)
    if recipe is None:
        raise ConfigError(
            f"quantization {mode!r} is not available for .tflite models; choose one of: "
            f"{', '.join(TFLITE_QUANTIZE_MODES)}",
            key="quantize",
            value=mode,
        )
    if TFLITE_RECIPES[recipe] and calibration is None:
        raise ConfigError(
            f"{key} for a .tflite model needs calibration data (--calib), or choose --quantize int8-dynamic",
            key="calib",
        )
    quantized = quantize_tflite(
        model, recipe, calibration=None if calibration is None else calibration.array("tflite calibration")
    )
    original, outputs = measure_tflite(model, evaluation, latency_runs=latency_runs)
    quality = None
    if evaluation is not None and outputs is not None:
        quality = Quality(outputs, evaluation, quality_metric)
        original = dataclasses.replace(original, quality=quality.original, quality_metric=quality.metric)
    final, _ = measure_tflite(quantized, evaluation, quality=quality, latency_runs=latency_runs)
    return TfliteCompression(quantized, key, recipe, original, final)
