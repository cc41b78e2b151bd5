"""onnxruntime backend. The only module that imports ``onnxruntime``, and only lazily.

Models come from a file or, on the host, from serialized bytes in memory (the
compression tools evaluate models they never write to disk).

Precision: onnxruntime cannot list a graph's nodes and the device has no ``onnx``
package, so the precision comes from, in order: the caller's ``precision_hint``
(a bundle manifest carries it); else a small read of the model's protobuf
wire format that collects the node op types (``QuantizeLinear``,
``DequantizeLinear``, ``QLinear*``, ``MatMulInteger``, ``ConvInteger`` mean int8);
else the inputs' element types.
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.errors import (
    ConfigError,
    ModelError,
    ModelLoadError,
    RuntimeUnavailableError,
)
from edge_sdk.protowire import GRAPH_NODE, MODEL_GRAPH, WireError, fields
from edge_sdk.runtime._types import (
    ModelSource,
    SessionOptions,
    TensorSpec,
    check_feed_names,
    precision_from_dtypes,
)

__all__ = [
    "OnnxSession",
    "onnx_op_types",
    "open_onnx",
    "precision_from_op_types",
    "resolve_providers",
]

logger = logging.getLogger(__name__)

RUNTIME = "onnxruntime"
CPU_PROVIDER = "CPUExecutionProvider"
#: Accelerated providers tried, in this order, when the caller names none.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

_INT8_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
    }
)

# onnxruntime's type strings, "tensor(float)" etc., as numpy dtype names.
_ORT_DTYPES = {
    "float": "float32",
    "float16": "float16",
    "double": "float64",
    "bfloat16": "bfloat16",
    "int8": "int8",
    "uint8": "uint8",
    "int16": "int16",
    "uint16": "uint16",
    "int32": "int32",
    "uint32": "uint32",
    "int64": "int64",
    "uint64": "uint64",
    "bool": "bool",
    "string": "str",
}

# Do not scan model files larger than this for op types; fall back to input dtypes.
_MAX_SCAN_BYTES = 2 * 1024**3
# Nested subgraphs (If / Loop bodies) followed this deep at most.
_MAX_GRAPH_DEPTH = 8


def resolve_providers(requested: tuple[str, ...] | None, available: list[str]) -> tuple[str, ...]:
    """Choose execution providers; pure, so it is testable without a GPU.

    Args:
        requested: providers in order of preference, or ``None`` for the best available.
        available: what ``onnxruntime.get_available_providers()`` reports.

    Returns:
        The providers to use, always ending with the CPU provider.

    Raises:
        ConfigError: a requested provider is not available; the message lists those that are.
    """
    if requested is None:
        chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    else:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ConfigError(
                f"execution provider {', '.join(missing)} not available; this onnxruntime has: {', '.join(available)}",
                missing=missing,
                available=list(available),
            )
        chosen = [p for p in dict.fromkeys(requested) if p != CPU_PROVIDER]
    return (*chosen, CPU_PROVIDER)


def _length_delimited(buf: memoryview) -> list[tuple[int, memoryview]]:
    """The (field number, bytes) of every length-delimited field of one message."""
    return [(f.number, f.payload) for f in fields(buf) if f.payload is not None]


def _graph_op_types(graph: memoryview, depth: int, found: set[str]) -> None:
    # GraphProto.node = 1; NodeProto.op_type = 4, .attribute = 5;
    # AttributeProto.g = 6, .graphs = 11.
    if depth > _MAX_GRAPH_DEPTH:
        return
    for field, node in _length_delimited(graph):
        if field != GRAPH_NODE:
            continue
        for nfield, value in _length_delimited(node):
            if nfield == 4:
                found.add(bytes(value).decode("utf-8", errors="replace"))
            elif nfield == 5:
                for afield, sub in _length_delimited(value):
                    if afield in (6, 11):
                        _graph_op_types(sub, depth + 1, found)


def _op_types_of(model: memoryview) -> set[str] | None:
    found: set[str] = set()
    try:
        for field, graph in _length_delimited(model):
            if field == MODEL_GRAPH:
                _graph_op_types(graph, 0, found)
    except WireError:
        return None
    return found


def onnx_op_types(data: bytes | memoryview) -> set[str] | None:
    """The op types of an ONNX model's nodes, read straight from the protobuf wire format.

    Pure and cheap: it skips initializers without decoding them and needs no ``onnx``
    package. Subgraphs of ``If``/``Loop`` are included.

    Args:
        data: the serialised ``ModelProto``.

    Returns:
        The set of op types, or ``None`` when the bytes are not a parsable model.
    """
    return _op_types_of(memoryview(data))


def precision_from_op_types(op_types: set[str]) -> str | None:
    """``"int8"`` when the graph has quantization ops, else ``None`` (undecided)."""
    if op_types & _INT8_OPS or any(op.startswith("QLinear") for op in op_types):
        return "int8"
    return None


def _scan(source: ModelSource) -> set[str] | None:
    if source.data is not None:
        return onnx_op_types(source.data) if 0 < len(source.data) <= _MAX_SCAN_BYTES else None
    assert source.path is not None
    return _scan_file(source.path)


def _scan_file(path: Path) -> set[str] | None:
    try:
        size = path.stat().st_size
        if size == 0 or size > _MAX_SCAN_BYTES:
            return None
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            # _op_types_of returns only strings, so no view of the map outlives the call.
            return _op_types_of(memoryview(mm))
    except (OSError, ValueError, BufferError) as exc:
        logger.debug("could not scan %s for op types: %s", path, exc)
        return None


def _spec(arg: Any) -> TensorSpec:
    type_str = str(arg.type)
    inner = type_str[len("tensor(") : -1] if type_str.startswith("tensor(") else type_str
    dtype = _ORT_DTYPES.get(inner, inner)
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or ()))
    return TensorSpec(name=arg.name, shape=shape, dtype=dtype)


class OnnxSession:
    """An :class:`~edge_sdk.runtime.InferenceSession` backed by onnxruntime.

    Built by :func:`open_onnx`; not meant to be constructed directly.
    """

    runtime = RUNTIME

    def __init__(
        self, session: Any, source: ModelSource, providers: tuple[str, ...], threads: int, precision: str
    ) -> None:
        self._session: Any | None = session
        self._name = source.name
        self._label = source.label
        self.providers = providers
        self.threads = threads
        self.precision = precision
        self._inputs = [_spec(a) for a in session.get_inputs()]
        self._input_names = frozenset(spec.name for spec in self._inputs)
        self._outputs = [_spec(a) for a in session.get_outputs()]

    def __repr__(self) -> str:
        return f"OnnxSession({self._label!r}, providers={self.providers!r}, precision={self.precision!r})"

    def inputs(self) -> list[TensorSpec]:
        """The model's inputs, in declaration order."""
        return list(self._inputs)

    def outputs(self) -> list[TensorSpec]:
        """The model's outputs, in the order :meth:`run` returns them."""
        return list(self._outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model once.

        Args:
            feeds: one array per input name.

        Returns:
            One array per output, in :meth:`outputs` order.

        Raises:
            ModelError: the session is closed, a feed is missing or unknown, or
                onnxruntime failed to run the model.
        """
        if self._session is None:
            raise ModelError(f"session for {self._label} is closed", model=self._label)
        if feeds.keys() != self._input_names:  # the fast path costs ~0.1 us; benchmarks time this call
            check_feed_names(self._name, self._label, self._input_names, feeds)
        try:
            outputs: list[np.ndarray] = self._session.run(None, feeds)  # onnxruntime is untyped: its result is Any
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ModelError(f"onnxruntime failed to run {self._name}: {exc}", model=self._label) from exc
        return outputs

    def close(self) -> None:
        """Drop the onnxruntime session; onnxruntime frees it with the last reference."""
        self._session = None

    def __enter__(self) -> OnnxSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_onnx(source: ModelSource, options: SessionOptions, precision_hint: str | None) -> OnnxSession:
    """Load an ONNX model with onnxruntime.

    Args:
        source: the ``.onnx`` file (external data, if any, next to it) or the
            serialized model in memory (no external data).
        options: threads and providers.
        precision_hint: precision declared by the bundle, or ``None`` to work it out.

    Returns:
        The open session.

    Raises:
        RuntimeUnavailableError: onnxruntime is not installed.
        ConfigError: a requested provider is not available.
        ModelLoadError: the file is missing, the bytes are empty, or onnxruntime
            refuses the model.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RuntimeUnavailableError(
            "onnxruntime is not installed; install it with `pip install onnxruntime`",
            runtime=RUNTIME,
            package="onnxruntime",
        ) from exc

    providers = resolve_providers(options.providers, list(ort.get_available_providers()))
    source.check_present()
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.threads
    so.inter_op_num_threads = 1
    model = source.data if source.data is not None else str(source.path)
    try:
        session = ort.InferenceSession(model, sess_options=so, providers=list(providers))
    except Exception as exc:  # InvalidProtobuf, Fail, NoSuchFile...: all mean "refused"
        raise ModelLoadError(
            f"onnxruntime refused model {source.label}: {exc}", model=source.label, runtime=RUNTIME
        ) from exc

    used = tuple(session.get_providers())
    if used != providers:
        logger.warning("%s: asked for providers %s, onnxruntime gave %s", source.name, providers, used)
    if precision_hint is not None:
        precision = precision_hint
    else:
        op_types = _scan(source)
        precision = (precision_from_op_types(op_types) if op_types else None) or precision_from_dtypes(
            [_spec(a).dtype for a in session.get_inputs()]
        )
    logger.debug("opened %s with %s, precision %s", source.name, used, precision)
    return OnnxSession(session, source, used, options.threads, precision)
