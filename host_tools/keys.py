"""Signing keys and the root of trust on the host: create, rotate, revoke, show.

Layout of a key directory::

    <keys_dir>/root.json                 the current signed root: give it to devices
    <keys_dir>/roots/<version>.json      every root ever signed, oldest first, so that a
                                         device that missed some can walk the chain
    <keys_dir>/<keyid>.key               private keys, PKCS#8 PEM, optionally
                                         passphrase-encrypted (0600)
    <keys_dir>/<keyid>.pub               public keys (0644)

``init`` creates one key per role (``root``, ``bundles``, ``commands``; more root keys
and a root threshold on request) and root v1. ``rotate`` replaces one key of a role with
a fresh one; ``revoke`` drops a key from every role. Both publish the next root, signed
by a threshold of the current root keys and of the new root keys, and checked with the
very function devices use (:func:`edge_sdk.trust.verify_root_update`) before it is
written. Root keys belong offline in production; here they sit beside the others so a
single machine can run the whole path, and the layout lets an operator move them away.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk.durable import atomic_write_bytes
from edge_sdk.errors import ConfigError, EdgeError, KeyStoreError
from edge_sdk.trust import (
    ROLES,
    PublicKey,
    Role,
    Root,
    SignedRoot,
    SigningKey,
    load_root,
    sign_root,
    verify_root_update,
)

if TYPE_CHECKING:
    from host_tools.fleet.deployer import CommandAuthority

__all__ = [
    "DEFAULT_ROOT_TTL_S",
    "KeyRing",
    "RoleSummary",
    "RootSummary",
    "command_authority",
    "init_keys",
    "load_public_key",
    "load_signing_key",
    "revoke_key",
    "rotate_key",
    "rotation_warning",
]

DEFAULT_ROOT_TTL_S = 365 * 86400.0


@dataclass(frozen=True)
class RoleSummary:
    """One role of a root as the operator sees it.

    Attributes:
        name: ``root``, ``bundles`` or ``commands``.
        threshold: how many of its keys must sign.
        keys: each key id of the role, with whether its private key is in this key directory.
    """

    name: str
    threshold: int
    keys: tuple[tuple[str, bool], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "keys": [{"keyid": keyid, "private_key_here": here} for keyid, here in self.keys],
        }


@dataclass(frozen=True)
class RootSummary:
    """What ``edgectl keys`` shows about the current root of trust.

    Attributes:
        root_path: the signed root file to give to devices.
        version, expires_at: of the root.
        roles: every role, in the root's order.
    """

    root_path: Path
    version: int
    expires_at: float
    roles: tuple[RoleSummary, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root_path),
            "version": self.version,
            "expires_at": self.expires_at,
            "roles": {role.name: role.to_dict() for role in self.roles},
        }


@dataclass(frozen=True)
class KeyRing:
    """A host's key directory (see the module docstring)."""

    dir: Path

    @property
    def root_path(self) -> Path:
        return self.dir / "root.json"

    @property
    def history_dir(self) -> Path:
        return self.dir / "roots"

    def private_path(self, keyid: str) -> Path:
        return self.dir / f"{keyid}.key"

    def public_path(self, keyid: str) -> Path:
        return self.dir / f"{keyid}.pub"

    def exists(self) -> bool:
        return self.root_path.exists()

    def signed_root(self) -> SignedRoot:
        """The current signed root.

        Raises:
            KeyStoreError: missing or not a valid root (run ``edgectl keys init``).
        """
        try:
            data = self.root_path.read_bytes()
        except OSError as exc:
            raise KeyStoreError(
                f"cannot read {self.root_path}: {exc.strerror} (no keys yet: run `edgectl keys init`)"
            ) from exc
        try:
            return load_root(data)
        except EdgeError as exc:
            raise KeyStoreError(f"{self.root_path}: {exc.message}") from exc

    @property
    def root(self) -> Root:
        return self.signed_root().root

    def chain(self) -> list[bytes]:
        """Every signed root, version 1 first: what a device needs to catch up."""
        out = []
        version = 1
        while (path := self.history_dir / f"{version}.json").exists():
            try:
                out.append(path.read_bytes())
            except OSError as exc:
                raise KeyStoreError(f"cannot read {path}: {exc.strerror}") from exc
            version += 1
        return out

    def role_keys(self, role: str, passphrase: bytes | None = None) -> list[SigningKey]:
        """The private keys held here for ``role``, at least its threshold of them.

        Raises:
            KeyStoreError: fewer private keys here than the role's threshold, or one unreadable.
        """
        r = self.root.roles[role]
        keys = [load_signing_key(self.private_path(k), passphrase) for k in r.keyids if self.private_path(k).exists()]
        if len(keys) < r.threshold:
            raise KeyStoreError(
                f"role {role!r} needs {r.threshold} signing key(s); {len(keys)} of its keys are in {self.dir}",
                role=role,
            )
        return keys

    def summary(self) -> RootSummary:
        """The current root, its roles, and which of their private keys are here.

        Raises:
            KeyStoreError: missing or not a valid root.
        """
        root = self.root
        roles = tuple(
            RoleSummary(name, role.threshold, tuple((k, self.private_path(k).exists()) for k in role.keyids))
            for name, role in root.roles.items()
        )
        return RootSummary(self.root_path, root.version, root.expires_at, roles)

    def _new_key(self, passphrase: bytes | None) -> SigningKey:
        key = SigningKey.generate()
        atomic_write_bytes(self.private_path(key.keyid), key.to_pem(passphrase), mode=0o600)
        atomic_write_bytes(self.public_path(key.keyid), key.public_key.to_pem(), mode=0o644)
        return key

    def _write_root(self, signed: SignedRoot) -> None:
        self.history_dir.mkdir(exist_ok=True)
        data = signed.to_bytes()
        atomic_write_bytes(self.history_dir / f"{signed.root.version}.json", data)
        atomic_write_bytes(self.root_path, data)


