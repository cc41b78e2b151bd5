"""Ed25519 keys, signature envelopes and threshold verification (see the package docstring).

This module never opens a file or reads the clock. Callers load key bytes from wherever
they keep them and pass them in; callers that check expiry pass ``now`` in.

The signature envelope is a JSON list of ``{"keyid": ..., "sig": base64}`` objects over
the exact bytes being signed (for bundles: the canonical manifest bytes). A
:class:`TrustedKeys` set says which keys count and how many distinct ones must sign
(the threshold), so rotation and multi-signer policies grow from here.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edge_sdk.errors import JsonError, KeyStoreError, SignatureError, UntrustedKeyError
from edge_sdk.untrusted_json import JsonLimits, parse_json

__all__ = [
    "MAX_SIGNATURES",
    "MAX_SIGNATURES_BYTES",
    "PublicKey",
    "Signature",
    "SigningKey",
    "TrustedKeys",
    "canonical_json",
    "decode_signatures",
    "encode_signatures",
    "signatures_from_list",
    "verify_signatures",
]

#: Upper bound on signatures accepted in one envelope (bounds work done on hostile input).
MAX_SIGNATURES = 16
#: Upper bound on a signature envelope's bytes (sixteen entries need about 2 KiB).
MAX_SIGNATURES_BYTES = 16 << 10


def canonical_json(obj: Any) -> bytes:
    """The one encoding signed bytes use: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:32]


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key and its key id (first 128 bits of sha256 of the raw key)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise KeyStoreError(f"an Ed25519 public key is 32 bytes, got {len(self.raw)}")

    @functools.cached_property
    def keyid(self) -> str:
        return _key_id(self.raw)

    @functools.cached_property
    def _verifier(self) -> Ed25519PublicKey:
        # Built once per key: a host verifies many messages with each enrolled key.
        return Ed25519PublicKey.from_public_bytes(self.raw)

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        """Parse a PEM ``PUBLIC KEY`` block.

        Raises:
            KeyStoreError: not a PEM Ed25519 public key.
        """
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise KeyStoreError("not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise KeyStoreError("public key is not Ed25519")
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def to_pem(self) -> bytes:
        return Ed25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verifies(self, signature: bytes, data: bytes) -> bool:
        try:
            self._verifier.verify(signature, data)
        except InvalidSignature:
            return False
        return True


class SigningKey:
    """An Ed25519 private key. Kept out of dataclasses so it is never printed or compared."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = PublicKey(
            key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @property
    def keyid(self) -> str:
        return self.public_key.keyid

    @classmethod
    def from_pem(cls, data: bytes, passphrase: bytes | None = None) -> SigningKey:
        """Parse a PEM ``PRIVATE KEY`` block, decrypting it with ``passphrase`` if given.

        Raises:
            KeyStoreError: not an Ed25519 private key, or a wrong or missing passphrase.
        """
        try:
            key = serialization.load_pem_private_key(data, password=passphrase)
        except (ValueError, TypeError) as exc:
            raise KeyStoreError(f"cannot load private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyStoreError("private key is not Ed25519")
        return cls(key)

    def to_pem(self, passphrase: bytes | None = None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        )
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)

    def sign(self, data: bytes) -> Signature:
        return Signature(self.keyid, self._key.sign(data))

    def __repr__(self) -> str:
        return f"SigningKey(keyid={self.keyid!r})"


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes

    def to_dict(self) -> dict[str, str]:
        return {"keyid": self.keyid, "sig": base64.b64encode(self.sig).decode("ascii")}


@dataclass(frozen=True)
class TrustedKeys:
    """The keys a verifier trusts for one role and how many of them must sign.

    Args:
        keys: trusted public keys.
        threshold: distinct trusted keys whose valid signatures are required.
    """

    keys: tuple[PublicKey, ...]
    threshold: int = 1

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise KeyStoreError("signature threshold must be at least 1")
        if len({k.keyid for k in self.keys}) < self.threshold:
            raise KeyStoreError(f"threshold {self.threshold} exceeds the {len(self.keys)} distinct trusted keys")

    def by_id(self) -> dict[str, PublicKey]:
        return {k.keyid: k for k in self.keys}


def encode_signatures(signatures: Iterable[Signature]) -> bytes:
    """Serialise signatures as canonical JSON bytes."""
    body = [s.to_dict() for s in signatures]
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def decode_signatures(data: bytes, max_bytes: int = MAX_SIGNATURES_BYTES) -> list[Signature]:
    """Parse a signature envelope.

    Args:
        data: the envelope's bytes.
        max_bytes: largest envelope accepted (checked before decoding).

    Returns:
        The signatures, in envelope order.

    Raises:
        SignatureError: too large, not JSON, malformed, too many entries, or no signature at all.
    """
    try:
        body = parse_json(data, JsonLimits(max_bytes), what="signature envelope")
    except JsonError as exc:
        raise SignatureError(exc.message, **exc.details) from exc
    return signatures_from_list(body)


def signatures_from_list(body: Any) -> list[Signature]:
    """Parse an already-decoded signature list (``[{"keyid", "sig"}, ...]``).

    Raises:
        SignatureError: not a list, too many entries, malformed entries, or empty.
    """
    if not isinstance(body, list):
        raise SignatureError("signature envelope must be a list")
    if not body:
        raise SignatureError("not signed (no signatures)")
    if len(body) > MAX_SIGNATURES:
        raise SignatureError(f"too many signatures ({len(body)} > {MAX_SIGNATURES})")
    out = []
    for entry in body:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("keyid"), str)
            or not isinstance(entry.get("sig"), str)
        ):
            raise SignatureError("signature entry must have string 'keyid' and 'sig'")
        try:
            raw = base64.b64decode(entry["sig"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SignatureError(f"signature by key {entry['keyid']} is not base64") from exc
        out.append(Signature(entry["keyid"], raw))
    return out


def verify_signatures(data: bytes, signatures: Sequence[Signature], trusted: TrustedKeys) -> frozenset[str]:
    """Check that ``data`` carries valid signatures from ``trusted.threshold`` trusted keys.

    Signatures by unknown keys are ignored for counting; a signature that claims a trusted
    key id but does not verify is an error in its own right (the bytes were tampered with).

    Args:
        data: the exact bytes that were signed.
        signatures: decoded signature envelope.
        trusted: the keys that count, and the threshold.

    Returns:
        The key ids whose signatures verified.

    Raises:
        SignatureError: no signatures, or a trusted key's signature does not verify.
        UntrustedKeyError: signatures verify only for keys this verifier does not trust,
            or fewer than the threshold of trusted keys signed.
    """
    if not signatures:
        raise SignatureError("not signed (no signatures)")
    keys = trusted.by_id()
    good: set[str] = set()
    for s in signatures:
        key = keys.get(s.keyid)
        if key is None:
            continue
        if not key.verifies(s.sig, data):
            raise SignatureError(
                f"signature by key {s.keyid} does not verify: the signed content was modified",
                keyid=s.keyid,
            )
        good.add(s.keyid)
    if len(good) < trusted.threshold:
        signers = sorted({s.keyid for s in signatures})
        if not good:
            raise UntrustedKeyError(
                f"signed by key(s) {', '.join(signers)}, none of which this device trusts "
                f"(trusted: {', '.join(sorted(keys))})",
                signers=signers,
                trusted=sorted(keys),
            )
        raise UntrustedKeyError(
            f"{len(good)} trusted signature(s), {trusted.threshold} required",
            signers=signers,
            trusted=sorted(keys),
        )
    return frozenset(good)
