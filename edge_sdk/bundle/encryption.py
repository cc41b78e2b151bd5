"""Encrypted bundle payloads: AES-256-GCM in chunks, the content key wrapped per recipient.

An encrypted bundle is an ordinary signed bundle whose payload files are ciphertext. The
manifest's file hashes and sizes are those of the ciphertext, so the device checks the
signature and every hash exactly as for a plain bundle before it decrypts anything; the
manifest's ``encryption`` field says how to decrypt::

    "encryption": {
      "algorithm":  "x25519-hkdf-sha256+aes-256-gcm-stream-v1",
      "chunk_size": 65536,                             plaintext bytes per chunk
      "recipients": [{"keyid", "ephemeral", "wrapped_key"}, ...],   see edge_sdk.trust.recipient
      "files":      [{"path", "size", "salt"}, ...]    plaintext size, per-file random salt
    }

Each file is encrypted on its own, as a STREAM (Hoang, Reyhanitabar, Rogaway, Vizar; as
age does it)::

    file key   HKDF-SHA256(content key, salt = the file's salt, info = FILE_INFO + path)
    chunk i    AES-256-GCM(file key, nonce = i as 11 bytes big-endian || final, plaintext chunk)
               final = 0x01 for the file's last chunk, 0x00 before; each chunk carries its 16-byte tag

The chunk index and the final flag are in the nonce, so a reordered, repeated, dropped or
truncated chunk fails its tag; binding the path into the file key keeps one file's
ciphertext from decrypting as another's. A file of ``n`` plaintext bytes is
``max(1, ceil(n / chunk_size))`` chunks (an empty file is one empty final chunk).

Memory stays bounded on both sides: :func:`encrypt_stream` holds one chunk at a time, and
:class:`FileDecryptor` is a pure state machine fed the ciphertext in any block sizes,
holding at most one partial chunk between calls.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_sdk.errors import DecryptionError, ManifestError, NotRecipientError, StorageError
from edge_sdk.trust.recipient import (
    CONTENT_KEY_BYTES,
    RecipientKey,
    RecipientPublicKey,
    WrappedKey,
    new_content_key,
    unwrap_content_key,
    wrap_content_key,
)
from edge_sdk.untrusted_json import is_int, is_text

__all__ = [
    "ALGORITHM",
    "DEFAULT_CHUNK_SIZE",
    "EncryptedFile",
    "Encryption",
    "FileDecryptor",
    "PayloadKey",
    "ciphertext_size",
    "encrypt_stream",
    "new_payload_key",
    "new_salt",
]

#: The one scheme this build writes and reads.
ALGORITHM = "x25519-hkdf-sha256+aes-256-gcm-stream-v1"
#: Plaintext bytes per chunk unless the packer says otherwise.
DEFAULT_CHUNK_SIZE = 64 << 10
#: Bounds on the chunk size a manifest may name: a device holds one chunk in memory.
MIN_CHUNK_SIZE = 1 << 10
MAX_CHUNK_SIZE = 4 << 20
#: Most recipient stanzas in one manifest.
MAX_RECIPIENTS = 256
#: HKDF ``info`` prefix of a file key (the file's path follows it).
FILE_INFO = b"edge-sdk bundle file key v1\x00"
TAG_BYTES = 16
SALT_BYTES = 16
_COUNTER_BYTES = 11


def ciphertext_size(plain_size: int, chunk_size: int) -> int:
    """Bytes of ciphertext for ``plain_size`` bytes of plaintext in chunks of ``chunk_size``."""
    chunks = max(1, -(-plain_size // chunk_size))
    return plain_size + TAG_BYTES * chunks


def _chunk_count(plain_size: int, chunk_size: int) -> int:
    return max(1, -(-plain_size // chunk_size))


@dataclass(frozen=True)
class EncryptedFile:
    """How one payload file was encrypted.

    Attributes:
        path: the file's path, as in the manifest's file list.
        size: plaintext size in bytes (the manifest's file entry has the ciphertext's).
        salt: random bytes that make this file's key unique.
    """

    path: str
    size: int
    salt: bytes

    def __post_init__(self) -> None:
        if not is_text(self.path, max_len=255):
            raise ManifestError("encryption: a file needs a path")
        if not is_int(self.size) or self.size < 0:
            raise ManifestError(f"encryption: file {self.path!r}: size must be a non-negative integer")
        if len(self.salt) != SALT_BYTES:
            raise ManifestError(f"encryption: file {self.path!r}: salt must be {SALT_BYTES} bytes")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "salt": base64.b64encode(self.salt).decode("ascii")}

    @classmethod
    def from_dict(cls, d: Any) -> EncryptedFile:
        if not isinstance(d, dict) or set(d) != {"path", "size", "salt"}:
            raise ManifestError("encryption: a file is an object with path, size and salt")
        salt = d["salt"]
        if not isinstance(salt, str) or len(salt) > 64:
            raise ManifestError("encryption: a file's salt must be base64 text")
        try:
            raw = base64.b64decode(salt, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ManifestError("encryption: a file's salt is not valid base64") from exc
        return cls(d["path"], d["size"], raw)


@dataclass(frozen=True)
class Encryption:
    """The manifest's ``encryption`` field: who can decrypt the payload, and how.

    Attributes:
        recipients: the content key wrapped for each recipient key.
        files: per payload file, its plaintext size and salt.
        chunk_size: plaintext bytes per chunk.
        algorithm: :data:`ALGORITHM`.
    """

    recipients: tuple[WrappedKey, ...]
    files: tuple[EncryptedFile, ...]
    chunk_size: int = DEFAULT_CHUNK_SIZE
    algorithm: str = ALGORITHM

    def __post_init__(self) -> None:
        object.__setattr__(self, "recipients", tuple(self.recipients))
        object.__setattr__(self, "files", tuple(self.files))
        if self.algorithm != ALGORITHM:
            raise ManifestError(f"encryption: unknown algorithm {self.algorithm!r} (this build reads {ALGORITHM})")
        c = self.chunk_size
        if not is_int(c) or not MIN_CHUNK_SIZE <= c <= MAX_CHUNK_SIZE:
            raise ManifestError(f"encryption: chunk_size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}")
        if not 1 <= len(self.recipients) <= MAX_RECIPIENTS:
            raise ManifestError(f"encryption: between 1 and {MAX_RECIPIENTS} recipients")
        if len({r.keyid for r in self.recipients}) != len(self.recipients):
            raise ManifestError("encryption: a recipient key is listed twice")
        if len({f.path for f in self.files}) != len(self.files):
            raise ManifestError("encryption: a file is listed twice")

    @property
    def keyids(self) -> tuple[str, ...]:
        """The recipient key ids, in manifest order."""
        return tuple(r.keyid for r in self.recipients)

    def file(self, path: str) -> EncryptedFile:
        for f in self.files:
            if f.path == path:
                return f
        raise ManifestError(f"encryption: no entry for file {path!r}")

    def content_key(self, key: RecipientKey) -> bytes:
        """Unwrap the content key with this device's key.

        Raises:
            NotRecipientError: no stanza is addressed to ``key``.
            DecryptionError: the stanza does not open with ``key``.
        """
        for stanza in self.recipients:
            if stanza.keyid == key.keyid:
                return unwrap_content_key(stanza, key)
        raise NotRecipientError(
            f"bundle is encrypted for key(s) {', '.join(self.keyids)}; this device's key {key.keyid} is not "
            "among them (pack it with --encrypt-to this device)",
            keyid=key.keyid,
            recipients=list(self.keyids),
        )

    def check_files(self, ciphertext_sizes: Mapping[str, int]) -> None:
        """Check that this field describes exactly the manifest's files and their sizes.

        Args:
            ciphertext_sizes: the manifest's file list, path -> declared (ciphertext) size.

        Raises:
            ManifestError: a file without an entry, an entry without a file, or a size
                that is not what encrypting the stated plaintext size gives.
        """
        if set(ciphertext_sizes) != {f.path for f in self.files}:
            raise ManifestError("encryption: its file list differs from the manifest's")
        for f in self.files:
            if ciphertext_sizes[f.path] != ciphertext_size(f.size, self.chunk_size):
                raise ManifestError(
                    f"encryption: file {f.path!r} of {f.size} plaintext bytes cannot be "
                    f"{ciphertext_sizes[f.path]} bytes of ciphertext"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "chunk_size": self.chunk_size,
            "recipients": [r.to_dict() for r in self.recipients],
            "files": [f.to_dict() for f in self.files],
        }

    @classmethod
    def from_dict(cls, d: Any) -> Encryption:
        """Parse the manifest field.

        Raises:
            ManifestError: malformed, unknown algorithm, or out of bounds.
        """
        if not isinstance(d, dict) or set(d) != {"algorithm", "chunk_size", "recipients", "files"}:
            raise ManifestError("encryption: an object with algorithm, chunk_size, recipients and files")
        recipients, files = d["recipients"], d["files"]
        if not isinstance(recipients, list) or len(recipients) > MAX_RECIPIENTS:
            raise ManifestError(f"encryption: recipients must be a list of at most {MAX_RECIPIENTS}")
        if not isinstance(files, list) or len(files) > 64:
            raise ManifestError("encryption: files must be a list")
        if not isinstance(d["algorithm"], str):
            raise ManifestError("encryption: algorithm must be a string")
        return cls(
            tuple(WrappedKey.from_dict(r) for r in recipients),
            tuple(EncryptedFile.from_dict(f) for f in files),
            d["chunk_size"],
            d["algorithm"],
        )


@dataclass(frozen=True)
class PayloadKey:
    """A fresh content key and its stanzas, for packing one encrypted bundle.

    Attributes:
        content_key: the key every payload file is encrypted under (never written anywhere).
        recipients: the content key wrapped for each recipient.
    """

    content_key: bytes
    recipients: tuple[WrappedKey, ...]

    def __repr__(self) -> str:
        return f"PayloadKey(recipients={[r.keyid for r in self.recipients]})"


def new_payload_key(recipients: tuple[RecipientPublicKey, ...]) -> PayloadKey:
    """A fresh random content key, wrapped for each recipient.

    Raises:
        ManifestError: no recipient, too many, or one listed twice.
    """
    if not 1 <= len(recipients) <= MAX_RECIPIENTS:
        raise ManifestError(f"an encrypted bundle needs between 1 and {MAX_RECIPIENTS} recipients")
    if len({r.keyid for r in recipients}) != len(recipients):
        raise ManifestError("a recipient key is given twice")
    key = new_content_key()
    return PayloadKey(key, tuple(wrap_content_key(key, r) for r in recipients))


def _file_key(content_key: bytes, entry: EncryptedFile) -> AESGCM:
    if len(content_key) != CONTENT_KEY_BYTES:
        raise DecryptionError("content key has the wrong length")
    info = FILE_INFO + entry.path.encode()
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=entry.salt, info=info).derive(content_key))


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(_COUNTER_BYTES, "big") + (b"\x01" if final else b"\x00")


def new_salt() -> bytes:
    """Random salt for one file's key."""
    return os.urandom(SALT_BYTES)


