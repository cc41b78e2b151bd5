"""Reading and writing model files: the I/O shell around the pure passes; and
:func:`build_model`, which gives every model edge-sdk builds the same header.

Passes take and return ``onnx.ModelProto``; only this module touches the disk. Writes
are atomic and durable (temp file in the target directory, fsync, ``os.replace``, fsync
the directory), so an interrupted ``edgectl compress`` never leaves a half-written model
where a good one is expected.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

import onnx

from edge_sdk.durable import atomic_write_bytes
from edge_sdk.errors import ModelLoadError

__all__ = [
    "DEVICE_IR_VERSION",
    "ModelSource",
    "as_model",
    "build_model",
    "load_model",
    "model_from_bytes",
    "save_model_atomic",
]

logger = logging.getLogger(__name__)

ModelSource = Union[onnx.ModelProto, bytes, str, "os.PathLike[str]"]
"""What the compression entry points accept: a model, its bytes, or a path to a file."""

DEVICE_IR_VERSION = 8
"""The ONNX IR version of the models edge-sdk builds: readable by onnxruntime >= 1.14 on devices."""


def build_model(graph: onnx.GraphProto, opset: int, *, doc_string: str = "") -> onnx.ModelProto:
    """A checked model around ``graph``: default-domain ``opset``, :data:`DEVICE_IR_VERSION`.

    Raises:
        onnx.checker.ValidationError: the graph is not a valid model (a bug in its builder).
    """
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", opset)], producer_name="edge-sdk", doc_string=doc_string
    )
    model.ir_version = DEVICE_IR_VERSION
    onnx.checker.check_model(model)
    return model


def model_from_bytes(data: bytes, *, source: str = "<bytes>") -> onnx.ModelProto:
    """Parse and check serialized ONNX bytes.

    Protobuf parsing alone accepts many byte strings that are not models, so the result
    is also run through ``onnx.checker``.

    Args:
        data: the serialized ``ModelProto``.
        source: what to call the bytes in error messages (usually a file name).

    Returns:
        The parsed model.

    Raises:
        ModelLoadError: the bytes are not a valid ONNX model; names ``source``.
    """
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelLoadError(f"{source}: not an ONNX model ({exc})", file=source) from exc
    _check(model, source)
    return model


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load and check an ONNX model file, with any external data beside it.

    Args:
        path: the ``.onnx`` file.

    Returns:
        The parsed and checked model.

    Raises:
        ModelLoadError: the file is missing, unreadable or not a valid ONNX model;
            the message and ``details["file"]`` name the file.
    """
    file = Path(path)
    try:
        model = onnx.load(str(file))
    except OSError as exc:
        raise ModelLoadError(f"{file}: cannot read model file ({exc.strerror or exc})", file=str(file)) from exc
    except Exception as exc:  # protobuf DecodeError, bad external data references
        raise ModelLoadError(f"{file}: not an ONNX model ({exc})", file=str(file)) from exc
    _check(model, str(file))
    logger.debug("loaded model %s (%d nodes)", file, len(model.graph.node))
    return model


def as_model(model: ModelSource) -> onnx.ModelProto:
    """Turn any accepted model source into a checked ``ModelProto``.

    A ``ModelProto`` is returned as it is, unchecked (the caller built it in memory).

    Args:
        model: a ``ModelProto``, serialized bytes, or a path.

    Returns:
        The model.

    Raises:
        ModelLoadError: the bytes or the file do not hold a valid model.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray, memoryview)):
        return model_from_bytes(bytes(model))
    return load_model(model)


def save_model_atomic(model_bytes: bytes, path: str | os.PathLike[str]) -> Path:
    """Write model bytes so that ``path`` holds either the old file or the whole new one.

    Args:
        model_bytes: the serialized model.
        path: the destination file; its directory must exist.

    Returns:
        The destination path.

    Raises:
        StorageError: the directory is missing or the write failed; no temp file and no
            partial destination file are left behind.
    """
    target = Path(path)
    atomic_write_bytes(target, model_bytes)
    logger.info("wrote %s (%d bytes)", target, len(model_bytes))
    return target


def _check(model: onnx.ModelProto, source: str) -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError, or a model > 2 GiB given as a proto
        raise ModelLoadError(f"{source}: invalid ONNX model ({exc})", file=source) from exc
