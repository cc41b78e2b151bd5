"""Signed bundles: pack a model into one file, verify it, unpack it safely.

A bundle is a manifest (what is inside, with sizes and hashes, expiry and version),
signatures over the exact manifest bytes, and the payload files. :func:`verify_bundle`
runs every check in a fixed order and either returns a :class:`VerifiedBundle` or raises
the specific :class:`~edge_sdk.errors.UntrustedInputError` for the first check that failed:

1. archive structure (regular files only, safe names, limits);
2. signatures over the manifest bytes, by keys the caller trusts, up to the threshold;
3. manifest content (schema, fields, safe paths);
4. expiry against the caller's clock (freeze protection);
5. the signed command's expectation: same name and version (when the caller has one);
6. target constraints against the device's facts (architecture, memory, accelerators);
7. version newer than the one installed (rollback protection), unless the signed command
   explicitly names this older version as a rollback;
8. payload set equals the manifest's file list (mix-and-match protection);
9. every file's size and sha256, read with the declared size as a hard bound.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.bundle.archive import BundleLimits, BundleReader, write_bundle
from edge_sdk.bundle.manifest import (
    DeviceFacts,
    FileEntry,
    HealthSpec,
    Manifest,
    SparseLayer,
    SparseSpec,
    Target,
    TensorInfo,
    canonical_json,
)
from edge_sdk.errors import (
    ConfigError,
    ExpiredError,
    FileSetMismatchError,
    HashMismatchError,
    ManifestError,
    RollbackError,
    StorageError,
)
from edge_sdk.trust import (
    SigningKey,
    TrustedKeys,
    decode_signatures,
    encode_signatures,
    verify_signatures,
)

__all__ = [
    "BundleLimits",
    "BundleSpec",
    "DeviceFacts",
    "Expected",
    "FileEntry",
    "HealthSpec",
    "Manifest",
    "SparseLayer",
    "SparseSpec",
    "Target",
    "TensorInfo",
    "VerifiedBundle",
    "canonical_json",
    "file_sha256",
    "pack_bundle",
    "verify_bundle",
]

_DEFAULT_TTL_S = 30 * 24 * 3600.0
_DEFAULT_LIMITS = BundleLimits()


def file_sha256(path: Path) -> tuple[str, int]:
    """sha256 hex digest and size of a local file."""
    digest = hashlib.sha256()
    n = 0
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
                n += len(block)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}", path=str(path)) from exc
    return digest.hexdigest(), n


@dataclass(frozen=True)
class BundleSpec:
    """What to pack.

    Attributes:
        name: bundle name, stable across versions.
        version: positive integer, higher than any version devices already run.
        runtime: ``onnxruntime`` or ``litert``.
        model: local model file; packed under its own file name.
        precision: what the model computes in, for reports (``fp32``, ``int8``...).
        inputs: model inputs, for the device's benchmark and health check.
        sample_input: optional local ``.npz`` with one sample batch for the health check.
        health: optional health-check budget the device enforces (latency).
        target: optional device constraints (architecture, memory, accelerators).
        ttl_s: seconds until the manifest expires.
        sparse: optional sparse layers; ``files`` must then carry its weights and dense model.
        execution: optional pin of how devices run the model (``auto``, ``dense``, ``sparse``).
        files: further payload files, bundle path -> local file (the sparse weights and
            dense model, for instance).
    """

    name: str
    version: int
    runtime: str
    model: Path
    precision: str = "fp32"
    inputs: tuple[TensorInfo, ...] = ()
    sample_input: Path | None = None
    health: HealthSpec | None = None
    target: Target | None = None
    ttl_s: float = _DEFAULT_TTL_S
    extra: dict[str, Any] = field(default_factory=dict)
    sparse: SparseSpec | None = None
    execution: str | None = None
    files: dict[str, Path] = field(default_factory=dict)


def pack_bundle(spec: BundleSpec, signing_keys: Sequence[SigningKey], out: Path, now: float) -> Manifest:
    """Build, sign and write a bundle. The output appears whole or not at all.

    Args:
        spec: what to pack.
        signing_keys: keys that sign the manifest (one or more, for thresholds).
        out: bundle file to write.
        now: creation time (unix seconds); expiry is ``now + spec.ttl_s``.

    Returns:
        The manifest that was signed.

    Raises:
        ConfigError: no signing key, or the model and sample share a file name.
        ManifestError: the spec does not make a valid manifest.
        StorageError: inputs unreadable or output unwritable.
    """
    if not signing_keys:
        raise ConfigError("a bundle needs at least one signing key")
    files = {Path(spec.model).name: Path(spec.model)}
    sample_name = None
    if spec.sample_input is not None:
        sample_name = "sample_input.npz"
        if sample_name in files:
            raise ConfigError(f"model file may not be called {sample_name}")
        files[sample_name] = Path(spec.sample_input)
    for name, src in spec.files.items():
        if name in files:
            raise ConfigError(f"bundle file {name!r} is given twice")
        files[name] = Path(src)
    entries = []
    for name, src in sorted(files.items()):
        digest, size = file_sha256(src)
        entries.append(FileEntry(name, size, digest))
    manifest = Manifest(
        name=spec.name,
        version=spec.version,
        created_at=float(now),
        expires_at=float(now) + float(spec.ttl_s),
        runtime=spec.runtime,
        model=Path(spec.model).name,
        precision=spec.precision,
        files=tuple(entries),
        inputs=tuple(spec.inputs),
        sample_input=sample_name,
        health=spec.health,
        target=spec.target,
        sparse=spec.sparse,
        execution=spec.execution,
        extra=dict(spec.extra),
    )
    manifest_bytes = manifest.to_bytes()
    signatures = encode_signatures(k.sign(manifest_bytes) for k in signing_keys)
    write_bundle(Path(out), manifest_bytes, signatures, files)
    return manifest


@dataclass(frozen=True)
class Expected:
    """What a signed command said the bundle is; the bundle must agree.

    Attributes:
        name, version: the bundle the command names.
        rollback: the command explicitly allows installing this version even though it
            is not newer than the one accepted before.
    """

    name: str
    version: int
    rollback: bool = False


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every check.

    Attributes:
        manifest: the signed manifest.
        signers: key ids whose signatures verified.
        checks: one line per check that passed, in order, for humans.
    """

    manifest: Manifest
    signers: frozenset[str]
    checks: tuple[str, ...]


