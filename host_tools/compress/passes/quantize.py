"""Quantization passes, wrapping ``onnxruntime.quantization``.

Static int8 (QDQ, calibrated), dynamic int8, float16, and 4-bit weight-only
(``MatMulNBits``). onnxruntime's tools read and write files, take a dict of string options and log to the
root logger. These passes keep all of that inside: they take and return
``onnx.ModelProto``, use a private temp directory that is gone when they return, map the
options to typed fields, and route onnxruntime's log records to this module's logger.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import onnx

from edge_sdk.errors import CompressionError, ConfigError

from ..data import Dataset, match_inputs
from ..pass_manager import CompressionPass, PassContext, PassResult
from .decompose import decompose_gemm

__all__ = [
    "QUANTIZE_OPTIONS",
    "CalibrationMethod",
    "DynamicInt8Quantization",
    "Float16Conversion",
    "Int4WeightOnlyQuantization",
    "QuantizationPass",
    "StaticInt8Quantization",
    "parse_quantize_option",
]

logger = logging.getLogger(__name__)

CalibrationMethod = Literal["minmax", "entropy", "percentile"]
_METHODS = ("minmax", "entropy", "percentile")
_ORT_QUANT_DIR = str(Path("onnxruntime", "quantization"))


@dataclass(frozen=True)
class StaticInt8Quantization:
    """Static int8 quantization in QDQ format, calibrated on ``ctx.calibration``.

    Weights are int8, symmetric (zero point 0), per output channel by default.
    Activations default to uint8, asymmetric (U8S8):

    - it is onnxruntime's recommended pairing for QDQ on x86 CPUs, and its MLAS kernels
      on ARM run U8S8 as well;
    - activations after ReLU are non-negative, so an asymmetric uint8 range uses all 256
      levels where symmetric int8 wastes half of them;
    - on the digits MLP (x86 host with VNNI) it gave the same accuracy as S8S8 (97.56%,
      float 97.78%) with two fewer QuantizeLinear nodes and ran about 13% faster at
      batch 1 (p50 11.1 vs 12.7 us).

    ``reduce_range`` (7-bit weights) is not used: it only helps x86 CPUs without VNNI,
    which are not deployment targets. Choose ``activation_type="int8"`` for
    accelerators that want symmetric int8 activations (TensorRT, some NPUs).

    Args:
        per_channel: one scale per output channel of each weight (better accuracy for a
            small size cost) instead of one per tensor.
        method: how activation ranges are chosen from the calibration data: ``"minmax"``
            (observed range), ``"entropy"`` (KL divergence), ``"percentile"`` (99.999th).
        activation_type: ``"uint8"`` or ``"int8"``.
        calibration_batch_size: samples per calibration run.
        max_calibration_samples: use at most this many calibration samples, a random
            subset drawn with ``ctx.seed`` when there are more.
        preprocess: run onnxruntime's shape inference and graph optimisation first, as
            its docs recommend.
        exclude_nodes: names of nodes to keep in float (the accuracy guard fills this in).

    Raises:
        ConfigError: an option is out of range.
    """

    per_channel: bool = True
    method: CalibrationMethod = "minmax"
    activation_type: Literal["uint8", "int8"] = "uint8"
    calibration_batch_size: int = 64
    max_calibration_samples: int | None = 1024
    preprocess: bool = True
    exclude_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ConfigError(f"calibration method must be one of {_METHODS}, not {self.method!r}", key="method")
        if self.activation_type not in ("uint8", "int8"):
            raise ConfigError(
                f"activation_type must be 'uint8' or 'int8', not {self.activation_type!r}", key="activation_type"
            )
        if self.calibration_batch_size < 1:
            raise ConfigError("calibration_batch_size must be at least 1", key="calibration_batch_size")
        if self.max_calibration_samples is not None and self.max_calibration_samples < 1:
            raise ConfigError("max_calibration_samples must be at least 1", key="max_calibration_samples")

    @property
    def name(self) -> str:
        """The pass name."""
        return "int8-static"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Calibrate and quantize.

        Args:
            model: the float model (not modified).
            ctx: must carry calibration data shaped like the model's input.

        Returns:
            The QDQ model, with notes on method, sample count and node counts.

        Raises:
            CompressionError: no calibration data; calibration data whose shape does not
                fit the model input (names the input and both shapes); or onnxruntime failed.
        """
        from onnxruntime import quantization as ortq

        if ctx.calibration is None:
            raise CompressionError(
                "static int8 quantization needs calibration data (representative inputs); none was given"
            )
        inputs = _calibration_inputs(model, ctx.calibration)
        samples = len(ctx.calibration)
        if self.max_calibration_samples is not None and samples > self.max_calibration_samples:
            # A seeded random subset, not the first rows: user files are often sorted by class.
            rows = np.sort(np.random.default_rng(ctx.seed).choice(samples, self.max_calibration_samples, replace=False))
            inputs, samples = {name: value[rows] for name, value in inputs.items()}, len(rows)
        reader = _CalibrationReader(inputs, self.calibration_batch_size, ctx, self.name)
        method = {
            "minmax": ortq.CalibrationMethod.MinMax,
            "entropy": ortq.CalibrationMethod.Entropy,
            "percentile": ortq.CalibrationMethod.Percentile,
        }[self.method]
        activation = ortq.QuantType.QUInt8 if self.activation_type == "uint8" else ortq.QuantType.QInt8
        with _workdir() as work, _ort_logs_routed():
            source, prepared = _prepare(model, work, self.preprocess)
            excluded = _resolve_exclusions(source, self.exclude_nodes)
            out = work / "quantized.onnx"
            try:
                ortq.quantize_static(
                    str(source),
                    str(out),
                    reader,
                    quant_format=ortq.QuantFormat.QDQ,
                    per_channel=self.per_channel,
                    activation_type=activation,
                    weight_type=ortq.QuantType.QInt8,
                    calibrate_method=method,
                    nodes_to_exclude=excluded,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": self.activation_type == "int8"},
                )
            except Exception as exc:  # onnxruntime raises ValueError, RuntimeError, its own Fail
                raise CompressionError(f"onnxruntime static quantization failed: {exc}") from exc
            quantized = onnx.load(str(out))
        trimmed = _trimmed(quantized)
        return PassResult(
            quantized,
            changed=True,
            notes={
                "method": self.method,
                "per_channel": self.per_channel,
                "activation_type": self.activation_type,
                "weight_type": "int8",
                "calibration_samples": samples,
                "float_nodes": list(self.exclude_nodes),
                **_qdq_counts(quantized),
                **prepared,
                **trimmed,
            },
        )


