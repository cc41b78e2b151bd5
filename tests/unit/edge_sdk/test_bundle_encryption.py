"""Encrypted bundles: recipient keys, the content-key wrap, the chunk stream, and verify_bundle's order.

Attacks are built as an attacker would: real bundles, re-signed with the trusted key
where the attack is about the content rather than the signature.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from edge_sdk.bundle import BundleSpec, Manifest, pack_bundle, verify_bundle
from edge_sdk.bundle.archive import BundleReader, write_bundle
from edge_sdk.bundle.encryption import (
    EncryptedFile,
    FileDecryptor,
    ciphertext_size,
    encrypt_stream,
    new_payload_key,
)
from edge_sdk.errors import (
    DecryptionError,
    HashMismatchError,
    KeyStoreError,
    ManifestError,
    NotRecipientError,
    TargetMismatchError,
)
from edge_sdk.trust import (
    RecipientKey,
    RecipientPublicKey,
    SigningKey,
    TrustedKeys,
    encode_signatures,
    unwrap_content_key,
    wrap_content_key,
)

NOW = 1_700_000_000.0
WEIGHTS = b"\x13\x37SECRET-WEIGHTS" * 4096  # 68 KiB: more than one 64 KiB chunk
CHUNK = 1024


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def trusted(key: SigningKey) -> TrustedKeys:
    return TrustedKeys((key.public_key,))


@pytest.fixture(scope="module")
def device() -> RecipientKey:
    return RecipientKey.generate()


def _pack(tmp: Path, key: SigningKey, recipients: tuple[RecipientPublicKey, ...], chunk: int = CHUNK) -> Path:
    model = tmp / "model.onnx"
    model.write_bytes(WEIGHTS)
    sample = tmp / "s.npz"
    sample.write_bytes(b"sample" * 10)
    out = tmp / "enc.edge"
    spec = BundleSpec("enc", 1, "onnxruntime", model, sample_input=sample, encrypt_to=recipients)
    pack_bundle(
        BundleSpec(**{**spec.__dict__, "encryption_chunk_size": chunk}),
        [key],
        out,
        NOW,
    )
    return out


def _unpack(bundle: Path, tmp: Path) -> tuple[Manifest, bytes, dict[str, bytes]]:
    with BundleReader(bundle) as reader:
        payload = {rel: b"".join(reader.iter_member(rel, info.size)) for rel, info in reader.payload.items()}
        return Manifest.from_bytes(reader.manifest_bytes, 1 << 20), reader.manifest_bytes, payload


def _repack(tmp: Path, key: SigningKey, manifest: Manifest, payload: dict[str, bytes], name: str) -> Path:
    files = {}
    for rel, data in payload.items():
        p = tmp / f"src-{name}-{rel.replace('/', '_')}"
        p.write_bytes(data)
        files[rel] = p
    mb = manifest.to_bytes()
    out = tmp / f"{name}.edge"
    write_bundle(out, mb, encode_signatures([key.sign(mb)]), files)
    return out


# --- keys and the wrap ------------------------------------------------------------------


def test_recipient_key_forms_round_trip(device: RecipientKey) -> None:
    assert RecipientPublicKey.from_file_bytes(device.public.to_pem()) == device.public
    assert RecipientPublicKey.from_file_bytes(device.public.to_text().encode() + b"\n") == device.public
    assert RecipientPublicKey.from_text(device.public.to_text()).keyid == device.keyid
    assert RecipientKey.from_pem(device.to_pem()).keyid == device.keyid
    assert len(device.keyid) == 32


def test_recipient_key_files_of_the_wrong_kind_are_refused(key: SigningKey) -> None:
    with pytest.raises(KeyStoreError, match="not an X25519"):
        RecipientPublicKey.from_file_bytes(key.public_key.to_pem())
    with pytest.raises(KeyStoreError):
        RecipientPublicKey.from_file_bytes(b"hello")
    with pytest.raises(KeyStoreError):
        RecipientPublicKey.from_text("x25519:AAAA")


def test_wrap_opens_only_with_the_recipients_key(device: RecipientKey) -> None:
    content = os.urandom(32)
    stanza = wrap_content_key(content, device.public)
    assert unwrap_content_key(stanza, device) == content
    other = RecipientKey.generate()
    with pytest.raises(DecryptionError):
        unwrap_content_key(stanza, other)
    # A stanza that claims the other key's id still does not open with it.
    forged = type(stanza)(other.keyid, stanza.ephemeral, stanza.wrapped)
    with pytest.raises(DecryptionError, match="does not open"):
        unwrap_content_key(forged, other)
    flipped = type(stanza)(stanza.keyid, stanza.ephemeral, bytes([stanza.wrapped[0] ^ 1]) + stanza.wrapped[1:])
    with pytest.raises(DecryptionError):
        unwrap_content_key(flipped, device)


# --- the chunk stream -------------------------------------------------------------------


def _seal(plain: bytes, chunk: int = CHUNK) -> tuple[bytes, bytes, EncryptedFile]:
    content = os.urandom(32)
    entry = EncryptedFile("model.onnx", len(plain), os.urandom(16))
    out = io.BytesIO()
    _, size = encrypt_stream(io.BytesIO(plain), out, content, entry, chunk)
    assert size == len(out.getvalue()) == ciphertext_size(len(plain), chunk)
    return content, out.getvalue(), entry


def _open(content: bytes, sealed: bytes, entry: EncryptedFile, block: int, chunk: int = CHUNK) -> bytes:
    dec = FileDecryptor(content, entry, chunk)
    parts = []
    for i in range(0, len(sealed), block):
        parts.extend(dec.update(memoryview(sealed)[i : i + block]))
    dec.finalize()
    return b"".join(parts)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK + 7])
@pytest.mark.parametrize("block", [1, 100, CHUNK + 16, 1 << 20])
def test_stream_round_trips_in_any_block_size(size: int, block: int) -> None:
    plain = os.urandom(size)
    content, sealed, entry = _seal(plain)
    assert _open(content, sealed, entry, block) == plain


def test_stream_detects_reordered_chunks() -> None:
    content, sealed, entry = _seal(os.urandom(3 * CHUNK))
    c = CHUNK + 16
    swapped = sealed[c : 2 * c] + sealed[:c] + sealed[2 * c :]
    with pytest.raises(DecryptionError, match="chunk 0"):
        _open(content, swapped, entry, 4096)


def test_stream_detects_truncation_at_a_chunk_boundary() -> None:
    content, sealed, entry = _seal(os.urandom(3 * CHUNK))
    # Drop the final chunk and claim a shorter file: the new last chunk lacks the final flag.
    short = EncryptedFile(entry.path, 2 * CHUNK, entry.salt)
    with pytest.raises(DecryptionError, match="chunk 1"):
        _open(content, sealed[: 2 * (CHUNK + 16)], short, 4096)
    # Same length claim, bytes missing: finalize says truncated.
    with pytest.raises(DecryptionError, match="truncated"):
        _open(content, sealed[: 2 * (CHUNK + 16)], entry, 4096)


def test_stream_refuses_bytes_after_the_final_chunk_and_altered_bytes() -> None:
    content, sealed, entry = _seal(os.urandom(CHUNK + 5))
    with pytest.raises(DecryptionError, match="after its final chunk"):
        _open(content, sealed + b"x", entry, 4096)
    altered = bytearray(sealed)
    altered[CHUNK + 20] ^= 0x40
    with pytest.raises(DecryptionError):
        _open(content, bytes(altered), entry, 4096)


def test_stream_is_bound_to_the_file_path() -> None:
    content, sealed, entry = _seal(os.urandom(100))
    with pytest.raises(DecryptionError):
        _open(content, sealed, EncryptedFile("sample_input.npz", entry.size, entry.salt), 4096)


# --- packing and verify_bundle ----------------------------------------------------------


def test_packed_bundle_holds_only_ciphertext_and_names_its_recipients(
    tmp_path: Path, key: SigningKey, device: RecipientKey
) -> None:
    other = RecipientKey.generate()
    bundle = _pack(tmp_path, key, (device.public, other.public))
    raw = bundle.read_bytes()
    assert b"SECRET-WEIGHTS" not in raw
    manifest, _, payload = _unpack(bundle, tmp_path)
    assert manifest.schema == 2 and manifest.encryption is not None
    assert set(manifest.encryption.keyids) == {device.keyid, other.keyid}
    for entry in manifest.files:  # the signed hashes are of the ciphertext
        assert len(payload[entry.path]) == entry.size
        assert manifest.encryption.file(entry.path).size < entry.size


def test_each_recipient_decrypts_into_staging(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    a, b = RecipientKey.generate(), RecipientKey.generate()
    bundle = _pack(tmp_path, key, (a.public, b.public))
    for who in (a, b):
        staging = tmp_path / f"stage-{who.keyid}"
        staging.mkdir()
        result = verify_bundle(bundle, trusted, NOW, extract_to=staging, decrypt_with=who)
        assert (staging / "model.onnx").read_bytes() == WEIGHTS
        assert (staging / "model.onnx").stat().st_mode & 0o077 == 0
        assert any(c.startswith("decryption:") for c in result.checks)
        names = [c.split(":")[0] for c in result.checks]
        assert names.index("recipient") < names.index("hashes") < names.index("decryption")


def test_verify_without_extracting_checks_the_ciphertext_only(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys, device: RecipientKey
) -> None:
    bundle = _pack(tmp_path, key, (device.public,))
    result = verify_bundle(bundle, trusted, NOW)
    assert any(c.startswith("encryption:") and device.keyid in c for c in result.checks)


def test_non_recipient_is_refused_before_any_file_is_written(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys, device: RecipientKey
) -> None:
    bundle = _pack(tmp_path, key, (device.public,))
    stranger = RecipientKey.generate()
    staging = tmp_path / "stage"
    staging.mkdir()
    with pytest.raises(NotRecipientError, match=stranger.keyid) as info:
        verify_bundle(bundle, trusted, NOW, extract_to=staging, decrypt_with=stranger)
    assert isinstance(info.value, TargetMismatchError)
    assert info.value.details["recipients"] == [device.keyid]
    assert list(staging.iterdir()) == []
    with pytest.raises(NotRecipientError, match="no decryption key"):
        verify_bundle(bundle, trusted, NOW, extract_to=staging)


def test_tampered_ciphertext_is_refused_by_its_hash_before_decrypting(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys, device: RecipientKey
) -> None:
    bundle = _pack(tmp_path, key, (device.public,))
    manifest, _, payload = _unpack(bundle, tmp_path)
    data = bytearray(payload["model.onnx"])
    data[100] ^= 1
    payload["model.onnx"] = bytes(data)
    tampered = _repack(tmp_path, key, manifest, payload, "tampered")
    staging = tmp_path / "stage"
    staging.mkdir()
    with pytest.raises(HashMismatchError):
        verify_bundle(tampered, trusted, NOW, extract_to=staging, decrypt_with=device)
    assert list(staging.iterdir()) == []


def test_re_signed_ciphertext_swap_fails_decryption(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys, device: RecipientKey
) -> None:
    """Even a signer who swaps ciphertext between files (re-hashed, re-signed) cannot get it decrypted."""
    bundle = _pack(tmp_path, key, (device.public,))
    manifest, _, payload = _unpack(bundle, tmp_path)
    data = bytearray(payload["model.onnx"])
    data[5] ^= 1
    payload["model.onnx"] = bytes(data)
    from edge_sdk.bundle import FileEntry, file_sha256

    src = tmp_path / "m"
    src.write_bytes(payload["model.onnx"])
    digest, size = file_sha256(src)
    files = tuple(FileEntry(f.path, size, digest) if f.path == "model.onnx" else f for f in manifest.files)
    forged = Manifest(**{**manifest.__dict__, "files": files})
    out = _repack(tmp_path, key, forged, payload, "forged")
    staging = tmp_path / "stage"
    staging.mkdir()
    with pytest.raises(DecryptionError, match="chunk 0"):
        verify_bundle(out, trusted, NOW, extract_to=staging, decrypt_with=device)


def test_manifest_encryption_field_is_validated(tmp_path: Path, key: SigningKey, device: RecipientKey) -> None:
    bundle = _pack(tmp_path, key, (device.public,))
    _, raw, _ = _unpack(bundle, tmp_path)
    body = json.loads(raw)
    assert Manifest.from_dict(body).to_bytes() == raw
    wrong_size = json.loads(raw)
    wrong_size["encryption"]["files"][0]["size"] += 1
    with pytest.raises(ManifestError, match="ciphertext"):
        Manifest.from_dict(wrong_size)
    plain_schema = json.loads(raw)
    plain_schema["schema"] = 1
    with pytest.raises(ManifestError, match="schema 2"):
        Manifest.from_dict(plain_schema)
    unknown = json.loads(raw)
    unknown["encryption"]["algorithm"] = "rot13"
    with pytest.raises(ManifestError, match="unknown algorithm"):
        Manifest.from_dict(unknown)
    twice = json.loads(raw)
    twice["encryption"]["recipients"] *= 2
    with pytest.raises(ManifestError, match="twice"):
        Manifest.from_dict(twice)


def test_payload_key_needs_distinct_recipients(device: RecipientKey) -> None:
    with pytest.raises(ManifestError):
        new_payload_key(())
    with pytest.raises(ManifestError, match="twice"):
        new_payload_key((device.public, device.public))
    assert "content_key" not in repr(new_payload_key((device.public,)))
