"""Sparse execution inside onnxruntime: CSR weights bound to ``SparseToDenseMatMul`` nodes.

onnxruntime turns a graph's ``sparse_initializer`` entries into dense tensors when it
loads the model, so a pruned model stored that way is only smaller on disk. Its CPU
execution provider does carry a sparse kernel, ``com.microsoft.SparseToDenseMatMul``
(sparse ``A`` times dense ``B``, CSR or COO), but only for a ``sparse_tensor`` *graph
input*. So the sparse graph a bundle carries declares each pruned weight as such an
input (``y = x @ W`` becomes ``Transpose(SparseToDenseMatMul(W^T, x, transB=1))``), and
this session binds the weight, built once from the bundle's CSR arrays, on every run.
The whole network stays one graph run by onnxruntime; callers see only the model's real
inputs.

Only this module and :mod:`edge_sdk.runtime._onnx` import onnxruntime.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from edge_sdk.errors import ModelError, ModelLoadError, RuntimeUnavailableError
from edge_sdk.runtime._onnx import OnnxSession, open_onnx
from edge_sdk.runtime._types import ModelSource, SessionOptions, TensorSpec, check_feed_names

__all__ = ["CsrLike", "SparseSession", "open_sparse"]

logger = logging.getLogger(__name__)

_SPARSE_TYPE = "sparse_tensor"


class CsrLike(Protocol):
    """What a sparse weight must provide (:class:`edge_sdk.bundle.sparse.CsrMatrix` does).

    Read-only: a session only reads a weight, so frozen dataclasses qualify.
    """

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)``."""
        ...

    @property
    def indptr(self) -> np.ndarray:
        """``rows + 1`` offsets into :attr:`indices` and :attr:`values`."""
        ...

    @property
    def indices(self) -> np.ndarray:
        """Column of each stored value."""
        ...

    @property
    def values(self) -> np.ndarray:
        """The stored values."""
        ...


class SparseSession:
    """An :class:`~edge_sdk.runtime.InferenceSession` whose sparse weights are bound inputs.

    Built by :func:`open_sparse`; ``inputs()`` lists only the model's real inputs.
    """

    runtime = "onnxruntime"

    def __init__(self, inner: OnnxSession, source: ModelSource, bound: dict[str, Any], keep: list[np.ndarray]) -> None:
        self._inner: OnnxSession | None = inner
        self._source = source
        self._bound = bound
        self._keep = keep  # the OrtValues reference these arrays' memory
        self.providers = inner.providers
        self.threads = inner.threads
        self.precision = inner.precision
        self._inputs = [s for s in inner.inputs() if not s.dtype.startswith(_SPARSE_TYPE)]
        self._names = frozenset(s.name for s in self._inputs)

    @property
    def sparse_inputs(self) -> list[str]:
        """Names of the graph inputs bound to sparse weights."""
        return sorted(self._bound)

    def inputs(self) -> list[TensorSpec]:
        """The model's own inputs (the bound sparse weights are not among them)."""
        return list(self._inputs)

    def outputs(self) -> list[TensorSpec]:
        """The model's outputs, in the order :meth:`run` returns them."""
        if self._inner is None:
            raise ModelError("sparse session is closed")
        return self._inner.outputs()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model once with the sparse weights bound.

        Raises:
            ModelError: closed, feeds that do not match :meth:`inputs`, or a runtime failure.
        """
        if self._inner is None:
            raise ModelError("sparse session is closed")
        if feeds.keys() != self._names:
            check_feed_names(self._source.name, self._source.label, self._names, feeds)
        return self._inner.run({**feeds, **self._bound})

    def close(self) -> None:
        """Drop the session and the bound weights."""
        if self._inner is not None:
            self._inner.close()
        self._inner = None
        self._bound = {}
        self._keep = []

    def __enter__(self) -> SparseSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_sparse(source: ModelSource, weights: Mapping[str, CsrLike], options: SessionOptions) -> SparseSession:
    """Load a sparse graph and bind its sparse weight inputs.

    Args:
        source: the sparse graph (``SparseToDenseMatMul`` nodes fed by ``sparse_tensor`` inputs).
        weights: one CSR matrix per sparse input, by input name.
        options: threads and providers (the sparse kernel runs on the CPU provider).

    Returns:
        The open session.

    Raises:
        RuntimeUnavailableError: onnxruntime is missing or too old for sparse tensors.
        ModelLoadError: onnxruntime refuses the graph (a build without the contrib ops),
            or the weights do not match its sparse inputs (names or shapes).
    """
    inner = open_onnx(source, options, "fp32")
    import onnxruntime as ort  # open_onnx has imported it, or raised

    if not hasattr(ort, "SparseTensor") or not hasattr(ort.OrtValue, "ort_value_from_sparse_tensor"):
        raise RuntimeUnavailableError(
            f"onnxruntime {ort.__version__} has no sparse tensor API; sparse execution needs onnxruntime >= 1.9",
            runtime="onnxruntime",
        )
    wanted = {s.name: s for s in inner.inputs() if s.dtype.startswith(_SPARSE_TYPE)}
    if set(wanted) != set(weights):
        raise ModelLoadError(
            f"sparse inputs of {source.name} ({sorted(wanted)}) do not match the weights given ({sorted(weights)})",
            model=source.label,
        )
    device = ort.OrtDevice.make("cpu", 0)
    bound: dict[str, Any] = {}
    keep: list[np.ndarray] = []
    for name, m in weights.items():
        spec = wanted[name]
        if (spec.shape and len(spec.shape) != 2) or any(
            d is not None and d != got for d, got in zip(spec.shape, m.shape, strict=False)
        ):
            raise ModelLoadError(
                f"sparse input {name!r} of {source.name} is {list(spec.shape)}, the weight is {list(m.shape)}",
                model=source.label,
            )
        values = np.ascontiguousarray(m.values, dtype=np.float32)
        indices = np.ascontiguousarray(m.indices, dtype=np.int64)
        indptr = np.ascontiguousarray(m.indptr, dtype=np.int64)
        keep += [values, indices, indptr]
        try:
            tensor = ort.SparseTensor.sparse_csr_from_numpy(list(m.shape), values, indices, indptr, device)
            bound[name] = ort.OrtValue.ort_value_from_sparse_tensor(tensor)
        except Exception as exc:  # pybind errors
            raise ModelLoadError(f"onnxruntime refused sparse weight {name!r}: {exc}", model=source.label) from exc
    logger.debug("opened sparse %s with %d bound sparse weight(s)", source.name, len(bound))
    return SparseSession(inner, source, bound, keep)
