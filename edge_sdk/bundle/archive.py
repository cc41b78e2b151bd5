"""The bundle file on disk: an uncompressed POSIX tar. The only module that imports tarfile.

Layout::

    manifest.json        canonical manifest bytes (what the signatures cover)
    signatures.json      signature envelope over manifest.json
    payload/<path>       one member per manifest file

Bundles are uncompressed on purpose: there is no decompression bomb to defuse, offsets
are stable for resumable transfers, and int8 weights barely compress anyway (transport
compression is a pass of its own). Reading is hostile-input code: every member is checked
(regular file, safe name, no duplicates, count and size limits) while the index is read,
before any byte of payload is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol

from edge_sdk.bundle.manifest import MAX_MANIFEST_DEPTH, check_member_path
from edge_sdk.durable import atomic_writer, fsync_dir
from edge_sdk.errors import (
    BundleFormatError,
    HashMismatchError,
    ManifestError,
    StorageError,
)

__all__ = [
    "MANIFEST_NAME",
    "PAYLOAD_DIR",
    "SIGNATURES_NAME",
    "BundleLimits",
    "BundleReader",
    "Decryptor",
    "write_bundle",
]

MANIFEST_NAME = "manifest.json"
SIGNATURES_NAME = "signatures.json"
PAYLOAD_DIR = "payload/"
_READ_CHUNK = 1 << 20
_MAX_TAIL = 2 * tarfile.RECORDSIZE


class Decryptor(Protocol):
    """Ciphertext blocks in, plaintext out (:class:`edge_sdk.bundle.encryption.FileDecryptor`)."""

    def update(self, data: memoryview) -> list[bytes]: ...

    def finalize(self) -> None: ...


def _canonical_info(name: str, size: int) -> tarfile.TarInfo:
    """The one header a member may have: fixed mode, owner and time; only name and size vary."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _canonical_header(name: str, size: int) -> bytes:
    return _canonical_info(name, size).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


@dataclass(frozen=True)
class BundleLimits:
    """Upper bounds applied to every bundle before its content is trusted."""

    max_bundle_bytes: int = 2 << 30
    max_manifest_bytes: int = 256 << 10
    max_manifest_depth: int = MAX_MANIFEST_DEPTH
    max_signatures_bytes: int = 16 << 10
    max_members: int = 66
    max_member_bytes: int = 2 << 30


_DEFAULT_LIMITS = BundleLimits()


def write_bundle(out_path: Path, manifest_bytes: bytes, signatures_bytes: bytes, files: Mapping[str, Path]) -> None:
    """Write a deterministic bundle atomically (no partial file on failure).

    Args:
        out_path: destination file.
        manifest_bytes: canonical manifest, exactly as signed.
        signatures_bytes: signature envelope.
        files: bundle path -> local source file.

    Raises:
        StorageError: the output cannot be written.
    """

    def add(tf: tarfile.TarFile, name: str, size: int, fh: BinaryIO) -> None:
        tf.addfile(_canonical_info(name, size), fh)

    with atomic_writer(Path(out_path)) as out, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        add(tf, MANIFEST_NAME, len(manifest_bytes), io.BytesIO(manifest_bytes))
        add(tf, SIGNATURES_NAME, len(signatures_bytes), io.BytesIO(signatures_bytes))
        for name in sorted(files):
            src = Path(files[name])
            try:
                with open(src, "rb") as fh:
                    add(tf, PAYLOAD_DIR + check_member_path(name), os.fstat(fh.fileno()).st_size, fh)
            except OSError as exc:
                raise StorageError(f"cannot read {src}: {exc.strerror}", path=str(src)) from exc


