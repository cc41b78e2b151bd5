"""Bundle deltas: rebuild version N+1's bundle file from the installed slot of version N.

When a device runs version N of a bundle, version N+1 can travel as a *delta*: the bytes
that changed, and for everything else a reference into the payload files the device
already holds in its slot (``manifest.json`` and ``payload/<path>``, as the installer
writes them). :func:`apply_delta` rebuilds the new bundle file byte for byte at a path of
the caller's choosing; the caller then verifies that file with
:func:`~edge_sdk.bundle.verify_bundle` exactly as one that came whole. A delta carries
no trust of its own: it only has to reproduce a file whose size and sha256 the signed
deploy command already names. The host decides what to copy and what to send
(``host_tools.delta``); this module owns the format and the device's side.

File layout, format 1 (``V`` is an unsigned LEB128 varint, ``u8`` one byte)::

    magic    7 bytes  b"EDGEDLT", then the format version, u8 = 1
    header   V length (at most DeltaLimits.max_header_bytes), then the header, a
             canonical JSON object (:class:`DeltaHeader`)
    ops      exactly ``header.ops`` operations; each writes the next bytes of the new file:
        u8 1  COPY  V file index (into ``header.files``), V offset, V length: that range
                    of a payload file of the base slot
        u8 2  DATA  V length, then that many literal bytes
        u8 3  ZERO  V length: that many zero bytes (tar padding, end of archive)
    nothing after the last operation

Every length is positive. What is checked, and who is to blame when a check fails:

- The header is bounded before it is parsed (size, JSON depth, number of operations,
  target size) and names its base (bundle name, version, and the
  :func:`~edge_sdk.bundle.admission.content_digest` of the base manifest's files) and its
  target (size and sha256). A delta for another base than the slot holds, or for an
  encrypted base (its slot holds plaintext while its manifest lists the ciphertext's
  hashes, so nothing could be checked; the host builds no delta for encrypted bundles),
  is refused with :class:`~edge_sdk.errors.DeltaError`.
- Each base file the header names must pass
  :func:`~edge_sdk.bundle.manifest.check_member_path` (relative, no ``..``) and be listed
  in the base manifest, else :class:`~edge_sdk.errors.DeltaError`.
- Before the first byte is copied from a base file, the whole file is hashed and must
  have the size and sha256 the slot's manifest lists, and lie inside the slot. A file
  that does not, or a slot or manifest that is missing or unreadable, is this device's
  own state gone wrong, not the delta's: :class:`~edge_sdk.errors.StorageError`.
- Every COPY stays inside its file; before each operation runs, the output may not grow
  past ``target_size`` (so a hostile delta cannot fill the disk); the operations must end
  at exactly ``target_size`` with nothing left in the delta, and the output must hash to
  ``target_sha256``. Otherwise: :class:`~edge_sdk.errors.DeltaError`.

Either way the caller falls back to the full transfer. The output is written durably
(temp file in the same directory, fsync, rename, fsync the directory) and only once
every check has passed: on any failure nothing new is left at ``out_path``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from edge_sdk.bundle.admission import content_digest
from edge_sdk.bundle.archive import BundleLimits
from edge_sdk.bundle.manifest import MAX_MANIFEST_DEPTH, FileEntry, Manifest, check_member_path
from edge_sdk.durable import atomic_writer
from edge_sdk.errors import ConfigError, DeltaError, JsonError, ManifestError, StorageError
from edge_sdk.protowire import encode_varint
from edge_sdk.trust import canonical_json
from edge_sdk.untrusted_json import JsonLimits, is_int, is_text, parse_json_object

__all__ = [
    "DELTA_SCHEMA",
    "FORMAT_VERSION",
    "MAGIC",
    "CopyOp",
    "DataOp",
    "DeltaHeader",
    "DeltaLimits",
    "DeltaOp",
    "ZeroOp",
    "apply_delta",
    "encode_header",
    "read_delta_header",
    "write_delta",
]

logger = logging.getLogger(__name__)

MAGIC = b"EDGEDLT"
FORMAT_VERSION = 1
#: Schema of the JSON header (a newer one is refused; unknown fields are kept, never acted on).
DELTA_SCHEMA = 1
_COPY, _DATA, _ZERO = 1, 2, 3
_CHUNK = 1 << 20
_MAX_VARINT_BYTES = 10
_HEADER_DEPTH = 8
_MAX_FILES = 64  # a manifest lists at most this many files
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DeltaLimits:
    """Upper bounds applied to a delta before and while it is applied.

    Attributes:
        max_header_bytes: largest JSON header accepted (checked before decoding).
        max_ops: most operations a delta may declare.
        max_target_bytes: largest bundle file a delta may rebuild.
        max_manifest_bytes, max_manifest_depth: bounds on the base slot's ``manifest.json``.

    Raises:
        ConfigError: a bound is not a positive integer.
    """

    max_header_bytes: int = 64 << 10
    max_ops: int = 1 << 20
    max_target_bytes: int = BundleLimits.max_bundle_bytes
    max_manifest_bytes: int = BundleLimits.max_manifest_bytes
    max_manifest_depth: int = MAX_MANIFEST_DEPTH

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_ops", "max_target_bytes", "max_manifest_bytes", "max_manifest_depth"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ConfigError(f"DeltaLimits.{name} must be a positive integer, got {value!r}", key=name)

    @classmethod
    def for_bundles(cls, limits: BundleLimits, **overrides: int) -> DeltaLimits:
        """The limits that match a device's bundle limits (target size, manifest bounds).

        Args:
            limits: the bundle limits the device verifies with.
            **overrides: any field of :class:`DeltaLimits` to set differently.

        Returns:
            The delta limits.
        """
        values: dict[str, int] = {
            "max_target_bytes": limits.max_bundle_bytes,
            "max_manifest_bytes": limits.max_manifest_bytes,
            "max_manifest_depth": limits.max_manifest_depth,
        }
        values.update(overrides)
        return cls(**values)


_DEFAULT_LIMITS = DeltaLimits()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DeltaError(message)


@dataclass(frozen=True)
class DeltaHeader:
    """What a delta rebuilds, and from what.

    Attributes:
        base_name, base_version: the installed bundle version the delta starts from.
        base_content: :func:`~edge_sdk.bundle.admission.content_digest` of the base
            manifest's files (two bases with the same version number but other content
            are told apart by it).
        target_sha256, target_size: the new bundle file, exactly as the signed deploy
            command names it.
        target_name, target_version: the new bundle, for messages and logs (the file's
            own manifest is what verification reads).
        files: the base payload files the COPY operations read, by index.
        ops: how many operations follow the header.
        schema: :data:`DELTA_SCHEMA`.
        extra: unknown fields from a newer builder, kept, never acted on.

    Raises:
        DeltaError: a field is malformed (a bad name, digest or count, an unsafe or
            repeated path, or a target of another bundle than the base).
    """

    base_name: str
    base_version: int
    base_content: str
    target_sha256: str
    target_size: int
    target_name: str
    target_version: int
    files: tuple[str, ...]
    ops: int
    schema: int = DELTA_SCHEMA
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(
            is_int(self.schema) and self.schema == DELTA_SCHEMA,
            f"unsupported delta header schema {self.schema!r} (this build reads {DELTA_SCHEMA})",
        )
        for what, name in (("base_name", self.base_name), ("target_name", self.target_name)):
            _check(is_text(name, pattern=_NAME_RE), f"delta header: bad {what} {name!r}")
        _check(
            self.base_name == self.target_name,
            f"delta header: a delta rebuilds a version of the same bundle, not {self.base_name!r} -> "
            f"{self.target_name!r}",
        )
        for what, version in (("base_version", self.base_version), ("target_version", self.target_version)):
            _check(is_int(version) and version >= 1, f"delta header: {what} must be a positive integer")
        for what, digest in (("base_content", self.base_content), ("target_sha256", self.target_sha256)):
            _check(is_text(digest, pattern=_SHA256_RE), f"delta header: {what} must be 64 lowercase hex digits")
        _check(is_int(self.target_size) and self.target_size >= 1, "delta header: target_size must be positive")
        _check(is_int(self.ops) and self.ops >= 0, "delta header: ops must be a non-negative integer")
        _check(isinstance(self.files, tuple), "delta header: files must be a tuple of paths")
        _check(len(self.files) <= _MAX_FILES, f"delta header names {len(self.files)} base files (limit {_MAX_FILES})")
        for path in self.files:
            try:
                check_member_path(path)
            except ManifestError as exc:
                raise DeltaError(f"delta header: unsafe base file path: {exc.message}", path=repr(path)) from exc
        _check(len(set(self.files)) == len(self.files), "delta header names a base file twice")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            schema=self.schema,
            base_name=self.base_name,
            base_version=self.base_version,
            base_content=self.base_content,
            target_name=self.target_name,
            target_version=self.target_version,
            target_sha256=self.target_sha256,
            target_size=self.target_size,
            files=list(self.files),
            ops=self.ops,
        )
        return d

    def to_bytes(self) -> bytes:
        """The canonical JSON encoding (sorted keys, no whitespace, UTF-8)."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeltaHeader:
        """Build and validate a header from its decoded JSON.

        Raises:
            DeltaError: a field is missing, of the wrong type, or malformed.
        """
        fields = (
            "schema",
            "base_name",
            "base_version",
            "base_content",
            "target_name",
            "target_version",
            "target_sha256",
            "target_size",
            "files",
            "ops",
        )
        missing = [k for k in fields if k not in d]
        _check(not missing, f"delta header lacks field(s) {', '.join(missing)}")
        files = d["files"]
        _check(isinstance(files, list), "delta header: files must be a list")
        return cls(
            base_name=d["base_name"],
            base_version=d["base_version"],
            base_content=d["base_content"],
            target_sha256=d["target_sha256"],
            target_size=d["target_size"],
            target_name=d["target_name"],
            target_version=d["target_version"],
            files=tuple(files),
            ops=d["ops"],
            schema=d["schema"],
            extra={k: v for k, v in d.items() if k not in fields},
        )