def command_authority(ring: KeyRing, passphrase: bytes | None = None) -> CommandAuthority:
    """What signs every command sent to a device: the command keys and the chain of roots.

    Args:
        ring: the host's key directory.
        passphrase: of the command keys.

    Returns:
        The authority the deployer signs commands with.

    Raises:
        KeyStoreError: fewer command keys here than the role's threshold, or a root unreadable.
    """
    # The deployer is imported here so that key management does not load the MQTT client.
    from host_tools.fleet.deployer import CommandAuthority

    return CommandAuthority(tuple(ring.role_keys("commands", passphrase)), tuple(ring.chain()))


def init_keys(
    keys_dir: Path,
    now: float,
    passphrase: bytes | None = None,
    force: bool = False,
    root_keys: int = 1,
    root_threshold: int = 1,
    ttl_s: float = DEFAULT_ROOT_TTL_S,
) -> tuple[KeyRing, bool]:
    """Create keys for every role and root v1, unless a root exists.

    Args:
        keys_dir: directory to hold them (created 0700 if missing).
        now: current time; the root expires at ``now + ttl_s``.
        passphrase: encrypt the private keys with it.
        force: start over with new keys and a new root v1 (devices must be re-provisioned).
        root_keys, root_threshold: how many root keys, and how many must sign a new root.
        ttl_s: lifetime of the root.

    Returns:
        The key ring and whether it was created now.

    Raises:
        KeyStoreError: the directory cannot be written, or the existing root is unreadable.
    """
    ring = KeyRing(Path(keys_dir))
    if ring.exists() and not force:
        ring.signed_root()
        return ring, False
    if not 1 <= root_threshold <= root_keys:
        raise KeyStoreError(f"root threshold {root_threshold} must be between 1 and the {root_keys} root key(s)")
    try:
        ring.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for old in ring.history_dir.glob("*.json") if ring.history_dir.exists() else []:
            old.unlink()
    except OSError as exc:
        raise KeyStoreError(f"cannot create key directory {keys_dir}: {exc.strerror}") from exc
    roots = [ring._new_key(passphrase) for _ in range(root_keys)]
    bundles, commands = ring._new_key(passphrase), ring._new_key(passphrase)
    root = Root(
        version=1,
        expires_at=now + ttl_s,
        keys={k.keyid: k.public_key for k in (*roots, bundles, commands)},
        roles={
            "root": Role(tuple(k.keyid for k in roots), root_threshold),
            "bundles": Role((bundles.keyid,), 1),
            "commands": Role((commands.keyid,), 1),
        },
    )
    ring._write_root(sign_root(root, roots))
    return ring, True


def _publish_next(
    ring: KeyRing, new: Root, new_root_keys: list[SigningKey], now: float, passphrase: bytes | None
) -> SignedRoot:
    current = ring.signed_root()
    signers = ring.role_keys("root", passphrase) + new_root_keys
    signed = sign_root(new, signers)
    verify_root_update(current.root, signed, now)  # exactly what a device will check
    ring._write_root(signed)
    return signed


