"""LiteRT backend for ``.tflite`` models. The only module that imports LiteRT, lazily.

It uses ``ai_edge_litert.interpreter.Interpreter`` and falls back to
``tflite_runtime.interpreter.Interpreter`` on older devices where only
``tflite-runtime`` is installed; the session's ``runtime`` says which one ran.

Quantized inputs are handled at the edge: when an input tensor is int8/uint8/int16
with a scale and the caller feeds floats, the floats are quantized with the tensor's
own parameters. When the caller fed floats that way, quantized outputs are given back
dequantized to float32 ("float in, float out"); when the caller fed integers, outputs
come back raw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_sdk.errors import (
    ConfigError,
    ModelError,
    ModelLoadError,
    RuntimeUnavailableError,
)
from edge_sdk.runtime._types import (
    ModelSource,
    SessionOptions,
    TensorSpec,
    check_feed_names,
    precision_from_dtypes,
)

__all__ = ["LiteRtSession", "dequantize", "load_interpreter_class", "open_litert", "quantize"]

logger = logging.getLogger(__name__)

LITERT = "litert"
TFLITE_RUNTIME = "tflite-runtime"
CPU = "cpu"

_QUANTIZED_DTYPES = frozenset({"int8", "uint8", "int16"})


def load_interpreter_class(prefer: str = LITERT) -> tuple[type[Any], str]:
    """Import the LiteRT interpreter class, falling back to tflite-runtime.

    Args:
        prefer: ``"litert"`` tries ai-edge-litert then tflite-runtime;
            ``"tflite-runtime"`` uses only tflite-runtime.

    Returns:
        The ``Interpreter`` class and the runtime name that provided it.

    Raises:
        RuntimeUnavailableError: neither package is installed.
    """
    if prefer == LITERT:
        try:
            from ai_edge_litert.interpreter import Interpreter

            return Interpreter, LITERT
        except ImportError:
            logger.debug("ai-edge-litert not importable; trying tflite-runtime")
    try:
        from tflite_runtime.interpreter import Interpreter as TfliteInterpreter
    except ImportError as exc:
        raise RuntimeUnavailableError(
            "no LiteRT runtime is installed; install it with `pip install 'edge-sdk[litert]'` "
            "(that is `pip install ai-edge-litert`), or `pip install tflite-runtime` on older devices",
            runtime=prefer,
            package="ai-edge-litert",
        ) from exc
    return TfliteInterpreter, TFLITE_RUNTIME


@dataclass(frozen=True)
class _Tensor:
    spec: TensorSpec
    index: int
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.spec.dtype in _QUANTIZED_DTYPES and self.scale != 0.0


def _tensor(detail: dict[str, Any]) -> _Tensor:
    signature = detail.get("shape_signature")
    if signature is None or len(signature) == 0:
        signature = detail["shape"]
    shape = tuple(int(d) if int(d) >= 0 else None for d in signature)
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return _Tensor(
        spec=TensorSpec(name=str(detail["name"]), shape=shape, dtype=np.dtype(detail["dtype"]).name),
        index=int(detail["index"]),
        scale=float(scale),
        zero_point=int(zero_point),
    )


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    """Affine-quantize real values: ``q = clip(round(x / scale) + zero_point)``.

    Args:
        x: real values.
        scale: the tensor's scale (non-zero).
        zero_point: the tensor's zero point.
        dtype: integer numpy dtype name of the tensor.

    Returns:
        The quantized array of ``dtype``.
    """
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, dtype=np.float64) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Real float32 values of affine-quantized ``q``."""
    real = q.astype(np.float32)  # a new array, so the arithmetic below may work in place
    real -= np.float32(zero_point)
    real *= np.float32(scale)
    return real


def _model_precision(interpreter: Any, inputs: list[_Tensor]) -> str:
    """int8 if any tensor is integer-quantized, fp16 if any is half, else by inputs."""
    try:
        details = interpreter.get_tensor_details()
    except Exception:  # some builds refuse details of internal tensors
        return precision_from_dtypes([t.spec.dtype for t in inputs])
    dtypes = []
    for d in details:
        name = np.dtype(d["dtype"]).name
        scale, _ = d.get("quantization", (0.0, 0))
        if name in _QUANTIZED_DTYPES and not scale:
            continue  # plain integer tensors (indices, shapes) say nothing about precision
        dtypes.append(name)
    return precision_from_dtypes(dtypes)


