"""Signed bundles: pack a model into one file, verify it, unpack it safely.

A bundle is a manifest (what is inside, with sizes and hashes, expiry and version),
signatures over the exact manifest bytes, and the payload files. :func:`verify_bundle`
runs every check in a fixed order and either returns a :class:`VerifiedBundle` or raises
the specific :class:`~edge_sdk.errors.UntrustedInputError` for the first check that failed:

1. archive structure (regular files only, safe names, limits);
2. signatures over the manifest bytes, by keys the caller trusts, up to the threshold;
3. manifest content (schema, fields, safe paths);
4. expiry against the caller's clock (freeze protection);
5. the signed command's expectation: same name and version, and the same content when
   the command's offer names it (when the caller has one);
6. target constraints against the device's facts (architecture, memory, accelerators);
7. version newer than the floor (rollback protection, :mod:`edge_sdk.bundle.admission`),
   unless the signed command explicitly names this older version as a rollback; and never
   other content under a version number that already ran on the device;
8. recipient (encrypted bundles): this device's key is one the bundle is encrypted for;
9. payload set equals the manifest's file list (mix-and-match protection);
10. every file's size and sha256, read with the declared size as a hard bound;
11. decryption (encrypted bundles, when extracting): only now, with every hash of the
    ciphertext checked, is the payload decrypted into the staging directory, chunk by
    chunk, each chunk authenticated (see :mod:`edge_sdk.bundle.encryption`).

A device that runs version N may receive version N+1 as a delta instead
(:mod:`edge_sdk.bundle.delta`): the bundle file is rebuilt from N's installed slot and
then goes through these same checks, so a delta adds no trust of its own.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.bundle.admission import VersionHistory, check_version, content_digest
from edge_sdk.bundle.archive import BundleLimits, BundleReader, write_bundle
from edge_sdk.bundle.encryption import (
    DEFAULT_CHUNK_SIZE,
    EncryptedFile,
    Encryption,
    FileDecryptor,
    encrypt_stream,
    new_payload_key,
    new_salt,
)
from edge_sdk.bundle.manifest import (
    ENCRYPTED_MANIFEST_SCHEMA,
    MANIFEST_SCHEMA,
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
    NotRecipientError,
    RollbackError,
    StorageError,
)
from edge_sdk.trust import (
    RecipientKey,
    RecipientPublicKey,
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
    "Encryption",
    "Expected",
    "FileEntry",
    "HealthSpec",
    "Manifest",
    "SparseLayer",
    "SparseSpec",
    "Target",
    "TensorInfo",
    "VerifiedBundle",
    "VersionHistory",
    "canonical_json",
    "content_digest",
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
        encrypt_to: recipient keys; when given, every payload file is encrypted under a
            fresh content key wrapped for each of them (:mod:`edge_sdk.bundle.encryption`).
        encryption_chunk_size: plaintext bytes per encrypted chunk.
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
    encrypt_to: tuple[RecipientPublicKey, ...] = ()
    encryption_chunk_size: int = DEFAULT_CHUNK_SIZE


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
    if not spec.encrypt_to:
        entries = []
        for name, src in sorted(files.items()):
            digest, size = file_sha256(src)
            entries.append(FileEntry(name, size, digest))
        return _sign_and_write(spec, sample_name, tuple(entries), None, signing_keys, out, now, files)
    # Ciphertext is written next to the output (same file system), one chunk in memory at a
    # time, and removed with the directory; no plaintext copy is made.
    with tempfile.TemporaryDirectory(prefix=".edge-encrypt-", dir=Path(out).parent) as tmp:
        encryption, sealed_entries, sealed = _encrypt_files(spec, files, Path(tmp))
        return _sign_and_write(spec, sample_name, sealed_entries, encryption, signing_keys, out, now, sealed)


def _encrypt_files(
    spec: BundleSpec, files: dict[str, Path], tmp: Path
) -> tuple[Encryption, tuple[FileEntry, ...], dict[str, Path]]:
    """Encrypt every payload file into ``tmp`` under one fresh content key.

    Returns:
        The manifest's ``encryption`` field, the file entries of the ciphertext, and
        bundle path -> ciphertext file.
    """
    payload_key = new_payload_key(tuple(spec.encrypt_to))
    encrypted, entries, sealed = [], [], {}
    for i, (name, src) in enumerate(sorted(files.items())):
        target = tmp / f"{i}.sealed"
        try:
            with open(src, "rb") as fin, open(target, "wb") as fout:
                entry = EncryptedFile(name, os.fstat(fin.fileno()).st_size, new_salt())
                digest, size = encrypt_stream(fin, fout, payload_key.content_key, entry, spec.encryption_chunk_size)
        except OSError as exc:
            raise StorageError(f"cannot encrypt {src}: {exc.strerror}", path=str(src)) from exc
        encrypted.append(entry)
        entries.append(FileEntry(name, size, digest))
        sealed[name] = target
    encryption = Encryption(payload_key.recipients, tuple(encrypted), spec.encryption_chunk_size)
    return encryption, tuple(entries), sealed


def _sign_and_write(
    spec: BundleSpec,
    sample_name: str | None,
    entries: tuple[FileEntry, ...],
    encryption: Encryption | None,
    signing_keys: Sequence[SigningKey],
    out: Path,
    now: float,
    files: dict[str, Path],
) -> Manifest:
    manifest = Manifest(
        name=spec.name,
        version=spec.version,
        created_at=float(now),
        expires_at=float(now) + float(spec.ttl_s),
        runtime=spec.runtime,
        model=Path(spec.model).name,
        precision=spec.precision,
        files=entries,
        inputs=tuple(spec.inputs),
        sample_input=sample_name,
        health=spec.health,
        target=spec.target,
        sparse=spec.sparse,
        execution=spec.execution,
        encryption=encryption,
        schema=MANIFEST_SCHEMA if encryption is None else ENCRYPTED_MANIFEST_SCHEMA,
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
            is not newer than the floor.
        content: the :func:`~edge_sdk.bundle.admission.content_digest` the command's offer
            names, or None when it names none (older hosts).
    """

    name: str
    version: int
    rollback: bool = False
    content: str | None = None


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
    installed_version: int | VersionHistory | Callable[[str], int | VersionHistory | None] | None = None,
    limits: BundleLimits = _DEFAULT_LIMITS,
    extract_to: Path | None = None,
    device: DeviceFacts | None = None,
    expect: Expected | None = None,
    decrypt_with: RecipientKey | None = None,
) -> VerifiedBundle:
    """Run every check on a bundle file; optionally extract the payload while hashing it.

    Args:
        path: bundle file.
        trusted: keys that may sign bundles, and the threshold.
        now: current time (unix seconds), injected.
        installed_version: the version of the same bundle name installed, if any (it is
            then the floor); or the device's :class:`VersionHistory` of that name (floor,
            installed version, versions that ran with their content); or a lookup from
            bundle name to either, consulted only once the manifest's signature has
            verified (so the name it is asked about is authentic).
        limits: size and count limits.
        extract_to: an existing empty staging directory; payload files are written there
            as they are hashed. The caller removes it when verification fails.
        device: the device's facts, checked against the manifest's target constraints.
        expect: what the signed command names; the manifest must match it, and a
            rollback it names explicitly is allowed.
        decrypt_with: this device's X25519 key. An encrypted bundle is extracted only
            with it, decrypted once every ciphertext hash has matched; without
            ``extract_to`` the ciphertext is checked and not decrypted.

    Returns:
        The verified bundle.

    Raises:
        BundleFormatError, SignatureError, UntrustedKeyError, ManifestError, ExpiredError,
        TargetMismatchError, RollbackError, NotRecipientError, FileSetMismatchError,
        HashMismatchError, DecryptionError: the first check that failed.
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
            if expect.content is not None and expect.content != content_digest(manifest.files):
                raise ManifestError(
                    f"bundle {manifest.name} v{manifest.version} does not hold the content the signed command "
                    f"describes (content sha256 {content_digest(manifest.files)[:12]}..., "
                    f"command {expect.content[:12]}...)",
                    offered=content_digest(manifest.files),
                    expected=expect.content,
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
        history = installed_version(manifest.name) if callable(installed_version) else installed_version
        checks.append(_check_rollback(manifest, history, expect))
        content_key = None
        if manifest.encryption is not None:
            content_key, line = _recipient_check(manifest.encryption, decrypt_with, extract_to is not None)
            checks.append(line)
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
            if extract_to is not None and content_key is None:
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
        if content_key is not None and manifest.encryption is not None and extract_to is not None:
            encryption = manifest.encryption
            plain = 0
            for entry in manifest.files:
                decryptor = FileDecryptor(content_key, encryption.file(entry.path), encryption.chunk_size)
                plain += reader.decrypt_member(entry.path, Path(extract_to), entry.size, decryptor)
            checks.append(f"decryption: {len(manifest.files)} file(s), {plain} bytes, every chunk authenticated")
    return VerifiedBundle(manifest, signers, tuple(checks))


def _check_rollback(manifest: Manifest, history: int | VersionHistory | None, expect: Expected | None) -> str:
    """Rollback protection: the check's line, or the :class:`RollbackError` that refuses the bundle.

    An integer is the installed version and the floor (``edgectl verify --installed-version``);
    a :class:`VersionHistory` is a device's full record (see :mod:`edge_sdk.bundle.admission`).
    """
    rollback = expect is not None and expect.rollback
    if isinstance(history, VersionHistory):
        return check_version(
            history, manifest.name, manifest.version, content_digest(manifest.files), rollback=rollback
        )
    if history is None:
        return "rollback: nothing of this name installed"
    if rollback:
        return f"rollback: v{manifest.version} after v{history}, explicitly allowed by a signed rollback command"
    if manifest.version <= history:
        raise RollbackError(
            f"{manifest.name} v{manifest.version} is not newer than installed v{history}",
            offered=manifest.version,
            installed=history,
        )
    return f"rollback: v{manifest.version} is newer than installed v{history}"


def _recipient_check(encryption: Encryption, key: RecipientKey | None, extracting: bool) -> tuple[bytes | None, str]:
    """Whether this device can open an encrypted bundle; the content key when it must.

    Returns:
        The content key (``None`` when not extracting), and the check's line.

    Raises:
        NotRecipientError: extracting, and ``key`` is absent or not a recipient.
        DecryptionError: the stanza for ``key`` does not open.
    """
    keyids = ", ".join(encryption.keyids)
    if not extracting:
        return (
            None,
            f"encryption: payload encrypted (AES-256-GCM) for key(s) {keyids}; ciphertext checked, not decrypted",
        )
    if key is None:
        raise NotRecipientError(
            f"bundle is encrypted for key(s) {keyids}, and this device has no decryption key",
            recipients=list(encryption.keyids),
        )
    content_key = encryption.content_key(key)
    return (
        content_key,
        f"recipient: encrypted for {len(encryption.keyids)} key(s), this device's key {key.keyid} among them",
    )


def _utc(unix_s: float) -> str:
    """A time in messages people read: ``2025-03-01 13:05:09 UTC``, not epoch seconds."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_s))