@dataclass(frozen=True)
class DynamicInt8Quantization:
    """Dynamic int8 quantization: int8 weights, activation ranges computed at run time.

    Needs no calibration data. onnxruntime dynamically quantizes ``MatMul`` (and
    ``Conv``, ``Gather``...) but not ``Gemm``, so constant-weight ``Gemm`` nodes are first
    decomposed into ``MatMul`` + ``Add``.

    Args:
        per_channel: one scale per output channel of each weight.
        preprocess: run onnxruntime's shape inference and graph optimisation first.
        exclude_nodes: names of nodes to keep in float (the accuracy guard fills this in).
    """

    per_channel: bool = False
    preprocess: bool = True
    exclude_nodes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The pass name."""
        return "int8-dynamic"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Quantize weights to int8.

        Args:
            model: the float model (may be modified in place by the Gemm decomposition).
            ctx: unused.

        Returns:
            The quantized model, with notes on what was rewritten.

        Raises:
            CompressionError: onnxruntime failed.
        """
        from onnxruntime import quantization as ortq

        decomposed = decompose_gemm(model)
        with _workdir() as work, _ort_logs_routed():
            source, prepared = _prepare(model, work, self.preprocess)
            excluded = _resolve_exclusions(source, self.exclude_nodes)
            out = work / "quantized.onnx"
            try:
                ortq.quantize_dynamic(
                    str(source),
                    str(out),
                    per_channel=self.per_channel,
                    weight_type=ortq.QuantType.QInt8,
                    nodes_to_exclude=excluded,
                )
            except Exception as exc:  # onnxruntime raises ValueError, RuntimeError, its own Fail
                raise CompressionError(f"onnxruntime dynamic quantization failed: {exc}") from exc
            quantized = onnx.load(str(out))
        trimmed = _trimmed(quantized)
        integer_ops = sum(
            1 for n in quantized.graph.node if n.op_type in ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul")
        )
        return PassResult(
            quantized,
            changed=integer_ops > 0 or decomposed > 0,
            notes={
                "per_channel": self.per_channel,
                "gemms_decomposed": decomposed,
                "integer_ops": integer_ops,
                "float_nodes": list(self.exclude_nodes),
                **prepared,
                **trimmed,
            },
        )


