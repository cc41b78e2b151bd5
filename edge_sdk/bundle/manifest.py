"""The bundle manifest: what a bundle contains, in one canonically encoded, signed document.

The signature covers the exact manifest bytes, so parsing is defined on bytes and the
canonical encoding (sorted keys, no whitespace, UTF-8) is what :meth:`Manifest.to_bytes`
produces. Unknown top-level fields from a newer packer are kept in ``extra`` and never
acted on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_sdk.bundle.encryption import Encryption
from edge_sdk.errors import JsonError, ManifestError, TargetMismatchError
from edge_sdk.trust import canonical_json
from edge_sdk.untrusted_json import DEFAULT_MAX_DEPTH, JsonLimits, is_int, is_number, is_text, parse_json_object

__all__ = [
    "ENCRYPTED_MANIFEST_SCHEMA",
    "EXECUTIONS",
    "MANIFEST_SCHEMA",
    "MAX_MANIFEST_DEPTH",
    "RUNTIMES",
    "DeviceFacts",
    "FileEntry",
    "HealthSpec",
    "Manifest",
    "SparseLayer",
    "SparseSpec",
    "Target",
    "TensorInfo",
    "canonical_json",
    "check_member_path",
]

MANIFEST_SCHEMA = 1
#: Schema of a manifest whose payload is encrypted: an agent that cannot decrypt refuses
#: it as an unknown schema instead of installing ciphertext.
ENCRYPTED_MANIFEST_SCHEMA = 2
#: Deepest JSON nesting a manifest may have (a sparse layer's shape list sits at depth 6).
MAX_MANIFEST_DEPTH = DEFAULT_MAX_DEPTH
RUNTIMES = ("onnxruntime", "litert")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_PATH = 255
_MAX_FILES = 64
_MAX_SPARSE_LAYERS = 256
#: How a bundle may be run: ``auto`` lets the device measure and choose.
EXECUTIONS = ("auto", "dense", "dense_int8", "sparse")


def check_member_path(path: object) -> str:
    """Accept only relative POSIX paths without ``..``, empty parts or odd characters.

    Args:
        path: the path as the manifest or archive gives it (any value: it is checked).

    Returns:
        ``path``, once it is known to be a safe member path.

    Raises:
        ManifestError: the path could escape the bundle directory or is malformed.
    """
    if not is_text(path, max_len=_MAX_PATH):
        raise ManifestError(f"bad file path {path!r}")
    if "\\" in path or "\x00" in path or path.startswith("/") or ":" in path:
        raise ManifestError(f"file path {path!r} must be relative POSIX")
    # Split by hand: PurePosixPath("a/./b").parts drops the "." and would let it through.
    if any(p in ("", ".", "..") for p in path.split("/")):
        raise ManifestError(f"file path {path!r} contains '.', '..' or empty parts")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise ManifestError(f"file path {path!r} contains control characters")
    return path


def _require(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        raise ManifestError(f"{where}: field {key!r} has the wrong type")
    return value


@dataclass(frozen=True)
class FileEntry:
    """One file in the bundle payload with its declared size and sha256."""

    path: str
    size: int
    sha256: str

    def __post_init__(self) -> None:
        check_member_path(self.path)
        if not is_int(self.size) or self.size < 0:
            raise ManifestError(f"file {self.path!r}: size must be a non-negative integer")
        if not is_text(self.sha256, pattern=_SHA256_RE):
            raise ManifestError(f"file {self.path!r}: sha256 must be 64 lowercase hex digits")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Any) -> FileEntry:
        if not isinstance(d, dict):
            raise ManifestError("files: each entry must be an object")
        return cls(
            path=_require(d, "path", str, "file"),
            size=_require(d, "size", int, "file"),
            sha256=_require(d, "sha256", str, "file"),
        )


@dataclass(frozen=True)
class TensorInfo:
    """A model input as the packer saw it; dynamic dimensions are ``None``."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not is_text(self.name):
            raise ManifestError("input name must be a non-empty string")
        for dim in self.shape:
            if dim is not None and (not is_int(dim) or dim < 0):
                raise ManifestError(f"input {self.name!r}: bad dimension {dim!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Any) -> TensorInfo:
        if not isinstance(d, dict):
            raise ManifestError("inputs: each entry must be an object")
        shape = _require(d, "shape", list, "input")
        return cls(_require(d, "name", str, "input"), tuple(shape), _require(d, "dtype", str, "input"))


@dataclass(frozen=True)
class HealthSpec:
    """What the device's health check demands of the model beyond running and finite outputs.

    Attributes:
        max_latency_ms: median latency budget of the health check's timed runs on the
            sample input; a slower model is rolled back. ``None``: no budget.
    """

    max_latency_ms: float | None = None

    def __post_init__(self) -> None:
        v = self.max_latency_ms
        if v is not None and (not is_number(v) or not math.isfinite(v) or v <= 0):
            raise ManifestError(f"health: max_latency_ms must be a positive number, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return {} if self.max_latency_ms is None else {"max_latency_ms": float(self.max_latency_ms)}

    @classmethod
    def from_dict(cls, d: Any) -> HealthSpec:
        if not isinstance(d, dict):
            raise ManifestError("manifest: field 'health' must be an object")
        if set(d) - {"max_latency_ms"}:
            raise ManifestError(f"health: unknown field(s) {', '.join(sorted(set(d) - {'max_latency_ms'}))}")
        value = d.get("max_latency_ms")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ManifestError("health: field 'max_latency_ms' has the wrong type")
        return cls(None if value is None else float(value))


@dataclass(frozen=True)
class DeviceFacts:
    """What a device is, as far as a bundle's :class:`Target` cares.

    Attributes:
        arch: machine architecture (``aarch64``, ``x86_64``, ``armv7l``...).
        memory_bytes: total RAM.
        accelerators: what the device can run models on besides the CPU
            (``cuda``, ``tensorrt``, ``npu``...).
    """

    arch: str
    memory_bytes: int
    accelerators: frozenset[str] = frozenset()


_ACCEL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")


@dataclass(frozen=True)
class Target:
    """Which devices a bundle is for; empty fields mean "any".

    Attributes:
        arch: architectures the model runs on (one must match the device's).
        min_memory_bytes: RAM the device must have at least.
        accelerators: accelerators the device must all have.
    """

    arch: tuple[str, ...] = ()
    min_memory_bytes: int = 0
    accelerators: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for value in (*self.arch, *self.accelerators):
            if not is_text(value, pattern=_ACCEL_RE):
                raise ManifestError(f"target: bad architecture or accelerator name {value!r}")
        m = self.min_memory_bytes
        if not is_int(m) or m < 0:
            raise ManifestError("target: min_memory_bytes must be a non-negative integer")

    def check(self, device: DeviceFacts) -> str:
        """Explain why ``device`` fits, or raise.

        Raises:
            TargetMismatchError: wrong architecture, too little memory, or a missing accelerator.
        """
        if self.arch and device.arch not in self.arch:
            raise TargetMismatchError(
                f"bundle is built for {', '.join(self.arch)}; this device is {device.arch}",
                constraint="arch",
                required=list(self.arch),
                actual=device.arch,
            )
        if device.memory_bytes < self.min_memory_bytes:
            raise TargetMismatchError(
                f"bundle needs {self.min_memory_bytes} bytes of memory; this device has {device.memory_bytes}",
                constraint="min_memory_bytes",
                required=self.min_memory_bytes,
                actual=device.memory_bytes,
            )
        missing = sorted(set(self.accelerators) - set(device.accelerators))
        if missing:
            raise TargetMismatchError(
                f"bundle needs accelerator(s) {', '.join(missing)}; this device has "
                f"{', '.join(sorted(device.accelerators)) or 'none'}",
                constraint="accelerators",
                required=list(self.accelerators),
                actual=sorted(device.accelerators),
            )
        return (
            f"{device.arch} in {', '.join(self.arch) or 'any arch'}, "
            f"{device.memory_bytes} >= {self.min_memory_bytes} bytes, "
            f"accelerators {', '.join(self.accelerators) or 'none needed'}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": list(self.arch),
            "min_memory_bytes": self.min_memory_bytes,
            "accelerators": list(self.accelerators),
        }

    @classmethod
    def from_dict(cls, d: Any) -> Target:
        if not isinstance(d, dict):
            raise ManifestError("manifest: field 'target' must be an object")
        if set(d) - {"arch", "min_memory_bytes", "accelerators"}:
            raise ManifestError("target: unknown field(s)")
        arch, accel = d.get("arch", []), d.get("accelerators", [])
        if not isinstance(arch, list) or not isinstance(accel, list) or len(arch) > 16 or len(accel) > 16:
            raise ManifestError("target: arch and accelerators must be lists of at most 16 names")
        return cls(tuple(arch), d.get("min_memory_bytes", 0), tuple(accel))


@dataclass(frozen=True)
class SparseLayer:
    """One weight-sparse layer of the model.

    Attributes:
        name: the node's name in the model (for reports).
        tensor: the weight's name: a sparse graph input of the model, a float
            initializer of the dense model, and the matrix's name in the weights file.
        shape: ``[rows, cols]`` of the stored matrix.
        nnz: stored values.
        transposed: the stored matrix is the transpose of the dense initializer.
    """

    name: str
    tensor: str
    shape: tuple[int, int]
    nnz: int
    transposed: bool = False

    def __post_init__(self) -> None:
        for value in (self.name, self.tensor):
            if not is_text(value, max_len=256):
                raise ManifestError(f"sparse: bad layer or tensor name {value!r}")
        shape = tuple(self.shape)
        if len(shape) != 2 or any(not is_int(d) or d < 1 for d in shape):
            raise ManifestError(f"sparse: layer {self.name!r} has a bad shape {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        if not is_int(self.nnz) or not 0 <= self.nnz <= shape[0] * shape[1]:
            raise ManifestError(f"sparse: layer {self.name!r} has a bad nnz {self.nnz!r}")
        if not isinstance(self.transposed, bool):
            raise ManifestError(f"sparse: layer {self.name!r}: transposed must be a boolean")

    @property
    def sparsity(self) -> float:
        """Fraction of the matrix that is zero."""
        return 1.0 - self.nnz / (self.shape[0] * self.shape[1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tensor": self.tensor,
            "shape": list(self.shape),
            "nnz": self.nnz,
            "transposed": self.transposed,
        }

    @classmethod
    def from_dict(cls, d: Any) -> SparseLayer:
        if not isinstance(d, dict):
            raise ManifestError("sparse: each layer must be an object")
        shape = _require(d, "shape", list, "sparse layer")
        return cls(
            _require(d, "name", str, "sparse layer"),
            _require(d, "tensor", str, "sparse layer"),
            tuple(shape),
            _require(d, "nnz", int, "sparse layer"),
            d.get("transposed", False),
        )


@dataclass(frozen=True)
class SparseSpec:
    """How the model's weight-sparse layers travel and can run (the manifest's ``sparse``).

    The bundle's ``model`` is the sparse graph: each sparse layer is an onnxruntime
    ``com.microsoft.SparseToDenseMatMul`` node whose weight is a sparse graph input,
    bound from ``weights`` at load. ``dense_model`` is the same network with ordinary
    ``MatMul``/``Gemm`` nodes and those weights left out; the device fills them in, in
    memory only, when it runs or measures the dense execution.

    Attributes:
        format: ``"csr"`` (see :mod:`edge_sdk.bundle.sparse`).
        weights: path (one of the manifest's files) of the sparse weights file.
        dense_model: path (one of the files) of the dense graph without the sparse weights.
        values: ``"fp32"`` or ``"int8"``: how the values are stored.
        layers: the sparse layers.
    """

    weights: str
    dense_model: str
    layers: tuple[SparseLayer, ...]
    format: str = "csr"
    values: str = "fp32"

    def __post_init__(self) -> None:
        if self.format != "csr":
            raise ManifestError(f"sparse: unknown format {self.format!r} (this build reads 'csr')")
        if self.values not in ("fp32", "int8"):
            raise ManifestError(f"sparse: values must be 'fp32' or 'int8', got {self.values!r}")
        check_member_path(self.weights)
        check_member_path(self.dense_model)
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers or len(self.layers) > _MAX_SPARSE_LAYERS:
            raise ManifestError(f"sparse: between 1 and {_MAX_SPARSE_LAYERS} layers, got {len(self.layers)}")
        if len({layer.tensor for layer in self.layers}) != len(self.layers):
            raise ManifestError("sparse: a tensor is listed twice")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "weights": self.weights,
            "dense_model": self.dense_model,
            "values": self.values,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Any) -> SparseSpec:
        if not isinstance(d, dict):
            raise ManifestError("manifest: field 'sparse' must be an object")
        if unknown := set(d) - {"format", "weights", "dense_model", "values", "layers"}:
            raise ManifestError(f"sparse: unknown field(s) {', '.join(sorted(unknown))}")
        layers = _require(d, "layers", list, "sparse")
        if len(layers) > _MAX_SPARSE_LAYERS:
            raise ManifestError(f"sparse: {len(layers)} layers (limit {_MAX_SPARSE_LAYERS})")
        fmt, values = d.get("format", "csr"), d.get("values", "fp32")
        if not isinstance(fmt, str) or not isinstance(values, str):
            raise ManifestError("sparse: format and values must be strings")
        return cls(
            weights=_require(d, "weights", str, "sparse"),
            dense_model=_require(d, "dense_model", str, "sparse"),
            layers=tuple(SparseLayer.from_dict(layer) for layer in layers),
            format=fmt,
            values=values,
        )


@dataclass(frozen=True)
class Manifest:
    """What a bundle is and holds.

    Attributes:
        name: bundle name, stable across versions (``[a-z0-9][a-z0-9._-]*``).
        version: positive integer, monotonic per name.
        created_at, expires_at: unix seconds; devices refuse a manifest after expiry.
        runtime: ``onnxruntime`` or ``litert``.
        model: path of the model file (one of ``files``).
        precision: what the model computes in (``fp32``, ``int8``, ...), for reports.
        files: every payload file, with size and sha256.
        inputs: model inputs, for benchmarks and health checks.
        sample_input: optional path (one of ``files``) of an ``.npz`` sample for the health check.
        health: optional health-check budget (latency); absent from the encoding when ``None``.
        target: which devices the bundle is for; absent (any device) when ``None``.
        sparse: the model's weight-sparse layers and their files; absent when ``None``.
        execution: how the device must run the model (:data:`EXECUTIONS`); ``None``
            (absent) or ``"auto"``: the device measures the ways that apply and picks.
        encryption: how the payload is encrypted and for whom
            (:class:`~edge_sdk.bundle.encryption.Encryption`); ``files`` then lists the
            ciphertext's sizes and hashes. Absent for a plain bundle.
        extra: unknown fields from a newer packer, kept, never acted on.
    """

    name: str
    version: int
    created_at: float
    expires_at: float
    runtime: str
    model: str
    files: tuple[FileEntry, ...]
    precision: str = "fp32"
    inputs: tuple[TensorInfo, ...] = ()
    sample_input: str | None = None
    health: HealthSpec | None = None
    target: Target | None = None
    sparse: SparseSpec | None = None
    execution: str | None = None
    encryption: Encryption | None = None
    schema: int = MANIFEST_SCHEMA
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schema not in (MANIFEST_SCHEMA, ENCRYPTED_MANIFEST_SCHEMA):
            raise ManifestError(
                f"unsupported manifest schema {self.schema!r} "
                f"(this build reads {MANIFEST_SCHEMA}, and {ENCRYPTED_MANIFEST_SCHEMA} for encrypted bundles)"
            )
        if (self.schema == ENCRYPTED_MANIFEST_SCHEMA) != (self.encryption is not None):
            raise ManifestError(
                f"manifest schema {ENCRYPTED_MANIFEST_SCHEMA} is for encrypted bundles, and only they use it"
            )
        if not is_text(self.name, pattern=_NAME_RE):
            raise ManifestError(f"bad bundle name {self.name!r}")
        if not is_int(self.version) or self.version < 1:
            raise ManifestError(f"version must be a positive integer, got {self.version!r}")
        if self.runtime not in RUNTIMES:
            raise ManifestError(f"unknown runtime {self.runtime!r}; expected one of {', '.join(RUNTIMES)}")
        if not (math.isfinite(self.created_at) and math.isfinite(self.expires_at)):
            raise ManifestError("created_at and expires_at must be finite numbers")
        if not self.expires_at > self.created_at:
            raise ManifestError("expires_at must be after created_at")
        if not self.files:
            raise ManifestError("manifest lists no files")
        if len(self.files) > _MAX_FILES:
            raise ManifestError(f"manifest lists {len(self.files)} files (limit {_MAX_FILES})")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ManifestError("manifest lists a file twice")
        dirs = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
        if clash := sorted(dirs.intersection(paths)):
            raise ManifestError(f"manifest lists {clash[0]!r} both as a file and as a directory")
        if self.model not in paths:
            raise ManifestError(f"model {self.model!r} is not among the manifest's files")
        if self.sample_input is not None and self.sample_input not in paths:
            raise ManifestError(f"sample input {self.sample_input!r} is not among the manifest's files")
        if self.sparse is not None:
            for path in (self.sparse.weights, self.sparse.dense_model):
                if path not in paths or path == self.model:
                    raise ManifestError(f"sparse: {path!r} is not among the manifest's files, or is the model")
        if self.execution is not None and self.execution not in EXECUTIONS:
            raise ManifestError(f"execution must be one of {', '.join(EXECUTIONS)}, got {self.execution!r}")
        if self.execution in ("sparse", "dense_int8") and self.sparse is None:
            raise ManifestError(f"execution {self.execution!r} needs the manifest's 'sparse' field")
        if self.execution == "dense_int8" and self.sparse is not None and self.sparse.values != "int8":
            raise ManifestError("execution 'dense_int8' needs sparse weights stored as int8 values")
        if self.encryption is not None:
            self.encryption.check_files({f.path: f.size for f in self.files})

    @property
    def payload_size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise ManifestError(f"no file {path!r} in manifest")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            schema=self.schema,
            name=self.name,
            version=self.version,
            created_at=self.created_at,
            expires_at=self.expires_at,
            runtime=self.runtime,
            model=self.model,
            precision=self.precision,
            files=[f.to_dict() for f in self.files],
            inputs=[i.to_dict() for i in self.inputs],
            sample_input=self.sample_input,
        )
        if self.health is not None:
            d["health"] = self.health.to_dict()
        if self.target is not None:
            d["target"] = self.target.to_dict()
        if self.sparse is not None:
            d["sparse"] = self.sparse.to_dict()
        if self.execution is not None:
            d["execution"] = self.execution
        if self.encryption is not None:
            d["encryption"] = self.encryption.to_dict()
        return d

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError("manifest must be a JSON object")
        known = {
            "schema",
            "name",
            "version",
            "created_at",
            "expires_at",
            "runtime",
            "model",
            "precision",
            "files",
            "inputs",
            "sample_input",
            "health",
            "target",
            "sparse",
            "execution",
            "encryption",
        }
        files = _require(d, "files", list, "manifest")
        inputs = d.get("inputs", [])
        if not isinstance(inputs, list):
            raise ManifestError("manifest: field 'inputs' must be a list")
        sample = d.get("sample_input")
        if sample is not None and not isinstance(sample, str):
            raise ManifestError("manifest: field 'sample_input' must be a string")
        precision = d.get("precision", "fp32")
        if not isinstance(precision, str):
            raise ManifestError("manifest: field 'precision' must be a string")
        if len(files) > _MAX_FILES:
            raise ManifestError(f"manifest lists {len(files)} files (limit {_MAX_FILES})")
        execution = d.get("execution")
        if execution is not None and not isinstance(execution, str):
            raise ManifestError("manifest: field 'execution' must be a string")
        return cls(
            schema=_require(d, "schema", int, "manifest"),
            name=_require(d, "name", str, "manifest"),
            version=_require(d, "version", int, "manifest"),
            created_at=float(_require(d, "created_at", (int, float), "manifest")),
            expires_at=float(_require(d, "expires_at", (int, float), "manifest")),
            runtime=_require(d, "runtime", str, "manifest"),
            model=_require(d, "model", str, "manifest"),
            precision=precision,
            files=tuple(FileEntry.from_dict(f) for f in files),
            inputs=tuple(TensorInfo.from_dict(i) for i in inputs),
            sample_input=sample,
            health=HealthSpec.from_dict(d["health"]) if d.get("health") is not None else None,
            target=Target.from_dict(d["target"]) if d.get("target") is not None else None,
            sparse=SparseSpec.from_dict(d["sparse"]) if d.get("sparse") is not None else None,
            execution=execution,
            encryption=Encryption.from_dict(d["encryption"]) if d.get("encryption") is not None else None,
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int, max_depth: int = MAX_MANIFEST_DEPTH) -> Manifest:
        """Parse manifest bytes, refusing anything above ``max_bytes`` before decoding.

        Args:
            data: the manifest exactly as signed.
            max_bytes: largest manifest accepted (checked before decoding).
            max_depth: deepest JSON nesting accepted (see :class:`~edge_sdk.untrusted_json.JsonLimits`).

        Returns:
            The parsed manifest.

        Raises:
            ManifestError: too large, not UTF-8 JSON, NaN or Infinity, too deep, or invalid content.
        """
        try:
            body = parse_json_object(data, JsonLimits(max_bytes, max_depth), what="manifest")
        except JsonError as exc:
            raise ManifestError(exc.message, **exc.details) from exc
        return cls.from_dict(body)
