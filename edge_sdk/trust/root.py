"""The root of trust: which keys may sign bundles, commands and the next root. Pure.

Modelled on TUF's root role, sized for this product. A :class:`Root` names keys and three
roles, each a set of key ids with a threshold::

    root      signs the next Root (rotation, revocation)
    bundles   signs bundle manifests
    commands  signs deploy / rollback / remove commands

On disk and on the wire a root is a :class:`SignedRoot`, JSON of the form
``{"signed": {...root...}, "signatures": [{"keyid", "sig"}, ...]}``; the signatures cover
the canonical JSON of ``signed`` (sorted keys, no whitespace, UTF-8).

Devices ship with a root. A new root is accepted only by :func:`verify_root_update`:
its version is exactly the trusted one plus one (a device that missed several walks the
chain one by one), it carries a threshold of signatures by the *old* root role (so only
the current key holders can rotate) and by its *own* root role (so the new keys are
really held), and it has not expired. Revoking a key is publishing a root without it:
the moment a device accepts that root, the key stops counting.

Nothing here reads a file or the clock; ``now`` is passed in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_sdk.errors import (
    ExpiredError,
    JsonError,
    KeyStoreError,
    RollbackError,
    RootError,
    SignatureError,
)
from edge_sdk.trust._keys import (
    PublicKey,
    Signature,
    SigningKey,
    TrustedKeys,
    canonical_json,
    signatures_from_list,
    verify_signatures,
)
from edge_sdk.untrusted_json import DEFAULT_MAX_DEPTH, JsonLimits, is_int, is_number, parse_json_object

__all__ = [
    "MAX_ROOT_BYTES",
    "MAX_ROOT_DEPTH",
    "ROLES",
    "Role",
    "Root",
    "SignedRoot",
    "load_root",
    "sign_root",
    "update_root_chain",
    "verify_root",
    "verify_root_update",
]

#: The roles a root defines, in the order they are shown.
ROLES = ("root", "bundles", "commands")
#: Upper bound on a signed root document (bounds parsing of hostile input).
MAX_ROOT_BYTES = 64 << 10
#: Deepest JSON nesting a signed root document may have (a key's ``public`` sits at depth 5).
MAX_ROOT_DEPTH = DEFAULT_MAX_DEPTH
_MAX_KEYS = 32
_SCHEMA = 1


@dataclass(frozen=True)
class Role:
    """Key ids allowed to act in one role, and how many of them must sign."""

    keyids: tuple[str, ...]
    threshold: int = 1

    def __post_init__(self) -> None:
        if not is_int(self.threshold) or self.threshold < 1:
            raise RootError(f"role threshold must be a positive integer, got {self.threshold!r}")
        if len(set(self.keyids)) != len(self.keyids):
            raise RootError("a role lists the same key twice")
        if len(self.keyids) < self.threshold:
            raise RootError(f"role threshold {self.threshold} exceeds its {len(self.keyids)} key(s)")

    def to_dict(self) -> dict[str, Any]:
        return {"keyids": sorted(self.keyids), "threshold": self.threshold}

    @classmethod
    def from_dict(cls, d: Any, name: str) -> Role:
        if not isinstance(d, dict) or not isinstance(d.get("keyids"), list):
            raise RootError(f"role {name!r} must be an object with a 'keyids' list")
        if not all(isinstance(k, str) for k in d["keyids"]) or len(d["keyids"]) > _MAX_KEYS:
            raise RootError(f"role {name!r}: keyids must be at most {_MAX_KEYS} strings")
        return cls(tuple(d["keyids"]), d.get("threshold", 1))


@dataclass(frozen=True)
class Root:
    """The trusted root document.

    Attributes:
        version: positive integer; each rotation adds exactly one.
        expires_at: unix seconds; an expired root installs nothing and accepts no update.
        keys: key id -> public key, for every key any role names.
        roles: role name (see :data:`ROLES`) -> :class:`Role`.
        extra: unknown fields from a newer tool, kept and signed, never acted on.
    """

    version: int
    expires_at: float
    keys: Mapping[str, PublicKey]
    roles: Mapping[str, Role]
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not is_int(self.version) or self.version < 1:
            raise RootError(f"root version must be a positive integer, got {self.version!r}")
        if not is_number(self.expires_at) or not math.isfinite(self.expires_at):
            raise RootError("root expires_at must be a finite number")
        if set(self.roles) != set(ROLES):
            raise RootError(f"root must define exactly the roles {', '.join(ROLES)}")
        for keyid, key in self.keys.items():
            if key.keyid != keyid:
                raise RootError(f"root key {keyid!r} does not match its public key (keyid {key.keyid})")
        for name, role in self.roles.items():
            unknown = [k for k in role.keyids if k not in self.keys]
            if unknown:
                raise RootError(f"role {name!r} names unknown key(s) {', '.join(unknown)}")

    def trusted(self, role: str) -> TrustedKeys:
        """The keys and threshold of ``role``, for :func:`~edge_sdk.trust.verify_signatures`."""
        r = self.roles[role]
        return TrustedKeys(tuple(self.keys[k] for k in r.keyids), r.threshold)

    def roles_of(self, keyid: str) -> list[str]:
        """The roles ``keyid`` may act in."""
        return [name for name in ROLES if keyid in self.roles[name].keyids]

    def check_not_expired(self, now: float) -> None:
        """Raises ExpiredError when ``now`` is past :attr:`expires_at` (freeze protection)."""
        if now >= self.expires_at:
            raise ExpiredError(
                f"trusted root v{self.version} expired at {_utc(self.expires_at)} (now {_utc(now)}); "
                "the operator must publish a new root",
                role="root",
                expires_at=self.expires_at,
                now=now,
            )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            schema=_SCHEMA,
            type="root",
            version=self.version,
            expires_at=float(self.expires_at),
            keys={k: {"keytype": "ed25519", "public": v.raw.hex()} for k, v in sorted(self.keys.items())},
            roles={name: self.roles[name].to_dict() for name in ROLES},
        )
        return d

    def to_bytes(self) -> bytes:
        """The canonical bytes that root signatures cover."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> Root:
        """Parse the ``signed`` part of a root document.

        Raises:
            RootError: missing or mistyped fields, unknown schema, inconsistent keys.
        """
        if not isinstance(d, dict):
            raise RootError("root must be a JSON object")
        if d.get("schema") != _SCHEMA or d.get("type") != "root":
            raise RootError(f"not a root document of schema {_SCHEMA}")
        keys_in, roles_in = d.get("keys"), d.get("roles")
        if not isinstance(keys_in, dict) or not isinstance(roles_in, dict) or len(keys_in) > _MAX_KEYS:
            raise RootError(f"root must have 'keys' (at most {_MAX_KEYS}) and 'roles' objects")
        keys = {}
        for keyid, entry in keys_in.items():
            if (
                not isinstance(entry, dict)
                or entry.get("keytype") != "ed25519"
                or not isinstance(entry.get("public"), str)
            ):
                raise RootError(f"root key {keyid!r} must be an ed25519 key with a hex 'public'")
            try:
                keys[keyid] = PublicKey(bytes.fromhex(entry["public"]))
            except (ValueError, KeyStoreError) as exc:
                raise RootError(f"root key {keyid!r} is not a valid public key") from exc
        version, expires = d.get("version"), d.get("expires_at")
        if isinstance(expires, bool) or not isinstance(expires, (int, float)):
            raise RootError("root expires_at must be a number")
        known = {"schema", "type", "version", "expires_at", "keys", "roles"}
        return cls(
            version=version,  # type: ignore[arg-type]  # checked in __post_init__
            expires_at=float(expires),
            keys=keys,
            roles={name: Role.from_dict(r, name) for name, r in roles_in.items()},
            extra={k: v for k, v in d.items() if k not in known},
        )


