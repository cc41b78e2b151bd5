"""Signing keys on the host: create, load, show. Private keys are written 0600.

Layout of a key directory::

    <keys_dir>/bundle-signing.key    PKCS#8 PEM, optionally passphrase-encrypted (0600)
    <keys_dir>/bundle-signing.pub    SubjectPublicKeyInfo PEM, for devices (0644)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.durable import atomic_write_bytes
from edge_sdk.errors import KeyStoreError
from edge_sdk.trust import PublicKey, SigningKey

__all__ = ["KeyPaths", "init_keys", "load_signing_key", "load_public_key"]

_KEY_NAME = "bundle-signing"


@dataclass(frozen=True)
class KeyPaths:
    private: Path
    public: Path

    @classmethod
    def in_dir(cls, keys_dir: Path) -> KeyPaths:
        return cls(Path(keys_dir) / f"{_KEY_NAME}.key", Path(keys_dir) / f"{_KEY_NAME}.pub")


def init_keys(keys_dir: Path, passphrase: bytes | None = None, force: bool = False) -> tuple[KeyPaths, SigningKey, bool]:
    """Create a signing key pair unless one exists.

    Args:
        keys_dir: directory to hold the pair (created 0700 if missing).
        passphrase: encrypt the private key with it.
        force: replace an existing pair (old bundles stay verifiable only with the old public key).

    Returns:
        The paths, the signing key, and whether a new pair was created.

    Raises:
        KeyStoreError: the directory cannot be written, or an existing key is unreadable.
    """
    paths = KeyPaths.in_dir(keys_dir)
    if paths.private.exists() and not force:
        return paths, load_signing_key(paths.private, passphrase), False
    try:
        Path(keys_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise KeyStoreError(f"cannot create key directory {keys_dir}: {exc.strerror}") from exc
    key = SigningKey.generate()
    atomic_write_bytes(paths.private, key.to_pem(passphrase), mode=0o600)
    atomic_write_bytes(paths.public, key.public_key.to_pem(), mode=0o644)
    return paths, key, True


def load_signing_key(path: Path, passphrase: bytes | None = None) -> SigningKey:
    """Load a private key, refusing one that others can read.

    Raises:
        KeyStoreError: missing, unreadable, group/world-readable, or wrong passphrase.
    """
    try:
        st = os.stat(path)
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyStoreError(
            f"cannot read signing key {path}: {exc.strerror} (create one with `edgectl keys init`)"
        ) from exc
    if st.st_mode & 0o077:
        raise KeyStoreError(f"signing key {path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
    try:
        return SigningKey.from_pem(data, passphrase)
    except KeyStoreError as exc:
        raise KeyStoreError(f"signing key {path}: {exc.message}") from exc


def load_public_key(path: Path) -> PublicKey:
    """Raises KeyStoreError when missing or not an Ed25519 PEM public key."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyStoreError(f"cannot read public key {path}: {exc.strerror}") from exc
    try:
        return PublicKey.from_pem(data)
    except KeyStoreError as exc:
        raise KeyStoreError(f"public key {path}: {exc.message}") from exc