def rotate_key(
    keys_dir: Path,
    role: str,
    now: float,
    passphrase: bytes | None = None,
    keyid: str | None = None,
    ttl_s: float = DEFAULT_ROOT_TTL_S,
) -> tuple[str, SigningKey, SignedRoot]:
    """Replace one key of ``role`` with a new one and publish the next root.

    Args:
        keys_dir: the key directory.
        role: ``root``, ``bundles`` or ``commands``.
        now: current time; the new root expires at ``now + ttl_s``.
        passphrase: of the existing private keys; the new key gets the same.
        keyid: which key of the role to replace (default: its only key).

    Returns:
        The replaced key id, the new key, and the new signed root.

    Raises:
        KeyStoreError: unknown role or key, ambiguous choice, or root keys missing here.
    """
    if role not in ROLES:
        raise KeyStoreError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    ring = KeyRing(Path(keys_dir))
    root = ring.root
    current = root.roles[role].keyids
    if keyid is None:
        if len(current) != 1:
            raise KeyStoreError(f"role {role!r} has {len(current)} keys; say which to replace with --keyid")
        keyid = current[0]
    if keyid not in current:
        raise KeyStoreError(f"key {keyid} is not a {role!r} key")
    ring.role_keys("root", passphrase)  # fail before creating anything
    key = ring._new_key(passphrase)
    roles = dict(root.roles)
    roles[role] = Role(tuple(key.keyid if k == keyid else k for k in current), root.roles[role].threshold)
    new = _next_root(root, roles, {key.keyid: key.public_key}, now, ttl_s)
    signed = _publish_next(ring, new, [key] if role == "root" else [], now, passphrase)
    return keyid, key, signed


def rotation_warning(role: str, replaced: str, root_version: int) -> str | None:
    """What an operator must know after rotating a key of ``role``, or ``None`` if nothing.

    Bundles are signed once, when packed, and kept: after the bundle key is rotated every
    device that has the new root refuses each bundle the old key signed. Commands and
    roots are signed when sent, so their rotation leaves nothing behind.

    Args:
        role: the rotated role.
        replaced: the key id that left the role.
        root_version: the version of the root that no longer lists it.

    Returns:
        The warning, naming the consequence and the fix, or ``None``.
    """
    if role != "bundles":
        return None
    return (
        f"every bundle signed by {replaced} (all bundles packed before this rotation) is now refused by a "
        f"device once it has root v{root_version}, which the next command to it brings: re-sign each one "
        "with `edgectl resign BUNDLE` (same payload and version, new signature), or pack it again"
    )


def revoke_key(
    keys_dir: Path, keyid: str, now: float, passphrase: bytes | None = None, ttl_s: float = DEFAULT_ROOT_TTL_S
) -> SignedRoot:
    """Publish the next root without ``keyid``: devices stop trusting it once they see it.

    Raises:
        KeyStoreError: unknown key, or a role would keep fewer keys than its threshold
            (rotate the key instead).
    """
    ring = KeyRing(Path(keys_dir))
    root = ring.root
    if keyid not in root.keys:
        raise KeyStoreError(f"key {keyid} is not in root v{root.version}")
    roles = {}
    for name, r in root.roles.items():
        kept = tuple(k for k in r.keyids if k != keyid)
        if len(kept) < r.threshold:
            raise KeyStoreError(
                f"revoking {keyid} would leave role {name!r} with {len(kept)} key(s) for threshold "
                f"{r.threshold}; rotate it instead (`edgectl keys rotate {name}`)"
            )
        roles[name] = Role(kept, r.threshold)
    new = _next_root(root, roles, {}, now, ttl_s)
    return _publish_next(ring, new, [], now, passphrase)


def _next_root(root: Root, roles: dict[str, Role], added: dict[str, PublicKey], now: float, ttl_s: float) -> Root:
    used = {k for r in roles.values() for k in r.keyids}
    keys = {k: v for k, v in {**root.keys, **added}.items() if k in used}
    return Root(root.version + 1, now + ttl_s, keys, roles, root.extra)


def load_signing_key(path: Path, passphrase: bytes | None = None) -> SigningKey:
    """Load a private key, refusing one that others can read.

    Raises:
        KeyStoreError: missing, unreadable, group/world-readable, or malformed.
        ConfigError: encrypted, and the passphrase is missing or wrong.
    """
    try:
        st = os.stat(path)
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyStoreError(
            f"cannot read signing key {path}: {exc.strerror} (no keys yet: run `edgectl keys init`)"
        ) from exc
    if st.st_mode & 0o077:
        raise KeyStoreError(f"signing key {path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
    encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0]
    if encrypted and passphrase is None:
        raise ConfigError(
            f"signing key {path} is encrypted: give its passphrase with --passphrase-env VAR", key=str(path)
        )
    try:
        return SigningKey.from_pem(data, passphrase)
    except KeyStoreError as exc:
        if encrypted:  # a passphrase was given: it is the wrong one (configuration, like a missing one)
            raise ConfigError(f"signing key {path}: wrong passphrase ({exc.message})", key=str(path)) from exc
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