class BundleReader:
    """Read a bundle file safely. Use as a context manager.

    The constructor reads and checks the whole member index; nothing is extracted.

    Raises:
        BundleFormatError: not a tar, truncated, or a member that is not allowed.
        StorageError: the file cannot be opened.
    """

    def __init__(self, path: Path, limits: BundleLimits = _DEFAULT_LIMITS) -> None:
        self.path = Path(path)
        self.limits = limits
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot open bundle {self.path}: {exc.strerror}") from exc
        if size > limits.max_bundle_bytes:
            raise BundleFormatError(f"bundle is {size} bytes (limit {limits.max_bundle_bytes})", size=size)
        # The reader owns one file: tarfile indexes it, and the member checks and reads
        # below seek in it directly. Both stay open until close(), or close at once if
        # the bundle is refused here.
        with contextlib.ExitStack() as opened:
            try:
                self._fh: io.BufferedReader = opened.enter_context(open(self.path, "rb"))
                self._tf = opened.enter_context(tarfile.open(fileobj=self._fh, mode="r:"))
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise BundleFormatError(f"{self.path.name} is not a bundle (not a readable tar archive)") from exc
            self.payload: dict[str, tarfile.TarInfo] = {}
            self._special: dict[str, tarfile.TarInfo] = {}
            self._index()
            self.manifest_bytes = self._read_small(MANIFEST_NAME, limits.max_manifest_bytes)
            self.signatures_bytes = self._read_small(SIGNATURES_NAME, limits.max_signatures_bytes)
            self._open = opened.pop_all()

    def _index(self) -> None:
        count = 0
        members: list[tarfile.TarInfo] = []
        while True:
            try:
                info = self._tf.next()
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise BundleFormatError("bundle archive is truncated or corrupt") from exc
            if info is None:
                break
            count += 1
            if count > self.limits.max_members:
                raise BundleFormatError(f"bundle has more than {self.limits.max_members} members")
            name = info.name
            if not info.isreg():
                raise BundleFormatError(
                    f"bundle member {name!r} is not a regular file (links and devices are refused)",
                    member=name,
                )
            if info.size > self.limits.max_member_bytes:
                raise BundleFormatError(f"bundle member {name!r} is {info.size} bytes", member=name)
            members.append(info)
            if name in (MANIFEST_NAME, SIGNATURES_NAME):
                if name in self._special:
                    raise BundleFormatError(f"bundle member {name!r} appears twice", member=name)
                self._special[name] = info
                continue
            if not name.startswith(PAYLOAD_DIR):
                raise BundleFormatError(f"unexpected bundle member {name!r}", member=name)
            rel = name[len(PAYLOAD_DIR) :]
            try:
                check_member_path(rel)
            except ManifestError as exc:
                raise BundleFormatError(f"unsafe bundle member {name!r}", member=name) from exc
            if rel in self.payload:
                raise BundleFormatError(f"bundle member {name!r} appears twice", member=name)
            self.payload[rel] = info
        self._check_canonical(members)

    def _check_canonical(self, members: list[tarfile.TarInfo]) -> None:
        """Every byte of the file must be a canonical header, member data, or zero padding.

        Member data is covered by the signature (manifest bytes) or by the manifest's
        hashes; this check covers the rest, so that no flipped byte anywhere in a bundle
        goes unnoticed.
        """
        fileobj = self._fh
        file_size = self.path.stat().st_size
        pos = 0
        for info in members:
            end = info.offset_data + info.size
            if end > file_size:
                raise BundleFormatError(f"bundle member {info.name!r} is truncated", member=info.name)
            if info.offset != pos:
                raise BundleFormatError(f"bundle member {info.name!r} is not where a canonical bundle puts it")
            fileobj.seek(info.offset)
            if fileobj.read(info.offset_data - info.offset) != _canonical_header(info.name, info.size):
                raise BundleFormatError(f"bundle member {info.name!r} has a non-canonical header", member=info.name)
            pad = -info.size % tarfile.BLOCKSIZE
            fileobj.seek(end)
            if fileobj.read(pad) != bytes(pad):
                raise BundleFormatError(f"bundle member {info.name!r} has non-zero padding", member=info.name)
            pos = end + pad
        tail = file_size - pos
        if tail < 2 * tarfile.BLOCKSIZE or file_size % tarfile.RECORDSIZE:
            raise BundleFormatError("bundle archive is truncated (end-of-archive marker incomplete)")
        if tail > _MAX_TAIL:
            raise BundleFormatError(f"bundle has {tail} bytes after the end of the archive")
        fileobj.seek(pos)
        if fileobj.read(tail) != bytes(tail):
            raise BundleFormatError("bundle has non-zero bytes after the end of the archive")

    def _read_small(self, name: str, limit: int) -> bytes:
        info = self._special.get(name)
        if info is None:
            raise BundleFormatError(f"bundle has no {name}", member=name)
        if info.size > limit:
            raise BundleFormatError(f"{name} is {info.size} bytes (limit {limit})", member=name)
        fh = self._tf.extractfile(info)
        assert fh is not None  # regular file, checked in _index
        data = fh.read(limit + 1)
        if len(data) != info.size:
            raise BundleFormatError(f"{name} is truncated", member=name)
        return data

    def member_span(self, rel: str) -> tuple[int, int]:
        """Where a payload member's bytes lie in the bundle file (a bundle delta copies by range).

        Args:
            rel: the member's path (a key of :attr:`payload`).

        Returns:
            The offset of its first data byte and its size; the index and the canonical
            layout check have already pinned both inside the file.

        Raises:
            KeyError: the bundle has no such member.
        """
        info = self.payload[rel]
        return info.offset_data, info.size

    def iter_member(self, rel: str, max_bytes: int) -> Iterator[bytes]:
        """Stream a payload member, refusing to yield more than ``max_bytes`` in total.

        Raises:
            HashMismatchError: the member is longer than ``max_bytes`` (the declared size).
            BundleFormatError: the file ends before the member does.
        """
        for block in self._blocks(rel, max_bytes):
            yield bytes(block)

    def _blocks(self, rel: str, max_bytes: int) -> Iterator[memoryview]:
        """:meth:`iter_member` without copies, for hashing and extracting.

        Reads straight from the file at the member's data offset (the index and
        :meth:`_check_canonical` have already pinned where it is), into one reused
        buffer, so verification costs about one sha256 pass rather than tarfile's extra
        copies. Each block is valid only until the next one is requested.

        Raises:
            HashMismatchError: the member is longer than ``max_bytes`` (the declared size).
            BundleFormatError: the file ends before the member does.
        """
        info = self.payload[rel]
        if info.size > max_bytes:
            raise HashMismatchError(
                f"file {rel!r} is {info.size} bytes, manifest declares {max_bytes}",
                path=rel,
                expected_size=max_bytes,
                actual_size=info.size,
            )
        fh = self._fh
        buf = memoryview(bytearray(min(_READ_CHUNK, max(info.size, 1))))
        remaining = info.size
        try:
            fh.seek(info.offset_data)
            while remaining:
                n = fh.readinto(buf[: min(len(buf), remaining)])
                if not n:
                    raise BundleFormatError(f"bundle member {rel!r} is truncated", member=rel)
                remaining -= n
                yield buf[:n]
        except OSError as exc:
            raise BundleFormatError(f"bundle member {rel!r} cannot be read: {exc.strerror}", member=rel) from exc

    def hash_member(self, rel: str, declared_size: int) -> tuple[str, int]:
        """sha256 and length of a payload member, read with the declared size as a bound."""
        digest = hashlib.sha256()
        n = 0
        for block in self._blocks(rel, declared_size):
            digest.update(block)
            n += len(block)
        return digest.hexdigest(), n

    def _create(self, rel: str, dest_root: Path, mode: int) -> tuple[Path, int]:
        """Create the file for member ``rel`` under ``dest_root``: exclusively, not through links.

        Returns:
            Its path and an open write descriptor.
        """
        target = dest_root.joinpath(*rel.split("/"))
        resolved_root = dest_root.resolve()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {target.parent}: {exc.strerror}") from exc
        if not target.parent.resolve().is_relative_to(resolved_root):
            raise BundleFormatError(f"bundle member {rel!r} escapes the staging directory")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            return target, os.open(target, flags, mode)
        except OSError as exc:
            raise StorageError(f"cannot create {target}: {exc.strerror}") from exc

    def extract_member(self, rel: str, dest_root: Path, declared_size: int) -> tuple[str, int]:
        """Write a payload member under ``dest_root`` (never outside it), returning sha256 and size.

        The file is created exclusively without following links; parent directories are
        created from the already-validated relative path.
        """
        target, fd = self._create(rel, dest_root, 0o644)
        digest = hashlib.sha256()
        n = 0
        with os.fdopen(fd, "wb") as out:
            try:
                for block in self._blocks(rel, declared_size):
                    digest.update(block)
                    n += len(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise StorageError(f"cannot write {target}: {exc.strerror}") from exc
        fsync_dir(target.parent)
        return digest.hexdigest(), n

    def decrypt_member(self, rel: str, dest_root: Path, declared_size: int, decryptor: Decryptor) -> int:
        """Write the plaintext of an encrypted payload member under ``dest_root``, streamed.

        Call it only once the member's hash has been checked (:meth:`hash_member`). The
        file is created as in :meth:`extract_member`, readable by the owner only (it is
        the bundle's protected content); if decryption fails the partial file stays for
        the caller, who removes the whole staging directory.

        Args:
            rel: the member's path.
            dest_root: the staging directory.
            declared_size: the member's ciphertext size from the manifest (a hard bound).
            decryptor: turns ciphertext blocks into plaintext and checks the end.

        Returns:
            Plaintext bytes written.

        Raises:
            DecryptionError: from ``decryptor``.
            StorageError: the file cannot be created or written.
        """
        target, fd = self._create(rel, dest_root, 0o600)
        n = 0
        with os.fdopen(fd, "wb") as out:
            try:
                for block in self._blocks(rel, declared_size):
                    for plain in decryptor.update(block):
                        out.write(plain)
                        n += len(plain)
                decryptor.finalize()
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise StorageError(f"cannot write {target}: {exc.strerror}") from exc
        fsync_dir(target.parent)
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._open.close()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