@dataclass(frozen=True)
class CopyOp:
    """Copy ``length`` bytes at ``offset`` of the base payload file ``header.files[file]``."""

    file: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        _check(is_int(self.file) and self.file >= 0, f"COPY: bad file index {self.file!r}")
        _check(is_int(self.offset) and self.offset >= 0, f"COPY: bad offset {self.offset!r}")
        _check(is_int(self.length) and self.length >= 1, f"COPY: length must be positive, got {self.length!r}")

    def head(self) -> bytes:
        """The operation's bytes in the delta."""
        return bytes([_COPY]) + encode_varint(self.file) + encode_varint(self.offset) + encode_varint(self.length)

    @property
    def encoded_size(self) -> int:
        return len(self.head())


@dataclass(frozen=True, eq=False)
class DataOp:
    """Write ``data``, carried in the delta (a view is kept, not copied)."""

    data: bytes | memoryview

    def __post_init__(self) -> None:
        _check(len(self.data) >= 1, "DATA: no bytes")

    @property
    def length(self) -> int:
        return len(self.data)

    def head(self) -> bytes:
        """The operation's bytes in the delta before ``data``."""
        return bytes([_DATA]) + encode_varint(len(self.data))

    @property
    def encoded_size(self) -> int:
        return len(self.head()) + len(self.data)