def verify_bundle(
    path: Path,
    trusted: TrustedKeys,
    now: float,
    *,
    installed_version: int | Callable[[str], int | None] | None = None,
    limits: BundleLimits = _DEFAULT_LIMITS,
    extract_to: Path | None = None,
    device: DeviceFacts | None = None,
    expect: Expected | None = None,
) -> VerifiedBundle:
    """Run every check on a bundle file; optionally extract the payload while hashing it.

    Args:
        path: bundle file.
        trusted: keys that may sign bundles, and the threshold.
        now: current time (unix seconds), injected.
        installed_version: version of the same bundle name already accepted, if any; or a
            lookup from bundle name to that version, consulted only once the manifest's
            signature has verified (so the name it is asked about is authentic).
        limits: size and count limits.
        extract_to: an existing empty staging directory; payload files are written there
            as they are hashed. The caller removes it when verification fails.
        device: the device's facts, checked against the manifest's target constraints.
        expect: what the signed command names; the manifest must match it, and a
            rollback it names explicitly is allowed.

    Returns:
        The verified bundle.

    Raises:
        BundleFormatError, SignatureError, UntrustedKeyError, ManifestError, ExpiredError,
        TargetMismatchError, RollbackError, FileSetMismatchError, HashMismatchError: the
        first check that failed.
        StorageError: the file cannot be read or the staging directory written.
    """
    checks = []
    with BundleReader(Path(path), limits) as reader:
        checks.append(f"archive: {len(reader.payload)} payload file(s), all regular, safe names, within limits")
        signatures = decode_signatures(reader.signatures_bytes, limits.max_signatures_bytes)
        signers = verify_signatures(reader.manifest_bytes, signatures, trusted)
        checks.append(
            f"signature: {len(signers)} of threshold {trusted.threshold} by trusted key(s) {', '.join(sorted(signers))}"
        )
        manifest = Manifest.from_bytes(reader.manifest_bytes, limits.max_manifest_bytes, limits.max_manifest_depth)
        checks.append(f"manifest: {manifest.name} v{manifest.version}, runtime {manifest.runtime}")
        if now >= manifest.expires_at:
            raise ExpiredError(
                f"manifest of {manifest.name} v{manifest.version} expired at {_utc(manifest.expires_at)} "
                f"(now {_utc(now)})",
                expires_at=manifest.expires_at,
                now=now,
            )
        checks.append(f"expiry: valid for another {(manifest.expires_at - now) / 3600:.1f} h")
        if expect is not None:
            if (manifest.name, manifest.version) != (expect.name, expect.version):
                raise ManifestError(
                    f"bundle is {manifest.name} v{manifest.version}, but the signed command names "
                    f"{expect.name} v{expect.version}",
                    offered=f"{manifest.name} v{manifest.version}",
                    expected=f"{expect.name} v{expect.version}",
                )
            checks.append(f"command: the signed command names {expect.name} v{expect.version}")
        if manifest.target is None:
            checks.append("target: any device")
        elif device is None:
            t = manifest.target
            checks.append(
                f"target: {', '.join(t.arch) or 'any arch'}, at least {t.min_memory_bytes} bytes of memory, "
                f"accelerators {', '.join(t.accelerators) or 'none needed'} (no device to check against)"
            )
        else:
            checks.append(f"target: {manifest.target.check(device)}")
        if callable(installed_version):
            installed_version = installed_version(manifest.name)
        if installed_version is not None and expect is not None and expect.rollback:
            checks.append(
                f"rollback: v{manifest.version} after v{installed_version}, "
                "explicitly allowed by a signed rollback command"
            )
        elif installed_version is not None:
            if manifest.version <= installed_version:
                raise RollbackError(
                    f"{manifest.name} v{manifest.version} is not newer than installed v{installed_version}",
                    offered=manifest.version,
                    installed=installed_version,
                )
            checks.append(f"rollback: v{manifest.version} is newer than installed v{installed_version}")
        else:
            checks.append("rollback: nothing of this name installed")
        declared = {f.path for f in manifest.files}
        present = set(reader.payload)
        if present - declared:
            raise FileSetMismatchError(
                f"bundle carries file(s) not in the manifest: {', '.join(sorted(present - declared))}",
                extra_files=sorted(present - declared),
            )
        if declared - present:
            raise FileSetMismatchError(
                f"bundle lacks file(s) the manifest lists: {', '.join(sorted(declared - present))}",
                missing_files=sorted(declared - present),
            )
        checks.append("files: payload matches the manifest's file list exactly")
        for entry in manifest.files:
            if extract_to is not None:
                digest, size = reader.extract_member(entry.path, Path(extract_to), entry.size)
            else:
                digest, size = reader.hash_member(entry.path, entry.size)
            if size != entry.size or digest != entry.sha256:
                raise HashMismatchError(
                    f"file {entry.path!r} does not match the manifest "
                    f"(sha256 {digest[:16]}..., expected {entry.sha256[:16]}...)",
                    path=entry.path,
                    expected=entry.sha256,
                    actual=digest,
                )
        checks.append(f"hashes: sha256 and size of {len(manifest.files)} file(s) match")
    return VerifiedBundle(manifest, signers, tuple(checks))


def _utc(unix_s: float) -> str:
    """A time in messages people read: ``2025-03-01 13:05:09 UTC``, not epoch seconds."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_s))