@dataclass(frozen=True)
class Float16Conversion:
    """Convert weights and arithmetic to float16 with onnxruntime's converter.

    Inputs and outputs stay float32 (``keep_io_types``), so callers feed the same arrays;
    onnxruntime's converter inserts the ``Cast`` nodes and keeps ops that have no float16
    kernel (its default block list) in float32. Halves the weights; speed depends on the
    device (ARMv8.2+ and GPUs have float16 arithmetic, most x86 CPUs do not).

    Args:
        exclude_nodes: names of nodes to keep in float32 (the accuracy guard fills this in).
    """

    exclude_nodes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The pass name."""
        return "fp16"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Convert to float16.

        Args:
            model: the float32 model (not modified).
            ctx: unused.

        Returns:
            The float16 model, with the number of float16 initializers in the notes.

        Raises:
            CompressionError: the model has no float32 weights, or the converter failed.
        """
        from onnxruntime.transformers.float16 import convert_float_to_float16

        floats = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
        if not floats:
            raise CompressionError("float16 conversion needs float32 weights; this model has none")
        try:
            with _ort_logs_routed(), warnings.catch_warnings():
                # The converter warns for every value it clamps into float16's range;
                # those values are counted in the notes instead.
                warnings.simplefilter("ignore")
                converted = convert_float_to_float16(
                    model, keep_io_types=True, node_block_list=list(self.exclude_nodes) or None
                )
        except Exception as exc:  # the converter raises ValueError, onnx errors, KeyError
            raise CompressionError(f"onnxruntime float16 conversion failed: {exc}") from exc
        _sort_topologically(converted.graph)
        halves = sum(1 for i in converted.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16)
        return PassResult(
            converted,
            changed=halves > 0,
            notes={"float16_weights": halves, "float_nodes": list(self.exclude_nodes)},
        )