@dataclass(frozen=True)
class ZeroOp:
    """Write ``length`` zero bytes."""

    length: int

    def __post_init__(self) -> None:
        _check(is_int(self.length) and self.length >= 1, f"ZERO: length must be positive, got {self.length!r}")

    def head(self) -> bytes:
        """The operation's bytes in the delta."""
        return bytes([_ZERO]) + encode_varint(self.length)

    @property
    def encoded_size(self) -> int:
        return len(self.head())


DeltaOp = CopyOp | DataOp | ZeroOp


def encode_header(header: DeltaHeader) -> bytes:
    """Magic, format version and the length-prefixed header: the delta's first bytes."""
    raw = header.to_bytes()
    return MAGIC + bytes([FORMAT_VERSION]) + encode_varint(len(raw)) + raw


def write_delta(
    out_path: Path, header: DeltaHeader, ops: Sequence[DeltaOp], limits: DeltaLimits = _DEFAULT_LIMITS
) -> int:
    """Write a delta file atomically (no partial file on failure).

    Args:
        out_path: destination file.
        header: what the delta rebuilds; ``header.ops`` must be ``len(ops)``.
        ops: the operations, in the order they write the new file.
        limits: the bounds the device will apply; a delta outside them is not written.

    Returns:
        The delta file's size in bytes.

    Raises:
        DeltaError: the operations do not agree with the header (count, total size,
            a file index it does not have) or exceed ``limits``.
        StorageError: the output cannot be written.
    """
    _check(len(ops) == header.ops, f"delta header declares {header.ops} operations, {len(ops)} given")
    _check(header.ops <= limits.max_ops, f"delta has {header.ops} operations (limit {limits.max_ops})")
    total = sum(op.length for op in ops)
    _check(total == header.target_size, f"operations write {total} bytes, header declares {header.target_size}")
    bad = [op.file for op in ops if isinstance(op, CopyOp) and op.file >= len(header.files)]
    _check(not bad, f"COPY names base file {bad[0] if bad else 0}, header lists {len(header.files)}")
    prefix = encode_header(header)
    _check(len(header.to_bytes()) <= limits.max_header_bytes, "delta header is above its size limit")
    size = len(prefix)
    with atomic_writer(Path(out_path)) as out:
        out.write(prefix)
        for op in ops:
            head = op.head()
            out.write(head)
            size += len(head)
            if isinstance(op, DataOp):
                out.write(op.data)
                size += len(op.data)
    return size


