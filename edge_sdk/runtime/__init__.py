"""Run models on this machine: one session protocol over onnxruntime and LiteRT.

``open_session`` is the one way in, for a model file or a serialized model in
memory (``open_sparse_session`` for a sparse graph and its CSR weights); nothing else
in the repository opens an onnxruntime or LiteRT session.
It picks the backend by name, converts every runtime failure into an
:class:`~edge_sdk.errors.ModelError`, and gives back an :class:`InferenceSession`
whose inputs and outputs are described by plain :class:`TensorSpec` values.
onnxruntime and LiteRT are imported only when a session of theirs is opened, so
``import edge_sdk.runtime`` stays light for the agent.

Precision: LiteRT sessions read it from the model's tensors. onnxruntime cannot
list a graph's nodes, so an onnxruntime session uses ``precision_hint`` when given
(the bundle manifest carries it), else scans the model's protobuf bytes for
quantization ops, else goes by the inputs' element types.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
from typing import TYPE_CHECKING

from edge_sdk.errors import ConfigError, RuntimeUnavailableError
from edge_sdk.runtime._standin import StandInSession
from edge_sdk.runtime._types import (
    PRECISIONS,
    InferenceSession,
    ModelLike,
    ModelSource,
    SessionOptions,
    TensorSpec,
)

__all__ = [
    "PRECISIONS",
    "RUNTIMES",
    "InferenceSession",
    "SessionOptions",
    "StandInSession",
    "TensorSpec",
    "available_runtimes",
    "open_session",
    "open_sparse_session",
    "preload",
    "sample_feeds",
]

if TYPE_CHECKING:
    from collections.abc import Mapping

    import numpy as np

    from edge_sdk.runtime._sparse import CsrLike

logger = logging.getLogger(__name__)

#: Runtime names accepted by :func:`open_session`.
RUNTIMES = ("onnxruntime", "litert", "tflite-runtime")

# runtime name -> (importable top-level module, distribution name)
_PACKAGES = {
    "onnxruntime": ("onnxruntime", "onnxruntime"),
    "litert": ("ai_edge_litert", "ai-edge-litert"),
    "tflite-runtime": ("tflite_runtime", "tflite-runtime"),
}
_DEFAULT_OPTIONS = SessionOptions()


def open_session(
    model: ModelLike,
    runtime: str,
    options: SessionOptions = _DEFAULT_OPTIONS,
    *,
    precision_hint: str | None = None,
) -> InferenceSession:
    """Load a model and return a session that runs it.

    Args:
        model: the ``.onnx`` or ``.tflite`` file, or the serialized model itself
            (``bytes``); messages then name it ``<in-memory model>``. An in-memory
            ONNX model cannot use external data files.
        runtime: ``"onnxruntime"``; ``"litert"`` for ``.tflite`` (falls back to
            tflite-runtime when ai-edge-litert is missing); or ``"tflite-runtime"``
            to use only that package.
        options: threads and execution providers.
        precision_hint: the model's precision as declared by its bundle (one of
            :data:`PRECISIONS`). Used by onnxruntime sessions, which cannot inspect
            their graph; LiteRT sessions read the precision from the model itself.

    Returns:
        An open :class:`InferenceSession`; close it, or use it as a context manager.

    Raises:
        ConfigError: unknown runtime name, unknown precision, ``model`` neither a
            path nor bytes, or an execution provider that is not available (the
            message lists those that are).
        RuntimeUnavailableError: the runtime's package is not installed; the
            message names the pip package to install.
        ModelLoadError: the file is missing, the bytes are empty, or the runtime
            refuses the model (corrupt, truncated, unsupported ops); the message
            names the file.
    """
    if precision_hint is not None and precision_hint not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision_hint!r}; expected one of {', '.join(PRECISIONS)}",
            precision=precision_hint,
        )
    source = ModelSource.of(model)
    if runtime == "onnxruntime":
        from edge_sdk.runtime._onnx import open_onnx

        return open_onnx(source, options, precision_hint)
    if runtime in ("litert", "tflite-runtime"):
        from edge_sdk.runtime._litert import open_litert

        return open_litert(source, options, prefer=runtime)
    raise ConfigError(
        f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}",
        runtime=runtime,
    )


def open_sparse_session(
    model: ModelLike, weights: Mapping[str, CsrLike], options: SessionOptions = _DEFAULT_OPTIONS
) -> InferenceSession:
    """Load a sparse graph with onnxruntime and bind its CSR weights (sparse execution).

    The graph's weight-sparse layers are ``com.microsoft.SparseToDenseMatMul`` nodes fed
    by ``sparse_tensor`` graph inputs (``host_tools.compress.sparse_pack`` writes such
    graphs); the session binds ``weights`` to those inputs on every run, so callers feed
    only the model's own inputs. See :mod:`edge_sdk.runtime._sparse`.

    Args:
        model: the sparse graph's file or bytes.
        weights: input name -> CSR matrix (``shape``, ``indptr``, ``indices``, ``values``).
        options: threads and providers.

    Returns:
        An open session; its ``inputs()`` leave out the bound weights.

    Raises:
        ConfigError: ``model`` is neither a path nor bytes, or a provider is unavailable.
        RuntimeUnavailableError: onnxruntime is missing or lacks the sparse tensor API.
        ModelLoadError: the graph is refused, or the weights do not match its sparse inputs.
    """
    from edge_sdk.runtime._sparse import open_sparse

    return open_sparse(ModelSource.of(model), weights, options)


def preload(runtime: str) -> None:
    """Import a runtime's package now, so its one-time cost is not charged to the first model.

    The profiler calls this before it reads the "RSS before load", so that the model's
    own memory share excludes the runtime library itself.

    Raises:
        ConfigError: unknown runtime name.
        RuntimeUnavailableError: the package is not installed.
    """
    if runtime not in _PACKAGES:
        raise ConfigError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}", runtime=runtime)
    module, distribution = _PACKAGES[runtime]
    if runtime == "litert" and importlib.util.find_spec(module) is None:
        module, distribution = _PACKAGES["tflite-runtime"]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        install = f"pip install {distribution}"
        if runtime != "onnxruntime":  # the README installs LiteRT through the package's extra
            install = "pip install 'edge-sdk[litert]' (ai-edge-litert), or pip install tflite-runtime"
        raise RuntimeUnavailableError(f"runtime {runtime!r} is not installed: {install}", runtime=runtime) from exc


def available_runtimes() -> dict[str, str]:
    """Which runtimes are installed here, without importing them.

    Returns:
        Runtime name -> installed version (``"unknown"`` when the package has no
        metadata), for each of ``onnxruntime``, ``litert`` and ``tflite-runtime``
        that is importable. Empty when none is.
    """
    found: dict[str, str] = {}
    for name, (module, distribution) in _PACKAGES.items():
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except (ImportError, ValueError):
            continue
        try:
            found[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found


def sample_feeds(specs: list[TensorSpec], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs that match ``specs``, for benchmarks and health checks.

    Dynamic dimensions become 1. Floats are standard normal. 8-bit integers are
    uniform over their whole range; wider integers, which are usually indices (token
    ids, class ids), are uniform in [0, 100) so they stay valid for small tables.
    Booleans are fair coin flips.

    Args:
        specs: the inputs to fill, usually ``session.inputs()``.
        rng: the random generator; pass a seeded one for reproducible feeds.

    Returns:
        One array per spec name.

    Raises:
        ConfigError: a spec has a dtype numpy does not know or cannot be sampled.
    """
    import numpy as np  # not at module level: the agent lists runtimes without loading numpy

    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = tuple(1 if d is None else d for d in spec.shape)
        try:
            dtype = np.dtype(spec.dtype)
        except TypeError as exc:
            raise ConfigError(f"input {spec.name!r} has unknown dtype {spec.dtype!r}", tensor=spec.name) from exc
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            if dtype.itemsize == 1:
                info = np.iinfo(dtype)
                low, high = int(info.min), int(info.max) + 1
            else:
                low, high = 0, 100
            feeds[spec.name] = rng.integers(low, high, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 1, size=shape, endpoint=True).astype(bool)
        else:
            raise ConfigError(f"cannot sample input {spec.name!r} of dtype {spec.dtype!r}", tensor=spec.name)
    return feeds
