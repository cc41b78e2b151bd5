"""The one place in ``host_tools.compress`` that opens onnxruntime sessions.

Evaluation, the pass manager's checks and the ONNX exporters all run models through
:func:`open_session` and :func:`run_batched`, so that thread counts, providers and the
mapping of onnxruntime's exceptions to :class:`~edge_sdk.errors.ModelLoadError` live in
one module. When ``edge_sdk.runtime`` grows its ``InferenceSession`` protocol, this module
is the seam to swap.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk.errors import ModelError, ModelLoadError

if TYPE_CHECKING:
    import onnxruntime

__all__ = ["open_session", "run_batched", "input_dtype"]

logger = logging.getLogger(__name__)

_ORT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def open_session(model_bytes: bytes, *, threads: int = 1) -> onnxruntime.InferenceSession:
    """Load serialized ONNX bytes into a CPU onnxruntime session.

    Args:
        model_bytes: a serialized ``ModelProto``.
        threads: intra-op threads; 1 gives stable latency numbers on a shared host.

    Returns:
        A ready ``onnxruntime.InferenceSession`` on the CPU provider.

    Raises:
        ModelLoadError: onnxruntime refused the model.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only; we raise them ourselves
    try:
        return ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exceptions (Fail, InvalidGraph, ...)
        raise ModelLoadError(f"onnxruntime could not load the model: {exc}") from exc


def input_dtype(session: onnxruntime.InferenceSession) -> Any:
    """The numpy dtype of the session's first input (float32 when unknown)."""
    return _ORT_TYPES.get(session.get_inputs()[0].type, np.float32)


def run_batched(session: onnxruntime.InferenceSession, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Run the first output of a single-input model over ``x`` in batches.

    A model whose batch dimension is fixed (say 1) gets batches of exactly that size; the
    last one is zero-padded and the padding cut from the result.

    Args:
        session: a session from :func:`open_session`.
        x: inputs, first axis is the sample axis.
        batch_size: samples per run when the model's batch dimension is dynamic.

    Returns:
        The first output for every sample, concatenated along axis 0.

    Raises:
        ModelError: the model failed while running on these inputs.
    """
    model_input = session.get_inputs()[0]
    fixed = model_input.shape[0] if model_input.shape else None
    step = fixed if isinstance(fixed, int) and fixed > 0 else max(1, batch_size)
    x = np.ascontiguousarray(x, dtype=input_dtype(session))
    outputs = []
    for start in range(0, len(x), step):
        chunk = x[start : start + step]
        real = len(chunk)
        if isinstance(fixed, int) and real < step:
            pad = np.zeros((step - real, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        try:
            out = session.run(None, {model_input.name: chunk})[0]
        except Exception as exc:  # onnxruntime's untyped runtime failures
            raise ModelError(
                f"model failed on input {model_input.name!r} with shape {list(chunk.shape)}: {exc}",
                input=model_input.name,
                shape=list(chunk.shape),
            ) from exc
        outputs.append(np.asarray(out)[:real])
    return np.concatenate(outputs) if outputs else np.empty((0,))
