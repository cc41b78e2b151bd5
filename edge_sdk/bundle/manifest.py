"""The bundle manifest: what a bundle contains, in one canonically encoded, signed document.

The signature covers the exact manifest bytes, so parsing is defined on bytes and the
canonical encoding (sorted keys, no whitespace, UTF-8) is what :meth:`Manifest.to_bytes`
produces. Unknown top-level fields from a newer packer are kept in ``extra`` and never
acted on.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_sdk.errors import ManifestError

__all__ = [
    "MANIFEST_SCHEMA",
    "RUNTIMES",
    "FileEntry",
    "TensorInfo",
    "Manifest",
    "canonical_json",
    "check_member_path",
]

MANIFEST_SCHEMA = 1
RUNTIMES = ("onnxruntime", "litert")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_PATH = 255
_MAX_FILES = 64


def canonical_json(obj: Any) -> bytes:
    """The one encoding signed bytes use: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def check_member_path(path: str) -> str:
    """Accept only relative POSIX paths without ``..``, empty parts or odd characters.

    Raises:
        ManifestError: the path could escape the bundle directory or is malformed.
    """
    if not isinstance(path, str) or not path or len(path) > _MAX_PATH:
        raise ManifestError(f"bad file path {path!r}")
    if "\\" in path or "\x00" in path or path.startswith("/") or ":" in path:
        raise ManifestError(f"file path {path!r} must be relative POSIX")
    # Split by hand: PurePosixPath("a/./b").parts drops the "." and would let it through.
    if any(p in ("", ".", "..") for p in path.split("/")):
        raise ManifestError(f"file path {path!r} contains '.', '..' or empty parts")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise ManifestError(f"file path {path!r} contains control characters")
    return path


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


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
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ManifestError(f"file {self.path!r}: size must be a non-negative integer")
        if not isinstance(self.sha256, str) or not _SHA256_RE.fullmatch(self.sha256):
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
        if not isinstance(self.name, str) or not self.name:
            raise ManifestError("input name must be a non-empty string")
        for dim in self.shape:
            if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 0):
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
    schema: int = MANIFEST_SCHEMA
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schema != MANIFEST_SCHEMA:
            raise ManifestError(f"unsupported manifest schema {self.schema!r} (this build reads {MANIFEST_SCHEMA})")
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ManifestError(f"bad bundle name {self.name!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
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
        return d

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError("manifest must be a JSON object")
        known = {
            "schema", "name", "version", "created_at", "expires_at", "runtime", "model",
            "precision", "files", "inputs", "sample_input",
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
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int) -> Manifest:
        """Parse manifest bytes, refusing anything above ``max_bytes`` before decoding.

        Raises:
            ManifestError: too large, not UTF-8 JSON, or invalid content.
        """
        if len(data) > max_bytes:
            raise ManifestError(f"manifest is {len(data)} bytes (limit {max_bytes})")
        try:
            body = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ManifestError("manifest is not valid UTF-8 JSON") from exc
        return cls.from_dict(body)
