"""X25519 recipient keys, and wrapping a bundle's content key for each recipient.

An encrypted bundle's payload is encrypted once, under a fresh random content key; that
key is then wrapped for every device that may read the bundle, as age's X25519 recipient
stanzas and RAUC's multi-recipient bundles do::

    ephemeral  e, E = X25519 key pair, fresh for each recipient
    shared     X25519(e, R)                          R: the recipient's public key
    wrap key   HKDF-SHA256(shared, salt = E || R, info = WRAP_INFO), 32 bytes
    wrapped    AES-256-GCM(wrap key, nonce = 12 zero bytes, content key, aad = key id of R)

The all-zero nonce is safe because each wrap key encrypts exactly one message (the
ephemeral key is never reused). The recipient recomputes the shared secret from its
private key and ``E``; a wrong key, or a stanza that was altered, fails the GCM tag.

This module is pure: key bytes in, key bytes out. Where a device keeps its private key
is :mod:`device_agent.decryption_key`'s business; the host reads public keys from files
or from a device's status.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_sdk.errors import DecryptionError, KeyStoreError, ManifestError
from edge_sdk.untrusted_json import is_text

__all__ = [
    "CONTENT_KEY_BYTES",
    "RECIPIENT_PREFIX",
    "RecipientKey",
    "RecipientPublicKey",
    "WrappedKey",
    "new_content_key",
    "unwrap_content_key",
    "wrap_content_key",
]

#: Length of a bundle's content key (AES-256).
CONTENT_KEY_BYTES = 32
#: Text form of a recipient public key: this prefix, then the raw key in base64.
RECIPIENT_PREFIX = "x25519:"
#: HKDF ``info`` of the key wrap: names the scheme, so a key derived here serves nothing else.
WRAP_INFO = b"edge-sdk bundle content key wrap v1"
_ZERO_NONCE = bytes(12)
_TAG_BYTES = 16
_KEYID_RE = re.compile(r"[0-9a-f]{32}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, length: int, what: str) -> bytes:
    """Decode base64 of exactly ``length`` bytes, or raise :class:`ManifestError`."""
    if not isinstance(text, str) or len(text) > 4 * length:
        raise ManifestError(f"{what} must be base64 text")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ManifestError(f"{what} is not valid base64") from exc
    if len(raw) != length:
        raise ManifestError(f"{what} must be {length} bytes, got {len(raw)}")
    return raw


@dataclass(frozen=True)
class RecipientPublicKey:
    """An X25519 public key a bundle can be encrypted to, and its key id.

    The key id is the first 128 bits of sha256 of the raw key, in hex (as for Ed25519
    keys in :mod:`edge_sdk.trust`).
    """

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise KeyStoreError(f"an X25519 public key is 32 bytes, got {len(self.raw)}")

    @property
    def keyid(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:32]

    def to_text(self) -> str:
        """The one-line form (``x25519:<base64>``) a device publishes in its status."""
        return RECIPIENT_PREFIX + _b64(self.raw)

    @classmethod
    def from_text(cls, text: str) -> RecipientPublicKey:
        """Parse the one-line form.

        Raises:
            KeyStoreError: not ``x25519:`` and 32 bytes of base64.
        """
        if not is_text(text) or not text.startswith(RECIPIENT_PREFIX):
            raise KeyStoreError(f"a recipient key is written {RECIPIENT_PREFIX}<base64>")
        try:
            return cls(_unb64(text[len(RECIPIENT_PREFIX) :].strip(), 32, "recipient key"))
        except ManifestError as exc:
            raise KeyStoreError(f"bad recipient key: {exc.message}") from exc

    def to_pem(self) -> bytes:
        """PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo), the recipient key file ``edgectl pack --encrypt-to`` reads."""
        return X25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def from_file_bytes(cls, data: bytes) -> RecipientPublicKey:
        """Parse a recipient key file: PEM X25519 ``PUBLIC KEY``, or the one-line ``x25519:`` form.

        Raises:
            KeyStoreError: neither form, or a key of another type.
        """
        text = data.strip()
        if text.startswith(RECIPIENT_PREFIX.encode()):
            return cls.from_text(text.decode("ascii", errors="replace"))
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise KeyStoreError("not a recipient key (PEM X25519 public key or x25519:<base64>)") from exc
        if not isinstance(key, X25519PublicKey):
            raise KeyStoreError(f"recipient key is {type(key).__name__}, not an X25519 public key")
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


class RecipientKey:
    """An X25519 private key: a device's key for opening bundles encrypted to it."""

    def __init__(self, key: X25519PrivateKey) -> None:
        self._key = key
        self.public = RecipientPublicKey(
            key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )

    @classmethod
    def generate(cls) -> RecipientKey:
        return cls(X25519PrivateKey.generate())

    @property
    def keyid(self) -> str:
        return self.public.keyid

    @classmethod
    def from_pem(cls, data: bytes) -> RecipientKey:
        """Parse an unencrypted PKCS#8 PEM X25519 private key.

        Raises:
            KeyStoreError: not a PEM X25519 private key.
        """
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyStoreError("not an unencrypted PEM X25519 private key") from exc
        if not isinstance(key, X25519PrivateKey):
            raise KeyStoreError(f"decryption key is {type(key).__name__}, not an X25519 private key")
        return cls(key)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def exchange(self, peer: bytes) -> bytes:
        """X25519 shared secret with a peer's raw public key.

        Raises:
            DecryptionError: the peer key is malformed or of low order (all-zero secret).
        """
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(peer))
        except ValueError as exc:
            raise DecryptionError("bad ephemeral key in the recipient stanza") from exc

    def __repr__(self) -> str:
        return f"RecipientKey(keyid={self.keyid})"