def encrypt_stream(
    src: BinaryIO, dst: BinaryIO, content_key: bytes, entry: EncryptedFile, chunk_size: int
) -> tuple[str, int]:
    """Encrypt ``entry.size`` bytes from ``src`` into ``dst``, one chunk in memory at a time.

    Args:
        src: the plaintext, positioned at its start.
        dst: where the ciphertext goes.
        content_key: the bundle's content key.
        entry: the file's path, plaintext size and salt.
        chunk_size: plaintext bytes per chunk.

    Returns:
        sha256 (hex) and size of the ciphertext written.

    Raises:
        StorageError: ``src`` holds fewer or more bytes than ``entry.size`` (it changed
            while being packed), or a read or write failed.
    """
    aead = _file_key(content_key, entry)
    count = _chunk_count(entry.size, chunk_size)
    digest = hashlib.sha256()
    written = 0
    try:
        for index in range(count):
            want = min(chunk_size, entry.size - index * chunk_size)
            block = src.read(want)
            if len(block) != want:
                raise StorageError(f"{entry.path} changed while it was being encrypted", path=entry.path)
            sealed = aead.encrypt(_nonce(index, index == count - 1), block, None)
            digest.update(sealed)
            dst.write(sealed)
            written += len(sealed)
        if src.read(1):
            raise StorageError(f"{entry.path} grew while it was being encrypted", path=entry.path)
    except OSError as exc:
        raise StorageError(f"cannot encrypt {entry.path}: {exc.strerror}", path=entry.path) from exc
    return digest.hexdigest(), written