@dataclass(frozen=True)
class Int4WeightOnlyQuantization:
    """4-bit weight-only quantization of ``MatMul`` weights into ``MatMulNBits``.

    Weights are quantized in blocks of ``block_size`` values along the input axis, one
    float scale (and, when asymmetric, a 4-bit zero point) per block; activations stay
    float. Constant-weight ``Gemm`` nodes are first decomposed into ``MatMul`` + ``Add``.
    ``MatMulNBits`` is an onnxruntime contrib op (``com.microsoft``), so the result runs
    on onnxruntime only, not on LiteRT or other ONNX runtimes.

    Args:
        block_size: values per scale; a power of two, at least 16.
        symmetric: zero point fixed at 8 (no stored zero points) instead of per block.
        accuracy_level: onnxruntime's compute type for the product (0 unset, 1 fp32,
            2 fp16, 3 bf16, 4 int8); ``None`` lets onnxruntime choose.
        exclude_nodes: names of ``MatMul`` nodes to keep in float.

    Raises:
        ConfigError: ``block_size`` is not a power of two >= 16.
    """

    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None
    exclude_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two >= 16, not {self.block_size}", key="block_size")

    @property
    def name(self) -> str:
        """The pass name."""
        return "int4-weight"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Quantize every eligible ``MatMul`` weight to 4 bits.

        Args:
            model: the float model (modified in place by the Gemm decomposition).
            ctx: unused.

        Returns:
            The model with ``MatMulNBits`` nodes, and how many were made.

        Raises:
            CompressionError: the model has no ``MatMul`` with a constant 2-D weight
                (names the op types it has), or onnxruntime failed.
        """
        decomposed = decompose_gemm(model)
        _name_unnamed_nodes(model)
        inits = {i.name: i for i in model.graph.initializer}
        eligible = [
            n.name
            for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
        ]
        if not eligible:
            ops = sorted({n.op_type for n in model.graph.node})
            raise CompressionError(
                f"4-bit weight-only quantization applies to MatMul/Gemm with constant 2-D weights; "
                f"this model has none (its ops: {', '.join(ops)})",
                op_types=ops,
            )
        try:
            with _ort_logs_routed():
                # Imported here, under the routing guard: this module calls
                # logging.basicConfig(level=INFO) at import time, which would otherwise
                # configure the application's root logger.
                from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

                quantizer = MatMulNBitsQuantizer(
                    model,
                    bits=4,
                    block_size=self.block_size,
                    is_symmetric=self.symmetric,
                    accuracy_level=self.accuracy_level,
                    nodes_to_exclude=list(self.exclude_nodes),
                )
                quantizer.process()
                quantized = _as_model_proto(quantizer.model)
        except Exception as exc:  # onnxruntime raises ValueError, AssertionError, onnx-ir errors
            raise CompressionError(f"onnxruntime 4-bit weight-only quantization failed: {exc}") from exc
        made = sum(1 for n in quantized.graph.node if n.op_type == "MatMulNBits")
        return PassResult(
            quantized,
            changed=made > 0 or decomposed > 0,
            notes={
                "matmul_nbits": made,
                "block_size": self.block_size,
                "symmetric": self.symmetric,
                "gemms_decomposed": decomposed,
                "float_nodes": list(self.exclude_nodes),
            },
        )


QuantizationPass = StaticInt8Quantization | DynamicInt8Quantization | Float16Conversion | Int4WeightOnlyQuantization
"""The quantization passes; each has an ``exclude_nodes`` field the accuracy guard sets."""


def _as_model_proto(model: object) -> onnx.ModelProto:
    """onnxruntime's quantizers hand back a ``ModelProto`` or their ``ONNXModel`` wrapper."""
    if isinstance(model, onnx.ModelProto):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, onnx.ModelProto):
        return inner
    raise CompressionError(f"onnxruntime returned {type(model).__name__}, not an ONNX model")


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after its producers (the float16 converter appends
    its input casts at the end, which ``onnx.checker`` rejects). Stable otherwise."""
    produced_by: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for out in node.output:
            produced_by[out] = index
    order: list[int] = []
    state = [0] * len(graph.node)  # 0 new, 1 visiting, 2 done
    for root in range(len(graph.node)):
        stack = [(root, False)]
        while stack:
            index, expanded = stack.pop()
            if expanded:
                state[index] = 2
                order.append(index)
                continue
            if state[index]:
                continue
            state[index] = 1
            stack.append((index, True))
            for name in reversed(graph.node[index].input):
                producer = produced_by.get(name)
                if producer is not None and state[producer] == 0:
                    stack.append((producer, False))
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def _name_unnamed_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name; node exclusion and reports refer to nodes by name."""
    taken = {n.name for n in model.graph.node if n.name}
    for index, node in enumerate(model.graph.node):
        if node.name:
            continue
        name = f"{node.op_type}_{index}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)


QUANTIZE_OPTIONS: Mapping[str, tuple[type, Mapping[str, object]]] = MappingProxyType(
    {
        "int8-static": (StaticInt8Quantization, {}),
        "int8-static-entropy": (StaticInt8Quantization, {"method": "entropy"}),
        "int8-static-percentile": (StaticInt8Quantization, {"method": "percentile"}),
        "int8-static-per-tensor": (StaticInt8Quantization, {"per_channel": False}),
        "int8-dynamic": (DynamicInt8Quantization, {}),
        "int8-dynamic-per-channel": (DynamicInt8Quantization, {"per_channel": True}),
        "fp16": (Float16Conversion, {}),
        "int4-weight": (Int4WeightOnlyQuantization, {}),
    }
)
"""The quantization modes, by their CLI and recipe spelling: the pass class and its settings."""