# --- reading ---------------------------------------------------------------------------


def _read_exact(fh: BinaryIO, n: int, what: str) -> bytes:
    try:
        data = fh.read(n)
    except OSError as exc:
        raise StorageError(f"cannot read the delta: {exc.strerror}") from exc
    if len(data) != n:
        raise DeltaError(f"delta is truncated in {what}")
    return data


def _read_varint(fh: BinaryIO, what: str) -> int:
    result = shift = 0
    for _ in range(_MAX_VARINT_BYTES):
        byte = _read_exact(fh, 1, what)[0]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result
        shift += 7
    raise DeltaError(f"delta has an overlong varint in {what}")


def _read_header(fh: BinaryIO, limits: DeltaLimits) -> DeltaHeader:
    magic = _read_exact(fh, len(MAGIC) + 1, "its magic")
    _check(magic[: len(MAGIC)] == MAGIC, "not a bundle delta (bad magic)")
    _check(magic[-1] == FORMAT_VERSION, f"delta format {magic[-1]} (this build reads {FORMAT_VERSION})")
    length = _read_varint(fh, "the header length")
    _check(
        length <= limits.max_header_bytes,
        f"delta header is {length} bytes (limit {limits.max_header_bytes})",
    )
    raw = _read_exact(fh, length, "the header")
    try:
        body = parse_json_object(raw, JsonLimits(limits.max_header_bytes, _HEADER_DEPTH), what="delta header")
    except JsonError as exc:
        raise DeltaError(exc.message, **exc.details) from exc
    header = DeltaHeader.from_dict(body)
    _check(header.ops <= limits.max_ops, f"delta declares {header.ops} operations (limit {limits.max_ops})")
    _check(
        header.target_size <= limits.max_target_bytes,
        f"delta rebuilds {header.target_size} bytes (limit {limits.max_target_bytes})",
    )
    return header


def read_delta_header(path: Path, limits: DeltaLimits = _DEFAULT_LIMITS) -> DeltaHeader:
    """Read and check a delta's header only (which base it needs, what it rebuilds).

    A receiver compares ``target_sha256`` and ``target_size`` with the signed deploy
    command, and the base with its installed slot, before applying anything.

    Args:
        path: the delta file.
        limits: header size, operation count and target size bounds.

    Returns:
        The header.

    Raises:
        DeltaError: bad magic or format version, truncated, header too large, not
            JSON, malformed, or beyond ``limits``.
        StorageError: the file cannot be read.
    """
    try:
        with open(path, "rb") as fh:
            return _read_header(fh, limits)
    except OSError as exc:
        raise StorageError(f"cannot read delta {path}: {exc.strerror}", path=str(path)) from exc