@dataclass(frozen=True)
class SignedRoot:
    """A root document and its signatures, as stored on disk and sent to devices."""

    root: Root
    signatures: tuple[Signature, ...]

    def to_bytes(self) -> bytes:
        return canonical_json({"signed": self.root.to_dict(), "signatures": [s.to_dict() for s in self.signatures]})

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int = MAX_ROOT_BYTES, max_depth: int = MAX_ROOT_DEPTH) -> SignedRoot:
        """Parse a signed root document; signatures are *not* checked here (see :func:`load_root`).

        Args:
            data: the document as stored or received.
            max_bytes: largest document accepted (checked before decoding).
            max_depth: deepest JSON nesting accepted.

        Returns:
            The root and its signatures, unverified.

        Raises:
            RootError: too large, not JSON, NaN or Infinity, too deep, or not a root document.
            SignatureError: the signature list is malformed or empty.
        """
        try:
            body = parse_json_object(data, JsonLimits(max_bytes, max_depth), what="root document")
        except JsonError as exc:
            raise RootError(exc.message, **exc.details) from exc
        if set(body) != {"signed", "signatures"}:
            raise RootError("root document must be {'signed': ..., 'signatures': [...]}")
        return cls(Root.from_dict(body["signed"]), tuple(signatures_from_list(body["signatures"])))