def parse_quantize_option(text: str) -> CompressionPass:
    """Map a CLI ``--quantize`` value to a pass.

    Args:
        text: one of :data:`QUANTIZE_OPTIONS` (case and surrounding spaces ignored;
            ``_`` may stand for ``-``).

    Returns:
        A new pass.

    Raises:
        ConfigError: unknown value; the message lists the known ones.
    """
    cls, settings = quantize_mode(text)
    pass_: CompressionPass = cls(**settings)
    return pass_


def quantize_mode(text: str, key: str = "quantize") -> tuple[type[QuantizationPass], Mapping[str, Any]]:
    """The pass class and settings of a mode in :data:`QUANTIZE_OPTIONS` (case and
    surrounding spaces ignored; ``_`` may stand for ``-``).

    Raises:
        ConfigError: unknown mode; the message lists the known ones and ``details["key"]`` is ``key``.
    """
    mode = QUANTIZE_OPTIONS.get(text.strip().lower().replace("_", "-"))
    if mode is None:
        raise ConfigError(
            f"unknown quantization mode {text!r}; choose one of: {', '.join(QUANTIZE_OPTIONS)}", key=key, value=text
        )
    return mode


class _CalibrationReader:
    """Feeds calibration batches to onnxruntime (duck-types its ``CalibrationDataReader``)."""

    def __init__(self, inputs: dict[str, np.ndarray], batch_size: int, ctx: PassContext, step: str) -> None:
        self._inputs = inputs
        self._count = len(next(iter(inputs.values())))
        self._batch_size = batch_size
        self._ctx = ctx
        self._step = step
        self._total = -(-self._count // batch_size)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        start = self._next * self._batch_size
        if start >= self._count:
            return None
        self._next += 1
        self._ctx.report(self._step, "calibrate", self._next, self._total)
        return {name: value[start : start + self._batch_size] for name, value in self._inputs.items()}

    def rewind(self) -> None:
        self._next = 0

    def __iter__(self) -> _CalibrationReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch

    def __len__(self) -> int:
        return self._total


def _calibration_inputs(model: onnx.ModelProto, data: Dataset) -> dict[str, np.ndarray]:
    """The calibration arrays by input name, each checked against its model input and cast
    to its type (float32 inputs, and integer inputs such as token ids)."""
    init_names = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    arrays = match_inputs([i.name for i in inputs], data.x, "calibration data")
    checked = {}
    for model_input in inputs:
        got_array = arrays[model_input.name]
        tensor_type = model_input.type.tensor_type
        expected: list[int | str] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim
        ]
        got = list(got_array.shape)
        fits = len(expected) == len(got) and all(
            not isinstance(e, int) or e == g for e, g in zip(expected[1:], got[1:], strict=False)
        )
        if not fits:
            raise CompressionError(
                f"calibration data for input {model_input.name!r} has shape {got}, but the model expects {expected}",
                input=model_input.name,
                expected=[str(e) for e in expected],
                got=got,
            )
        dtype = _CALIBRATION_TYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise CompressionError(
                f"static quantization calibrates float32 and integer inputs; input {model_input.name!r} is "
                f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)}",
                input=model_input.name,
            )
        if not np.issubdtype(got_array.dtype, np.number):
            raise CompressionError(
                f"calibration data for input {model_input.name!r} is not numeric ({got_array.dtype})"
            )
        checked[model_input.name] = np.ascontiguousarray(got_array, dtype=dtype)
    return checked


_CALIBRATION_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
}


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    """A private temp directory for onnxruntime's file-based API; removed on exit."""
    with tempfile.TemporaryDirectory(prefix="edge-sdk-quant-") as name:
        yield Path(name)


_PREPROCESS_STEPS = ("full", "without symbolic shape inference", "skipped")
"""How pre-processing went, best first: symbolic shape inference, ONNX shape inference and
onnxruntime's optimizer; the same without symbolic shape inference (sympy missing, or it
gave up); none (the optimizer or shape inference failed)."""