# --- applying --------------------------------------------------------------------------


def _base_manifest(slot: Path, limits: DeltaLimits) -> Manifest:
    """The slot's manifest: this device's own record, so any failure is local state."""
    path = slot / "manifest.json"
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limits.max_manifest_bytes + 1)
    except FileNotFoundError as exc:
        raise StorageError(f"base slot {slot} is missing (no manifest.json there)", path=str(slot)) from exc
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}", path=str(path)) from exc
    if len(raw) > limits.max_manifest_bytes:
        raise StorageError(f"{path} is corrupt: above {limits.max_manifest_bytes} bytes", path=str(path))
    try:
        return Manifest.from_bytes(raw, limits.max_manifest_bytes, limits.max_manifest_depth)
    except ManifestError as exc:
        raise StorageError(f"{path} is corrupt: {exc.message}", path=str(path)) from exc


def _check_fits(header: DeltaHeader, base: Manifest) -> None:
    """The delta is for exactly this base, and reads only files the base lists."""
    _check(
        base.encryption is None,
        f"base {base.name} v{base.version} is encrypted: its slot holds plaintext, and no delta applies to it",
    )
    content = content_digest(base.files)
    if (header.base_name, header.base_version, header.base_content) != (base.name, base.version, content):
        raise DeltaError(
            f"delta is for {header.base_name} v{header.base_version} (content {header.base_content[:12]}...), "
            f"but the base slot holds {base.name} v{base.version} (content {content[:12]}...)",
            expected=header.base_content,
            actual=content,
        )
    listed = {f.path for f in base.files}
    unlisted = [p for p in header.files if p not in listed]
    _check(not unlisted, f"delta reads base file {unlisted[0] if unlisted else ''!r}, which the base manifest lacks")


class _BaseFiles:
    """The base slot's payload files, each opened and hashed in full before its first use."""

    def __init__(self, payload_dir: Path, entries: list[FileEntry]) -> None:
        self._root = payload_dir
        self._entries = entries
        self._fds: dict[int, int] = {}

    def entry(self, index: int) -> FileEntry:
        return self._entries[index]

    def _open_verified(self, entry: FileEntry) -> int:
        path = self._root.joinpath(*entry.path.split("/"))
        try:
            inside = path.parent.resolve(strict=True).is_relative_to(self._root.resolve(strict=True))
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)) if inside else -1
        except OSError as exc:
            raise StorageError(
                f"base slot file {entry.path!r} cannot be opened ({exc.strerror}): the installed slot is damaged",
                path=entry.path,
            ) from exc
        if fd < 0:
            raise StorageError(f"base slot file {entry.path!r} lies outside the slot", path=entry.path)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise StorageError(f"base slot file {entry.path!r} is not a regular file", path=entry.path)
            digest = hashlib.sha256()
            size = 0
            while block := os.pread(fd, _CHUNK, size):
                digest.update(block)
                size += len(block)
                if size > entry.size:
                    break
            if size != entry.size or digest.hexdigest() != entry.sha256:
                raise StorageError(
                    f"base slot file {entry.path!r} does not match the slot's manifest (sha256 and size): "
                    "the installed slot is damaged",
                    path=entry.path,
                    expected=entry.sha256,
                )
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot read base slot file {entry.path!r}: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        return fd

    def copy(self, index: int, offset: int, length: int, out: BinaryIO, digest: Any) -> None:
        """Append ``length`` bytes at ``offset`` of file ``index`` to ``out`` and ``digest``."""
        if index not in self._fds:
            self._fds[index] = self._open_verified(self._entries[index])
        fd = self._fds[index]
        end = offset + length
        try:
            while offset < end:
                block = os.pread(fd, min(_CHUNK, end - offset), offset)
                if not block:
                    raise StorageError(f"base slot file {self._entries[index].path!r} shrank while being read")
                out.write(block)
                digest.update(block)
                offset += len(block)
        except OSError as exc:
            raise StorageError(f"cannot read base slot file {self._entries[index].path!r}: {exc.strerror}") from exc

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _rebuild(fh: BinaryIO, header: DeltaHeader, files: _BaseFiles, out: BinaryIO) -> None:
    """Run the operations into ``out``, bounded at every step; raise on the first misfit."""
    digest = hashlib.sha256()
    written = 0
    zeros = b""
    for index in range(header.ops):
        where = f"operation {index}"
        kind = _read_exact(fh, 1, where)[0]
        if kind == _COPY:
            source, offset, length = (_read_varint(fh, where) for _ in range(3))
        elif kind in (_DATA, _ZERO):
            length = _read_varint(fh, where)
        else:
            raise DeltaError(f"{where} has unknown kind {kind}")
        _check(length >= 1, f"{where} has length 0")
        _check(
            length <= header.target_size - written,
            f"{where} would write past the declared size ({written} + {length} > {header.target_size} bytes)",
        )
        if kind == _COPY:
            _check(
                source < len(header.files),
                f"{where} copies from base file {source}; the header lists {len(header.files)}",
            )
            entry = files.entry(source)
            _check(
                offset + length <= entry.size,
                f"{where} copies bytes {offset}..{offset + length} of {entry.path!r}, which has {entry.size}",
            )
            files.copy(source, offset, length, out, digest)
        elif kind == _DATA:
            remaining = length
            while remaining:
                block = _read_exact(fh, min(_CHUNK, remaining), where)
                out.write(block)
                digest.update(block)
                remaining -= len(block)
        else:
            remaining = length
            while remaining:
                n = min(_CHUNK, remaining)
                if len(zeros) < n:
                    zeros = bytes(n)
                out.write(zeros[:n])
                digest.update(zeros[:n])
                remaining -= n
        written += length
    _check(
        written == header.target_size,
        f"delta writes {written} bytes, its header declares {header.target_size}",
    )
    try:
        trailing = fh.read(1)
    except OSError as exc:
        raise StorageError(f"cannot read the delta: {exc.strerror}") from exc
    _check(trailing == b"", f"delta has bytes after its {header.ops} operations")
    actual = digest.hexdigest()
    if actual != header.target_sha256:
        raise DeltaError(
            f"rebuilt bundle has sha256 {actual[:16]}..., the delta declares {header.target_sha256[:16]}...",
            expected=header.target_sha256,
            actual=actual,
        )