def _wrap_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> AESGCM:
    okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=WRAP_INFO).derive(shared)
    return AESGCM(okm)


@dataclass(frozen=True)
class WrappedKey:
    """One recipient stanza: the content key, wrapped for one X25519 key.

    Attributes:
        keyid: the recipient key's id (so a device finds its stanza without trying them all).
        ephemeral: the raw ephemeral public key ``E``.
        wrapped: the content key encrypted under the wrap key, with its GCM tag (48 bytes).
    """

    keyid: str
    ephemeral: bytes
    wrapped: bytes

    def __post_init__(self) -> None:
        if not is_text(self.keyid, pattern=_KEYID_RE):
            raise ManifestError(f"recipient key id must be 32 lowercase hex digits, got {self.keyid!r}")
        if len(self.ephemeral) != 32 or len(self.wrapped) != CONTENT_KEY_BYTES + _TAG_BYTES:
            raise ManifestError("recipient stanza has the wrong key lengths")

    def to_dict(self) -> dict[str, Any]:
        return {"keyid": self.keyid, "ephemeral": _b64(self.ephemeral), "wrapped_key": _b64(self.wrapped)}

    @classmethod
    def from_dict(cls, d: Any) -> WrappedKey:
        """Parse a stanza from the manifest.

        Raises:
            ManifestError: not an object with ``keyid``, ``ephemeral`` and ``wrapped_key``.
        """
        if not isinstance(d, dict) or set(d) != {"keyid", "ephemeral", "wrapped_key"}:
            raise ManifestError("encryption: a recipient is an object with keyid, ephemeral and wrapped_key")
        return cls(
            d["keyid"],
            _unb64(d["ephemeral"], 32, "recipient ephemeral key"),
            _unb64(d["wrapped_key"], CONTENT_KEY_BYTES + _TAG_BYTES, "wrapped content key"),
        )


def wrap_content_key(content_key: bytes, recipient: RecipientPublicKey) -> WrappedKey:
    """Wrap ``content_key`` for ``recipient`` with a fresh ephemeral X25519 key.

    Args:
        content_key: the bundle's 32-byte content key.
        recipient: who may unwrap it.

    Returns:
        The recipient stanza.
    """
    if len(content_key) != CONTENT_KEY_BYTES:
        raise ValueError("a content key is 32 bytes")  # a bug in the caller, not input
    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient.raw))
    wrapped = _wrap_key(shared, ephemeral_raw, recipient.raw).encrypt(
        _ZERO_NONCE, content_key, recipient.keyid.encode()
    )
    return WrappedKey(recipient.keyid, ephemeral_raw, wrapped)


def unwrap_content_key(stanza: WrappedKey, key: RecipientKey) -> bytes:
    """Recover the content key from the stanza addressed to ``key``.

    Args:
        stanza: the recipient stanza whose key id is ``key``'s.
        key: this device's private key.

    Returns:
        The 32-byte content key.

    Raises:
        DecryptionError: the stanza is for another key, or does not open with this one.
    """
    if stanza.keyid != key.keyid:
        raise DecryptionError(
            f"recipient stanza is for key {stanza.keyid}, this device's key is {key.keyid}",
            keyid=key.keyid,
        )
    shared = key.exchange(stanza.ephemeral)
    try:
        return _wrap_key(shared, stanza.ephemeral, key.public.raw).decrypt(
            _ZERO_NONCE, stanza.wrapped, key.keyid.encode()
        )
    except InvalidTag as exc:
        raise DecryptionError(
            f"the content key wrapped for {key.keyid} does not open with this device's key", keyid=key.keyid
        ) from exc


def new_content_key() -> bytes:
    """A fresh random content key (the one place this module reads randomness besides key generation)."""
    return os.urandom(CONTENT_KEY_BYTES)