def _prepare(model: onnx.ModelProto, work: Path, preprocess: bool) -> tuple[Path, dict[str, str]]:
    """Write the model for onnxruntime, pre-processed when asked; returns its path and
    notes for the report: how pre-processing went (``preprocess``, one of
    :data:`_PREPROCESS_STEPS`) and, after a fallback, why (``preprocess_fallback``).

    Pre-processing is an optimisation, not a requirement, so it degrades instead of
    failing: symbolic shape inference gives up on graphs whose dynamic dimensions it
    cannot relate (a torch export naming the sequence axis differently per input gives
    "Incomplete symbolic shape inference"), so it is retried without symbolic shape
    inference, and then skipped; every fallback is logged as a warning.

    Every file goes to ``work`` by absolute path; the process's working directory is
    neither read nor changed, so concurrent quantizations in one process are safe.
    """
    model = _current_ir(model)
    raw = work / "input.onnx"
    onnx.save(model, str(raw))
    if not preprocess:
        return raw, {}
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work / "prepared.onnx"
    source, how, notes = raw, _PREPROCESS_STEPS[1], {}
    # Symbolic shape inference helps transformer graphs and needs sympy, which the
    # host extra does not install; plain ONNX shape inference covers MLPs and CNNs.
    if importlib.util.find_spec("sympy") is not None:
        try:
            shaped = work / "shaped.onnx"
            onnx.save(_symbolic_shapes(model), str(shaped))
            source, how = shaped, _PREPROCESS_STEPS[0]
        except Exception as exc:  # onnxruntime's shape inference raises many types
            notes["preprocess_fallback"] = f"symbolic shape inference failed ({exc}); pre-processed without it"
            logger.warning("quantization pre-processing: %s", notes["preprocess_fallback"])
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    except Exception as exc:  # onnxruntime's optimizer and shape inference raise many types
        reason = notes.get("preprocess_fallback", "").replace("; pre-processed without it", "; then ")
        notes["preprocess_fallback"] = f"{reason}pre-processing failed ({exc}); quantized without it"
        logger.warning("quantization pre-processing: %s", notes["preprocess_fallback"])
        return raw, {"preprocess": _PREPROCESS_STEPS[2], **notes}
    return prepared, {"preprocess": how, **notes}