def apply_delta(delta_path: Path, base_slot: Path, out_path: Path, limits: DeltaLimits = _DEFAULT_LIMITS) -> None:
    """Rebuild the new bundle file at ``out_path`` from a delta and the installed base slot.

    The result still has to pass :func:`~edge_sdk.bundle.verify_bundle` (and the caller
    should compare its size and sha256 with the signed command's before): this function
    only guarantees that it wrote exactly the bytes the delta header declares.

    Args:
        delta_path: the received delta file.
        base_slot: the installed slot of the base version (``manifest.json`` and
            ``payload/``).
        out_path: where the rebuilt bundle file appears, whole, once every check passed.
        limits: bounds on the header, operations, target size and base manifest.

    Raises:
        DeltaError: the delta is malformed or truncated, is for another base (name,
            version, content) or an encrypted one, reads a file the base manifest lacks
            or a range outside a file, writes more or fewer bytes than it declares, or
            the output does not hash to the declared sha256. The delta is at fault.
        StorageError: the base slot is missing, its manifest unreadable, or a base file
            does not match the slot's manifest (the slot is damaged); or the delta
            cannot be read or the output written. This device's state is at fault.
    """
    base_slot, out_path = Path(base_slot), Path(out_path)
    try:
        fh = open(delta_path, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise StorageError(f"cannot read delta {delta_path}: {exc.strerror}", path=str(delta_path)) from exc
    with fh:
        header = _read_header(fh, limits)
        base = _base_manifest(base_slot, limits)
        _check_fits(header, base)
        files = _BaseFiles(base_slot / "payload", [base.file(p) for p in header.files])
        try:
            with atomic_writer(out_path) as out:
                _rebuild(fh, header, files, out)
        finally:
            files.close()
    logger.info(
        "rebuilt %s v%d (%d bytes) from the slot of v%d",
        header.target_name,
        header.target_version,
        header.target_size,
        header.base_version,
    )
