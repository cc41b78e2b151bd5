"""Build tiny ``.tflite`` models at test time, without TensorFlow.

The flatbuffer schema module shipped inside ``ai-edge-litert``
(``ai_edge_litert/schema_py_generated.py``) has the generated object API
(``ModelT``, ``SubGraphT``, ``TensorT``...). Filling those objects and packing them
with ``flatbuffers`` gives a valid model file that LiteRT loads, so tests need no
converter and nothing is downloaded or committed.

Every builder returns the model bytes; callers write them where they like.
Requires ``ai-edge-litert`` (for the schema module) and ``flatbuffers``.
"""

from __future__ import annotations

from dataclasses import dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

__all__ = [
    "QuantParams",
    "add_model",
    "fully_connected_model",
    "quantized_add_model",
]

_FILE_IDENTIFIER = b"TFL3"
_SCHEMA_VERSION = 3

_TENSOR_TYPES = {
    np.dtype("float32"): schema.TensorType.FLOAT32,
    np.dtype("int8"): schema.TensorType.INT8,
    np.dtype("uint8"): schema.TensorType.UINT8,
    np.dtype("int32"): schema.TensorType.INT32,
}


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization of one tensor: ``real = scale * (q - zero_point)``."""

    scale: float
    zero_point: int

    def quantize(self, x: np.ndarray, dtype: str = "int8") -> np.ndarray:
        """Quantize real values the way LiteRT does (round half away, clip)."""
        info = np.iinfo(dtype)
        q = np.round(np.asarray(x, dtype=np.float64) / self.scale) + self.zero_point
        return np.clip(q, info.min, info.max).astype(dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Real values of quantized ``q``."""
        return (q.astype(np.float32) - self.zero_point) * np.float32(self.scale)


def _tensor(
    name: str,
    shape: tuple[int, ...],
    dtype: str,
    buffer: int,
    quant: QuantParams | None = None,
) -> schema.TensorT:
    t = schema.TensorT()
    t.name = name
    t.shape = list(shape)
    t.type = _TENSOR_TYPES[np.dtype(dtype)]
    t.buffer = buffer
    if quant is not None:
        q = schema.QuantizationParametersT()
        q.scale = [float(quant.scale)]
        q.zeroPoint = [int(quant.zero_point)]
        t.quantization = q
    return t


def _buffer(data: np.ndarray | None = None) -> schema.BufferT:
    b = schema.BufferT()
    if data is not None:
        b.data = np.ascontiguousarray(data).view(np.uint8).ravel()
    return b


def _opcode(builtin: int) -> schema.OperatorCodeT:
    oc = schema.OperatorCodeT()
    oc.builtinCode = builtin
    # Codes below 127 must also be in the deprecated int8 field for older readers.
    oc.deprecatedBuiltinCode = min(builtin, 127)
    oc.version = 1
    return oc


def _finish(
    tensors: list[schema.TensorT],
    buffers: list[schema.BufferT],
    operators: list[schema.OperatorT],
    opcodes: list[schema.OperatorCodeT],
    inputs: list[int],
    outputs: list[int],
) -> bytes:
    sg = schema.SubGraphT()
    sg.tensors = tensors
    sg.operators = operators
    sg.inputs = inputs
    sg.outputs = outputs
    sg.name = "main"
    model = schema.ModelT()
    model.version = _SCHEMA_VERSION
    model.operatorCodes = opcodes
    model.subgraphs = [sg]
    # Buffer 0 is by convention the empty buffer shared by all non-constant tensors.
    model.buffers = [_buffer(), *buffers]
    model.description = "edge-sdk test model"
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())


def add_model(shape: tuple[int, ...] = (1, 4)) -> bytes:
    """``out = a + b`` in float32; inputs named ``a`` and ``b``, output ``out``."""
    tensors = [
        _tensor("a", shape, "float32", 0),
        _tensor("b", shape, "float32", 0),
        _tensor("out", shape, "float32", 0),
    ]
    op = schema.OperatorT()
    op.opcodeIndex = 0
    op.inputs = [0, 1]
    op.outputs = [2]
    op.builtinOptionsType = schema.BuiltinOptions.AddOptions
    op.builtinOptions = schema.AddOptionsT()
    return _finish(tensors, [], [op], [_opcode(schema.BuiltinOperator.ADD)], [0, 1], [2])


def fully_connected_model(weights: np.ndarray, bias: np.ndarray, batch: int = 1) -> bytes:
    """``out = x @ weights.T + bias`` in float32 (TFLite stores weights as [out, in]).

    Args:
        weights: float32 array of shape ``(units, features)``.
        bias: float32 array of shape ``(units,)``.
        batch: leading dimension of the input ``x``.

    Returns:
        The model bytes; input ``x`` of shape ``(batch, features)``, output ``y``.
    """
    weights = np.asarray(weights, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    units, features = weights.shape
    tensors = [
        _tensor("x", (batch, features), "float32", 0),
        _tensor("weights", (units, features), "float32", 1),
        _tensor("bias", (units,), "float32", 2),
        _tensor("y", (batch, units), "float32", 0),
    ]
    op = schema.OperatorT()
    op.opcodeIndex = 0
    op.inputs = [0, 1, 2]
    op.outputs = [3]
    op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = schema.FullyConnectedOptionsT()
    return _finish(
        tensors,
        [_buffer(weights), _buffer(bias)],
        [op],
        [_opcode(schema.BuiltinOperator.FULLY_CONNECTED)],
        [0],
        [3],
    )


def quantized_add_model(
    shape: tuple[int, ...] = (1, 4),
    a: QuantParams = QuantParams(0.05, 0),
    b: QuantParams = QuantParams(0.05, 0),
    out: QuantParams = QuantParams(0.1, 0),
) -> bytes:
    """``out = a + b`` entirely in int8, with per-tensor quantization parameters.

    Inputs ``a``, ``b`` and output ``out`` are int8 tensors, which is what a fully
    integer-quantized model looks like to the caller.
    """
    tensors = [
        _tensor("a", shape, "int8", 0, a),
        _tensor("b", shape, "int8", 0, b),
        _tensor("out", shape, "int8", 0, out),
    ]
    op = schema.OperatorT()
    op.opcodeIndex = 0
    op.inputs = [0, 1]
    op.outputs = [2]
    op.builtinOptionsType = schema.BuiltinOptions.AddOptions
    op.builtinOptions = schema.AddOptionsT()
    return _finish(tensors, [], [op], [_opcode(schema.BuiltinOperator.ADD)], [0, 1], [2])