def _current_ir(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model in the IR onnxruntime's quantization tools expect (version 4 or later).

    Models of IR version 3 and older (e.g. onnx's own ``light_squeezenet.onnx``) list
    every initializer as a graph input too. onnxruntime's optimizer drops those inputs
    but keeps the old IR version, which ``onnx.checker`` then refuses ("... in
    initializer but not in graph input"). Here the initializers leave the input list and
    the IR version becomes 4, which allows that; the outputs are the same for every feed
    of the real inputs. A model that is already IR 4 or later is returned unchanged.
    """
    if model.ir_version >= 4:
        return model
    upgraded = onnx.ModelProto()
    upgraded.CopyFrom(model)
    weights = {init.name for init in upgraded.graph.initializer}
    real = [i for i in upgraded.graph.input if i.name not in weights]
    del upgraded.graph.input[:]
    upgraded.graph.input.extend(real)
    upgraded.ir_version = 4
    logger.info("model is ONNX IR version %d; quantizing it as IR version 4", model.ir_version)
    return upgraded


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's symbolic shape inference, the step ``quant_pre_process`` runs first.

    ``SymbolicShapeInference.infer_shapes`` saves its partial model as
    ``sym_shape_infer_temp.onnx`` (plus external data) in the *current* directory when it
    gives up. This runs the same steps and raises instead, so nothing lands in the
    caller's directory and nobody has to change the process's working directory.

    Raises:
        CompressionError: inference could not give every tensor a shape.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(2**31 - 1, False, False, 0)  # int_max, auto_merge, guess_rank, verbose
    inference._preprocess(model)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    if not complete:
        raise CompressionError("Incomplete symbolic shape inference")
    shaped: onnx.ModelProto = inference.out_mp_
    return shaped


def _resolve_exclusions(prepared: Path, names: tuple[str, ...]) -> list[str]:
    """Node names to exclude in the pre-processed model.

    onnxruntime's optimizer names a node it fuses ``"<original>/<Fusion>"``, so a node
    excluded by its original name is also excluded under its fused name.
    """
    if not names:
        return []
    wanted = set(names)
    found = [
        node.name
        for node in onnx.load(str(prepared), load_external_data=False).graph.node
        if node.name in wanted or node.name.split("/", 1)[0] in wanted
    ]
    return sorted(set(found) | wanted)


def _trimmed(model: onnx.ModelProto) -> dict[str, int]:
    """Remove from a quantized model, in place, what onnxruntime's tools leave behind that
    nothing needs; returns what was removed, for the notes.

    - Zero points of ``DequantizeLinear`` nodes whose input is an int32 initializer (the
      quantized biases) when they are all zero: an absent zero point means zero, and
      onnxruntime's QDQ fusion treats both alike. Per-channel, they were one int32 per
      output channel, e.g. 1.2 KB of zeros for a 300-wide layer.
    - Initializers that no node uses any more.
    - Opset imports of domains no node uses: onnxruntime's optimizer declares every
      domain it knows (``com.microsoft.nchwc``, ``org.pytorch.aten``, ...).

    The model computes exactly what it computed before.
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    zero_points = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.input) != 3:
            continue
        values, zero = inits.get(node.input[0]), inits.get(node.input[2])
        if values is None or zero is None or values.data_type != onnx.TensorProto.INT32:
            continue
        if zero.data_type == onnx.TensorProto.INT32 and not np.any(onnx.numpy_helper.to_array(zero)):
            del node.input[2]
            zero_points += 1
    used = {name for node in _all_nodes(graph) for name in node.input} | {o.name for o in graph.output}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    domains = {node.domain or "" for node in _all_nodes(graph)}
    for function in model.functions:
        domains.add(function.domain)
        domains.update(node.domain or "" for node in function.node)
    declared = list(model.opset_import)
    kept = [o for o in declared if (o.domain or "") in domains or (o.domain or "") in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return {
        "bias_zero_points_dropped": zero_points,
        "unused_initializers_dropped": len(unused),
        "unused_opsets_dropped": len(declared) - len(kept),
    }


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of the subgraphs in its attributes (``If``, ``Loop``...)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


def _qdq_counts(model: onnx.ModelProto) -> dict[str, int]:
    ops = [n.op_type for n in model.graph.node]
    int8 = sum(1 for init in model.graph.initializer if init.data_type == onnx.TensorProto.INT8 and len(init.dims) >= 2)
    return {
        "quantize_nodes": ops.count("QuantizeLinear"),
        "dequantize_nodes": ops.count("DequantizeLinear"),
        "int8_weights": int8,
    }


class _RouteOrtRecords(logging.Filter):
    """Root-logger filter: re-emit onnxruntime.quantization's records on our logger, drop them at root."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _ORT_QUANT_DIR not in record.pathname:
            return True
        if logger.isEnabledFor(record.levelno):
            logger.log(record.levelno, "onnxruntime: %s", record.getMessage())
        return False


@contextlib.contextmanager
def _ort_logs_routed() -> Iterator[None]:
    """onnxruntime.quantization logs with ``logging.warning()`` on the root logger and
    its histogram calibrators ``print()`` to stdout.

    For the duration of a quantization call, a root filter moves those records (and only
    those, identified by source file) to this module's logger, a ``NullHandler`` stops
    ``logging.warning()`` from configuring the application's root logger behind its back,
    and stdout is captured and logged at debug level, so a CLI's output stays its own.
    """
    root = logging.getLogger()
    route = _RouteOrtRecords()
    guard = logging.NullHandler()
    printed = io.StringIO()
    root.addFilter(route)
    root.addHandler(guard)
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        root.removeHandler(guard)
        root.removeFilter(route)
        for line in printed.getvalue().splitlines():
            if line.strip():
                logger.debug("onnxruntime: %s", line.strip())
