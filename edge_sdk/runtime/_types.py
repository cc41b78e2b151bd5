"""Runtime-neutral types: tensor specs, session options and the session protocol.

Nothing here imports a runtime; backends convert their own descriptions into these
types at the edge so callers never see an onnxruntime or LiteRT object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from edge_sdk.errors import ConfigError, ModelError, ModelLoadError
from edge_sdk.untrusted_json import is_int

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "IN_MEMORY_MODEL",
    "PRECISIONS",
    "InferenceSession",
    "ModelLike",
    "ModelSource",
    "SessionOptions",
    "TensorSpec",
    "precision_from_dtypes",
]

#: Precision labels a session may report.
PRECISIONS = ("fp32", "fp16", "int8", "int16", "fp64")

#: How messages name a model that was given as bytes rather than a file.
IN_MEMORY_MODEL = "<in-memory model>"

ModelLike = Path | str | bytes | bytearray | memoryview
"""A model file's path, or the serialized model itself."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a file, or serialized bytes in memory.

    Backends load from whichever is set and use :attr:`name` and :attr:`label` in
    their messages, so an in-memory model is named ``<in-memory model>``.

    Args:
        path: the model file, or ``None`` for an in-memory model.
        data: the serialized model, or ``None`` for a file.
    """

    path: Path | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ConfigError("a model source is either a path or bytes, not both or neither")

    @classmethod
    def of(cls, model: ModelLike) -> ModelSource:
        """A source for a path (``Path`` or ``str``) or bytes-like serialized model.

        Raises:
            ConfigError: ``model`` is neither.
        """
        if isinstance(model, (bytes, bytearray, memoryview)):
            return cls(data=bytes(model))
        if isinstance(model, (Path, str)):
            return cls(path=Path(model))
        raise ConfigError(f"a model is a path or bytes, got {type(model).__name__}")

    @property
    def name(self) -> str:
        """Short name for messages: the file name, or ``<in-memory model>``."""
        return self.path.name if self.path is not None else IN_MEMORY_MODEL

    @property
    def label(self) -> str:
        """Full name for messages and error details: the path, or ``<in-memory model>``."""
        return str(self.path) if self.path is not None else IN_MEMORY_MODEL

    def check_present(self) -> None:
        """Refuse a missing file or empty bytes before a runtime sees them.

        Raises:
            ModelLoadError: the file does not exist, or the bytes are empty.
        """
        if self.path is not None and not self.path.is_file():
            raise ModelLoadError(f"model file {self.path} does not exist", model=self.label)
        if self.data is not None and not self.data:
            raise ModelLoadError(f"{self.label} is empty", model=self.label)


def check_feed_names(name: str, label: str, expected: Iterable[str], feeds: Mapping[str, object]) -> None:
    """Refuse feeds that do not name exactly the model's inputs.

    Raises:
        ModelError: an input is missing or a feed is unknown (both listed).
    """
    wanted = set(expected)
    missing, unknown = sorted(wanted - feeds.keys()), sorted(feeds.keys() - wanted)
    if missing or unknown:
        raise ModelError(
            f"feeds for {name} do not match its inputs: missing {missing}, unknown {unknown}",
            model=label,
            missing=missing,
            unknown=unknown,
        )


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and element type of one model input or output.

    Args:
        name: the tensor's name in the model.
        shape: one entry per dimension; ``None`` for a dynamic dimension.
        dtype: numpy dtype name, e.g. ``"float32"`` or ``"int8"``.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.shape, tuple):
            object.__setattr__(self, "shape", tuple(self.shape))
        for dim in self.shape:
            if dim is not None and (not is_int(dim) or dim < 0):
                raise ConfigError(
                    f"tensor {self.name!r}: dimension {dim!r} is not a non-negative int or None",
                    tensor=self.name,
                )

    @property
    def is_dynamic(self) -> bool:
        """Whether any dimension is unknown until run time."""
        return any(dim is None for dim in self.shape)

    def to_dict(self) -> dict[str, object]:
        """Plain-JSON form; dynamic dimensions are ``null``."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class SessionOptions:
    """How to open an inference session.

    Args:
        threads: intra-op threads the runtime may use; at least 1.
        providers: onnxruntime execution providers in order of preference, or
            ``None`` for the best available (TensorRT, CUDA, then CPU). The CPU
            provider is always kept last as the fallback. LiteRT runs on the CPU
            and accepts only ``None`` or ``("cpu",)``.

    Raises:
        ConfigError: ``threads`` is below 1 or ``providers`` is not a tuple of strings.
    """

    threads: int = 1
    providers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not is_int(self.threads) or self.threads < 1:
            raise ConfigError(f"threads must be an int >= 1, got {self.threads!r}", threads=repr(self.threads))
        if self.providers is not None:
            providers: object = self.providers  # callers without a type checker pass lists, or a bare string
            if (
                not isinstance(providers, Iterable)
                or isinstance(providers, str)
                or not all(isinstance(p, str) for p in providers)
            ):
                raise ConfigError(f"providers must be a tuple of provider names, got {self.providers!r}")
            object.__setattr__(self, "providers", tuple(self.providers))


@runtime_checkable
class InferenceSession(Protocol):
    """A loaded model that can be run; what every backend gives back.

    Attributes:
        runtime: which runtime runs it: ``"onnxruntime"``, ``"litert"`` or ``"tflite-runtime"``.
        providers: the execution providers (onnxruntime) or ``("cpu",)`` (LiteRT) in use.
        threads: intra-op threads the runtime was given.
        precision: the numeric precision the model runs at (see :data:`PRECISIONS`).

    Sessions are context managers: ``with open_session(...) as s:`` closes on exit.
    """

    runtime: str
    providers: tuple[str, ...]
    threads: int
    precision: str

    def inputs(self) -> list[TensorSpec]:
        """The model's inputs, in the order the model declares them."""
        ...

    def outputs(self) -> list[TensorSpec]:
        """The model's outputs, in the order :meth:`run` returns them."""
        ...

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model once.

        Args:
            feeds: one array per input name.

        Returns:
            One array per output, in :meth:`outputs` order.

        Raises:
            ModelError: a feed is missing or unknown, the session is closed, or the
                runtime failed.
        """
        ...

    def close(self) -> None:
        """Release the runtime's resources; later :meth:`run` calls fail."""
        ...

    def __enter__(self) -> InferenceSession: ...

    def __exit__(self, *exc_info: object) -> None: ...


def precision_from_dtypes(dtypes: list[str]) -> str:
    """Best guess of a model's precision from its tensors' element types.

    Integer-quantized tensors win over half floats, which win over single floats.

    Args:
        dtypes: numpy dtype names of the tensors to consider.

    Returns:
        One of :data:`PRECISIONS`; ``"fp32"`` when nothing more specific is found.
    """
    names = set(dtypes)
    if names & {"int8", "uint8"}:
        return "int8"
    if "int16" in names:
        return "int16"
    if "float16" in names or "bfloat16" in names:
        return "fp16"
    if "float32" in names:
        return "fp32"
    if "float64" in names:
        return "fp64"
    return "fp32"