def sign_root(root: Root, keys: Iterable[SigningKey]) -> SignedRoot:
    """Sign ``root`` with every key given (callers pass the old and the new root keys)."""
    data = root.to_bytes()
    by_id = {k.keyid: k for k in keys}
    return SignedRoot(root, tuple(k.sign(data) for _, k in sorted(by_id.items())))


def load_root(data: bytes, max_bytes: int = MAX_ROOT_BYTES) -> SignedRoot:
    """Parse a signed root document and check it is signed by a threshold of its own root role.

    This is how a stored or shipped root is read back (the device's trust store, the
    host's key ring): its provenance is local, so this catches corruption and hand-edits.
    Expiry is not checked here; a newer root arriving from outside goes through
    :func:`verify_root_update` instead.

    Args:
        data: the document's bytes.
        max_bytes: largest document accepted (checked before decoding).

    Returns:
        The verified signed root.

    Raises:
        RootError: too large, not JSON, or not a root document.
        SignatureError, UntrustedKeyError: not signed by a threshold of its own root keys.
    """
    signed = SignedRoot.from_bytes(data, max_bytes)
    verify_root(signed)
    return signed


def verify_root(signed: SignedRoot) -> Root:
    """Check that a root carries a threshold of signatures by its own root role.

    Used for the root a device ships with (its provenance is the device image; this
    catches corruption and hand-edits). Expiry is not checked here.

    Raises:
        SignatureError, UntrustedKeyError: not signed by a threshold of its own root keys.
    """
    verify_signatures(signed.root.to_bytes(), signed.signatures, signed.root.trusted("root"))
    return signed.root


def verify_root_update(trusted: Root, new_root: bytes | SignedRoot, now: float) -> Root:
    """Accept the next root, or raise the reason it is refused.

    Args:
        trusted: the root the device trusts now.
        new_root: the candidate, as received.
        now: current time (unix seconds), injected.

    Returns:
        The new root, to be trusted from now on.

    Raises:
        RollbackError: its version is not newer than the trusted one.
        RootError: malformed, or a version gap (send the missing roots first, in order).
        SignatureError, UntrustedKeyError: not signed by a threshold of the old root role
            and of its own root role.
        ExpiredError: the new root has already expired.
    """
    signed = new_root if isinstance(new_root, SignedRoot) else SignedRoot.from_bytes(new_root)
    new = signed.root
    data = new.to_bytes()
    try:
        verify_signatures(data, signed.signatures, trusted.trusted("root"))
    except SignatureError as exc:
        raise type(exc)(
            f"new root v{new.version} lacks the current root keys' signatures: {exc.message}", **exc.details
        ) from exc
    try:
        verify_signatures(data, signed.signatures, new.trusted("root"))
    except SignatureError as exc:
        raise type(exc)(
            f"new root v{new.version} lacks its own root keys' signatures: {exc.message}", **exc.details
        ) from exc
    if new.version <= trusted.version:
        raise RollbackError(
            f"root v{new.version} is not newer than the trusted root v{trusted.version}",
            offered=new.version,
            installed=trusted.version,
        )
    if new.version != trusted.version + 1:
        raise RootError(
            f"root v{new.version} skips versions: the trusted root is v{trusted.version}, "
            f"so v{trusted.version + 1} must come first",
            offered=new.version,
            trusted=trusted.version,
        )
    if now >= new.expires_at:
        raise ExpiredError(
            f"new root v{new.version} expired at {_utc(new.expires_at)} (now {_utc(now)})",
            role="root",
            expires_at=new.expires_at,
            now=now,
        )
    return new


def update_root_chain(trusted: Root, chain: Sequence[bytes], now: float) -> Root:
    """Apply successive root documents in order, skipping ones not newer than ``trusted``.

    Raises:
        the first refusal of :func:`verify_root_update` for a root newer than the trusted one.
    """
    for data in chain:
        signed = SignedRoot.from_bytes(data)
        if signed.root.version <= trusted.version:
            continue
        trusted = verify_root_update(trusted, signed, now)
    return trusted


def _utc(unix_s: float) -> str:
    """A time in messages people read: ``2025-03-01 13:05:09 UTC``, not epoch seconds."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_s))