class LiteRtSession:
    """An :class:`~edge_sdk.runtime.InferenceSession` backed by a LiteRT interpreter.

    Built by :func:`open_litert`. Inputs with a dynamic dimension are resized to the
    shape of each feed before running.
    """

    providers: tuple[str, ...] = (CPU,)

    def __init__(self, interpreter: Any, source: ModelSource, runtime: str, threads: int) -> None:
        self._interpreter: Any | None = interpreter
        self._name = source.name
        self._label = source.label
        self.runtime = runtime
        self.threads = threads
        self._inputs = [_tensor(d) for d in interpreter.get_input_details()]
        self._outputs = [_tensor(d) for d in interpreter.get_output_details()]
        # Current allocated input shapes, so runs only resize when a feed's shape changes.
        self._shapes = {int(d["index"]): tuple(int(n) for n in d["shape"]) for d in interpreter.get_input_details()}
        self.precision = _model_precision(interpreter, self._inputs)

    def __repr__(self) -> str:
        return f"LiteRtSession({self._label!r}, runtime={self.runtime!r}, precision={self.precision!r})"

    def inputs(self) -> list[TensorSpec]:
        """The model's inputs, in declaration order."""
        return [t.spec for t in self._inputs]

    def outputs(self) -> list[TensorSpec]:
        """The model's outputs, in the order :meth:`run` returns them."""
        return [t.spec for t in self._outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model once, quantizing float feeds for quantized inputs.

        Args:
            feeds: one array per input name.

        Returns:
            One array per output; quantized outputs are dequantized to float32 when
            any float feed was quantized at the edge.

        Raises:
            ModelError: the session is closed, a feed is missing or unknown, or the
                interpreter failed.
        """
        interpreter = self._interpreter
        if interpreter is None:
            raise ModelError(f"session for {self._label} is closed", model=self._label)
        check_feed_names(self._name, self._label, (t.spec.name for t in self._inputs), feeds)
        float_in = False
        try:
            arrays = []
            for t in self._inputs:
                x = np.asarray(feeds[t.spec.name])
                if t.quantized and np.issubdtype(x.dtype, np.floating):
                    x = quantize(x, t.scale, t.zero_point, t.spec.dtype)
                    float_in = True
                else:
                    x = x.astype(t.spec.dtype, copy=False)
                arrays.append(x)
            self._resize_if_needed(interpreter, arrays)
            for t, x in zip(self._inputs, arrays, strict=False):
                interpreter.set_tensor(t.index, x)
            interpreter.invoke()
            outputs = []
            for t in self._outputs:
                y = interpreter.get_tensor(t.index)
                if float_in and t.quantized:
                    y = dequantize(y, t.scale, t.zero_point)
                outputs.append(y)
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError
            raise ModelError(f"{self.runtime} failed to run {self._name}: {exc}", model=self._label) from exc
        return outputs

    def _resize_if_needed(self, interpreter: Any, arrays: list[np.ndarray]) -> None:
        resized = False
        for t, x in zip(self._inputs, arrays, strict=False):
            if self._shapes[t.index] != x.shape:
                interpreter.resize_tensor_input(t.index, list(x.shape))
                self._shapes[t.index] = x.shape
                resized = True
        if resized:
            interpreter.allocate_tensors()

    def close(self) -> None:
        """Drop the interpreter; LiteRT frees it with the last reference."""
        self._interpreter = None

    def __enter__(self) -> LiteRtSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_litert(source: ModelSource, options: SessionOptions, prefer: str = LITERT) -> LiteRtSession:
    """Load a ``.tflite`` model with LiteRT (or tflite-runtime).

    Args:
        source: the model file, or the flatbuffer in memory.
        options: threads; providers must be ``None`` or ``("cpu",)``.
        prefer: ``"litert"`` (fall back to tflite-runtime) or ``"tflite-runtime"``.

    Returns:
        The open session.

    Raises:
        RuntimeUnavailableError: neither ai-edge-litert nor tflite-runtime is installed.
        ConfigError: providers other than ``"cpu"`` were asked for.
        ModelLoadError: the file is missing, the bytes are empty, or the interpreter
            refuses the model.
    """
    if options.providers is not None and set(options.providers) - {CPU}:
        raise ConfigError(
            f"provider {', '.join(sorted(set(options.providers) - {CPU}))} not available for LiteRT; available: {CPU}",
            available=[CPU],
        )
    interpreter_cls, runtime = load_interpreter_class(prefer)
    source.check_present()
    model = {"model_content": source.data} if source.data is not None else {"model_path": str(source.path)}
    try:
        interpreter = interpreter_cls(**model, num_threads=options.threads)
        interpreter.allocate_tensors()
    except Exception as exc:  # ValueError for bad flatbuffers, RuntimeError for bad ops
        raise ModelLoadError(
            f"{runtime} refused model {source.label}: {exc}", model=source.label, runtime=runtime
        ) from exc
    session = LiteRtSession(interpreter, source, runtime, options.threads)
    logger.debug("opened %s with %s, precision %s", source.name, runtime, session.precision)
    return session