class FileDecryptor:
    """Decrypts one payload file fed as ciphertext blocks of any size. Pure: bytes in, bytes out.

    Args:
        content_key: the bundle's content key.
        entry: the file's path, plaintext size and salt.
        chunk_size: plaintext bytes per chunk.

    Every chunk is authenticated before its plaintext is returned; :meth:`finalize`
    checks that the final chunk came and nothing followed it.
    """

    def __init__(self, content_key: bytes, entry: EncryptedFile, chunk_size: int) -> None:
        self._aead = _file_key(content_key, entry)
        self._entry = entry
        self._chunk_size = chunk_size
        self._count = _chunk_count(entry.size, chunk_size)
        self._index = 0
        self._pending = bytearray()

    def _need(self) -> int:
        """Ciphertext bytes of the current chunk (0 once every chunk is done)."""
        if self._index >= self._count:
            return 0
        return min(self._chunk_size, self._entry.size - self._index * self._chunk_size) + TAG_BYTES

    def _open(self, sealed: bytes | bytearray | memoryview) -> bytes:
        final = self._index == self._count - 1
        try:
            # bytes, not a view: cryptography's AES-GCM takes bytes about twice as fast.
            plain = self._aead.decrypt(_nonce(self._index, final), bytes(sealed), None)
        except InvalidTag as exc:
            raise DecryptionError(
                f"chunk {self._index} of {self._entry.path!r} does not decrypt (altered, reordered or wrong key)",
                path=self._entry.path,
                chunk=self._index,
            ) from exc
        self._index += 1
        return plain

    def update(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Feed ciphertext; get the plaintext of every chunk it completes.

        Raises:
            DecryptionError: a chunk fails its tag, or bytes follow the final chunk.
        """
        out: list[bytes] = []
        view = memoryview(data)
        if self._pending:
            need = self._need()
            take = min(need - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < need:
                return out
            out.append(self._open(self._pending))
            self._pending = bytearray()
        while len(view):
            need = self._need()
            if not need:
                raise DecryptionError(f"{self._entry.path!r} has bytes after its final chunk", path=self._entry.path)
            if len(view) < need:
                self._pending += view
                break
            out.append(self._open(view[:need]))
            view = view[need:]
        return out

    def finalize(self) -> None:
        """Check that the file ended exactly after its final chunk.

        Raises:
            DecryptionError: chunks are missing (the file was truncated).
        """
        if self._index != self._count or self._pending:
            raise DecryptionError(
                f"{self._entry.path!r} ends after {self._index} of {self._count} chunk(s) (truncated)",
                path=self._entry.path,
            )
