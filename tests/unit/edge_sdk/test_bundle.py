"""edge_sdk.bundle: manifest model, canonical bytes, pack and hostile-input verification.

Every attack here is built the way an attacker would build it: a real tar archive with
canonical headers (so only the check under test can catch it) and, where the attack is
about content rather than signatures, a manifest re-signed with the trusted key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge_sdk.bundle import (
    BundleLimits,
    BundleSpec,
    DeviceFacts,
    Expected,
    FileEntry,
    Manifest,
    Target,
    TensorInfo,
    canonical_json,
    file_sha256,
    pack_bundle,
    verify_bundle,
)
from edge_sdk.bundle.archive import BundleReader, _canonical_info, write_bundle
from edge_sdk.bundle.manifest import MANIFEST_SCHEMA, check_member_path
from edge_sdk.errors import (
    BundleFormatError,
    ConfigError,
    ExpiredError,
    FileSetMismatchError,
    HashMismatchError,
    ManifestError,
    RollbackError,
    SignatureError,
    StorageError,
    TargetMismatchError,
    UntrustedInputError,
    UntrustedKeyError,
)
from edge_sdk.trust import SigningKey, TrustedKeys, encode_signatures

NOW = 1_700_000_000.0
TTL = 3600.0
MODEL = bytes(range(256)) * 8  # 2 KiB of "model"
SAMPLE = b"sample-npz-bytes" * 20


# --- fixtures and builders ---------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def trusted(key: SigningKey) -> TrustedKeys:
    return TrustedKeys((key.public_key,))


def _sources(root: Path, model: bytes = MODEL, sample: bytes | None = SAMPLE) -> tuple[Path, Path | None]:
    root.mkdir(parents=True, exist_ok=True)
    model_path = root / "model.onnx"
    model_path.write_bytes(model)
    sample_path = None
    if sample is not None:
        sample_path = root / "sample.npz"
        sample_path.write_bytes(sample)
    return model_path, sample_path


def _spec(root: Path, version: int = 1, **kw: Any) -> BundleSpec:
    model_path, sample_path = _sources(root)
    kw.setdefault("sample_input", sample_path)
    kw.setdefault("ttl_s", TTL)
    kw.setdefault("inputs", (TensorInfo("x", (None, 3, 8, 8), "float32"),))
    return BundleSpec(name="digits", version=version, runtime="onnxruntime", model=model_path, **kw)


def _pack(root: Path, keys: list[SigningKey], version: int = 1, **kw: Any) -> tuple[Path, Manifest]:
    out = root / f"digits-v{version}.edge"
    manifest = pack_bundle(_spec(root / "src", version, **kw), keys, out, now=NOW)
    return out, manifest


def _forge(
    out: Path,
    manifest: Mapping[str, Any] | bytes,
    keys: list[SigningKey],
    files: Mapping[str, bytes],
    signatures: bytes | None = None,
) -> Path:
    """A canonical bundle with any manifest and payload, signed by ``keys``."""
    manifest_bytes = manifest if isinstance(manifest, bytes) else canonical_json(manifest)
    if signatures is None:
        signatures = encode_signatures(k.sign(manifest_bytes) for k in keys)
    src = Path(tempfile.mkdtemp(dir=out.parent))
    paths = {}
    for i, (name, data) in enumerate(files.items()):
        p = src / f"f{i}"
        p.write_bytes(data)
        paths[name] = p
    write_bundle(out, manifest_bytes, signatures, paths)
    return out


def _raw_tar(out: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """A tar with exactly these members, bypassing every check of write_bundle."""
    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out


def _reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return _canonical_info(name, len(data)), data


def _entry(path: str, data: bytes) -> dict[str, Any]:
    return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _manifest_dict(files: Mapping[str, bytes], model: str = "model.onnx", **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "schema": MANIFEST_SCHEMA,
        "name": "digits",
        "version": 1,
        "created_at": NOW,
        "expires_at": NOW + TTL,
        "runtime": "onnxruntime",
        "model": model,
        "precision": "int8",
        "files": [_entry(p, d) for p, d in sorted(files.items())],
        "inputs": [],
        "sample_input": None,
    }
    d.update(over)
    return d


def _signed_valid_members(key: SigningKey) -> list[tuple[tarfile.TarInfo, bytes]]:
    manifest_bytes = canonical_json(_manifest_dict({"model.onnx": MODEL}))
    return [
        _reg("manifest.json", manifest_bytes),
        _reg("signatures.json", encode_signatures([key.sign(manifest_bytes)])),
        _reg("payload/model.onnx", MODEL),
    ]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- manifest ----------------------------------------------------------------------------


def _manifest(**over: Any) -> Manifest:
    kw: dict[str, Any] = {
        "name": "digits",
        "version": 1,
        "created_at": NOW,
        "expires_at": NOW + TTL,
        "runtime": "onnxruntime",
        "model": "model.onnx",
        "files": (FileEntry("model.onnx", 3, "a" * 64),),
    }
    kw.update(over)
    return Manifest(**kw)


def test_manifest_round_trip_and_canonical_bytes_are_stable() -> None:
    m = _manifest(
        files=(FileEntry("model.onnx", 3, "a" * 64), FileEntry("data/sample_input.npz", 9, "b" * 64)),
        inputs=(TensorInfo("x", (None, 64), "float32"),),
        sample_input="data/sample_input.npz",
        precision="int8",
    )
    data = m.to_bytes()
    again = Manifest.from_bytes(data, 1 << 16)
    assert again == m
    assert again.to_bytes() == data
    # Canonical: sorted keys, no whitespace, and exactly what canonical_json makes of the dict.
    assert data == canonical_json(json.loads(data))
    assert b" " not in data.replace(b"onnx", b"")
    assert list(json.loads(data)) == sorted(json.loads(data))
    assert m.payload_size == 12
    assert m.file("model.onnx").size == 3
    with pytest.raises(ManifestError):
        m.file("nope")


def test_canonical_json_is_key_order_independent_and_keeps_unicode() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": "é"}]}) == '{"a":[1,{"c":"é","d":2}],"b":1}'.encode()


def test_unknown_manifest_fields_are_kept_in_extra() -> None:
    d = _manifest(files=(FileEntry("model.onnx", 3, "a" * 64),)).to_dict()
    d["signed_by_future_packer"] = {"accelerator": "npu", "hints": [1, 2]}
    d["z_note"] = "kept"
    m = Manifest.from_bytes(canonical_json(d), 1 << 16)
    assert m.extra == {"signed_by_future_packer": {"accelerator": "npu", "hints": [1, 2]}, "z_note": "kept"}
    assert m.to_bytes() == canonical_json(d)


@pytest.mark.parametrize(
    "over",
    [
        {"schema": 2},
        {"name": "Digits"},
        {"name": ""},
        {"name": "-digits"},
        {"name": "digits\n"},
        {"name": "d" * 65},
        {"name": "a/b"},
        {"version": 0},
        {"version": -1},
        {"version": True},
        {"runtime": "tensorrt"},
        {"expires_at": NOW},
        {"expires_at": NOW - 1},
        {"expires_at": float("inf")},
        {"created_at": float("nan")},
        {"files": ()},
        {"files": (FileEntry("model.onnx", 3, "a" * 64), FileEntry("model.onnx", 3, "b" * 64))},
        {"model": "other.onnx"},
        {"sample_input": "missing.npz"},
        {"files": tuple(FileEntry(f"f{i}", 1, "a" * 64) for i in range(65)), "model": "f0"},
        # One path used both as a file and as a directory cannot be extracted.
        {"files": (FileEntry("model.onnx", 3, "a" * 64), FileEntry("model.onnx/x", 3, "a" * 64))},
    ],
    ids=repr,
)
def test_invalid_manifests_are_refused(over: dict[str, Any]) -> None:
    with pytest.raises(ManifestError):
        _manifest(**over)


@pytest.mark.parametrize(
    ("size", "sha"),
    [(-1, "a" * 64), (True, "a" * 64), (1.0, "a" * 64), (1, "A" * 64), (1, "a" * 63), (1, "a" * 64 + "\n"), (1, 5)],
)
def test_invalid_file_entries_are_refused(size: Any, sha: Any) -> None:
    with pytest.raises(ManifestError):
        FileEntry("model.onnx", size, sha)


def test_tensor_info_validation() -> None:
    assert TensorInfo.from_dict({"name": "x", "shape": [None, 3], "dtype": "float32"}).shape == (None, 3)
    for bad in (
        {"name": "", "shape": [], "dtype": "f"},
        {"name": "x", "shape": [-1], "dtype": "f"},
        {"name": "x", "shape": [True], "dtype": "f"},
        {"name": "x", "shape": "3", "dtype": "f"},
        {"name": "x", "shape": [1]},
        [1],
    ):
        with pytest.raises(ManifestError):
            TensorInfo.from_dict(bad)


def _valid_dict() -> dict[str, Any]:
    return _manifest_dict({"model.onnx": MODEL})


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.pop("name"),
        lambda d: d.pop("files"),
        lambda d: d.pop("schema"),
        lambda d: d.update(schema=2),
        lambda d: d.update(schema="1"),
        lambda d: d.update(version="2"),
        lambda d: d.update(version=True),
        lambda d: d.update(version=1.0),
        lambda d: d.update(created_at=True),
        lambda d: d.update(created_at="now"),
        lambda d: d.update(files={"model.onnx": 1}),
        lambda d: d.update(files=[1]),
        lambda d: d.update(files=[{"path": "model.onnx", "size": "2048", "sha256": "a" * 64}]),
        lambda d: d.update(inputs={}),
        lambda d: d.update(sample_input=3),
        lambda d: d.update(precision=8),
        lambda d: d["files"][0].update(path="../model.onnx"),
        lambda d: d["files"][0].pop("sha256"),
    ],
)
def test_invalid_manifest_dicts_are_refused(edit: Any) -> None:
    d = _valid_dict()
    edit(d)
    with pytest.raises(ManifestError):
        Manifest.from_bytes(canonical_json(d), 1 << 16)


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b"null", b"\xff\xfe{}", b"{" * 50_000, b'{"schema":1,"created_at":NaN}', b"not json"],
    ids=lambda b: repr(b[:16]),
)
def test_manifest_bytes_that_are_not_a_json_object_are_refused(data: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(data, 1 << 20)


def test_manifest_refuses_non_finite_numbers() -> None:
    raw = canonical_json(_valid_dict()).replace(str(NOW + TTL).encode(), b"Infinity")
    assert b"Infinity" in raw
    with pytest.raises(ManifestError):
        Manifest.from_bytes(raw, 1 << 16)


def test_oversize_manifest_is_refused_before_parsing() -> None:
    data = canonical_json(_valid_dict())
    assert Manifest.from_bytes(data, len(data)).name == "digits"
    with pytest.raises(ManifestError, match="limit"):
        Manifest.from_bytes(data, len(data) - 1)
    with pytest.raises(ManifestError, match="limit"):
        Manifest.from_bytes(b"\xff" * 100, 10)  # refused by size, not by the decoder


def _nested(levels: int) -> Any:
    """A JSON value of exactly ``levels`` levels: ``levels - 1`` objects around a scalar."""
    value: Any = 1
    for _ in range(levels - 1):
        value = {"n": value}
    return value


def test_manifest_nested_too_deep_is_refused() -> None:
    # An unknown field (kept in ``extra``) is where a hostile packer would hide the nesting:
    # the manifest itself is depth 1, so the field may hold 15 levels and not 16.
    d = _valid_dict()
    d["x_future"] = _nested(15)
    assert Manifest.from_bytes(canonical_json(d), 1 << 16).extra["x_future"] == _nested(15)
    d["x_future"] = _nested(16)
    with pytest.raises(ManifestError, match="manifest nests deeper than 16 levels"):
        Manifest.from_bytes(canonical_json(d), 1 << 16)
    # The bound is the caller's, and a parser-exhausting document is refused the same way.
    d["x_future"] = _nested(3)
    with pytest.raises(ManifestError, match="deeper than 3"):
        Manifest.from_bytes(canonical_json(d), 1 << 16, max_depth=3)
    with pytest.raises(ManifestError):
        Manifest.from_bytes(b'{"x":' + b"[" * 60_000 + b"]" * 60_000 + b"}", 1 << 20)


# --- hostile paths -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["model.onnx", "a/b/c.bin", "weights-int8.v2.npz", "ünïcode.bin", "a" * 255, ".hidden", "a..b"]
)
def test_safe_member_paths_are_accepted(path: str) -> None:
    assert check_member_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "//x",
        "..",
        "../x",
        "a/../../x",
        "a/..",
        ".",
        "./a",
        "a/./b",
        "a\\..\\x",
        "C:\\x",
        "C:x",
        "a//b",
        "a/",
        "a/b/",
        "a\x00b",
        "a\nb",
        "a\x1bb",
        "a\x7fb",
        "a" * 256,
        None,
        b"model.onnx",
    ],
    ids=repr,
)
def test_hostile_member_paths_are_refused(path: Any) -> None:
    with pytest.raises(ManifestError):
        check_member_path(path)


# --- pack and verify: the good path ------------------------------------------------------


def test_pack_then_verify_round_trip(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    out, manifest = _pack(tmp_path, [key], extra={"future": {"x": 1}})
    assert manifest.files == (
        FileEntry("model.onnx", len(MODEL), hashlib.sha256(MODEL).hexdigest()),
        FileEntry("sample_input.npz", len(SAMPLE), hashlib.sha256(SAMPLE).hexdigest()),
    )
    assert manifest.created_at == NOW and manifest.expires_at == NOW + TTL
    verified = verify_bundle(out, trusted, NOW + 1)
    assert verified.manifest == manifest
    assert verified.manifest.extra == {"future": {"x": 1}}
    assert verified.signers == {key.keyid}
    assert [c.split(":")[0] for c in verified.checks] == [
        "archive",
        "signature",
        "manifest",
        "expiry",
        "target",
        "rollback",
        "files",
        "hashes",
    ]
    assert out.stat().st_size % tarfile.RECORDSIZE == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_pack_is_deterministic(tmp_path: Path, key: SigningKey) -> None:
    a, _ = _pack(tmp_path / "a", [key])
    b, _ = _pack(tmp_path / "b", [key])
    assert a.read_bytes() == b.read_bytes()


def test_verify_with_extraction_writes_exactly_the_payload(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys
) -> None:
    out, _ = _pack(tmp_path, [key])
    dest = tmp_path / "stage" / "payload"
    dest.mkdir(parents=True)
    before = _tree(tmp_path)
    verify_bundle(out, trusted, NOW, extract_to=dest)
    after = _tree(tmp_path)
    assert sorted(set(after) - set(before)) == ["stage/payload/model.onnx", "stage/payload/sample_input.npz"]
    assert (dest / "model.onnx").read_bytes() == MODEL
    assert (dest / "sample_input.npz").read_bytes() == SAMPLE


def test_nested_payload_paths_are_extracted_inside_the_destination(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys
) -> None:
    files = {"model.onnx": MODEL, "sub/dir/weights.bin": b"w" * 10}
    out = _forge(tmp_path / "b.edge", _manifest_dict(files), [key], files)
    dest = tmp_path / "dest"
    dest.mkdir()
    verify_bundle(out, trusted, NOW, extract_to=dest)
    assert (dest / "sub" / "dir" / "weights.bin").read_bytes() == b"w" * 10


def test_pack_needs_a_key_and_readable_inputs(tmp_path: Path, key: SigningKey) -> None:
    spec = _spec(tmp_path / "src")
    with pytest.raises(ConfigError):
        pack_bundle(spec, [], tmp_path / "x.edge", now=NOW)
    missing = BundleSpec("digits", 1, "onnxruntime", tmp_path / "nope.onnx")
    with pytest.raises(StorageError):
        pack_bundle(missing, [key], tmp_path / "x.edge", now=NOW)
    with pytest.raises(StorageError):
        pack_bundle(spec, [key], tmp_path / "no-dir" / "x.edge", now=NOW)
    clash = tmp_path / "clash" / "sample_input.npz"
    clash.parent.mkdir()
    clash.write_bytes(b"m")
    with pytest.raises(ConfigError):
        pack_bundle(
            BundleSpec("digits", 1, "onnxruntime", clash, sample_input=clash), [key], tmp_path / "x.edge", now=NOW
        )
    with pytest.raises(ManifestError):
        pack_bundle(BundleSpec("Bad Name", 1, "onnxruntime", spec.model), [key], tmp_path / "x.edge", now=NOW)
    assert not (tmp_path / "x.edge").exists()
    assert file_sha256(spec.model) == (hashlib.sha256(MODEL).hexdigest(), len(MODEL))


# --- signatures, expiry, rollback ---------------------------------------------------------


def test_wrong_key_is_refused(tmp_path: Path, other_key: SigningKey, trusted: TrustedKeys) -> None:
    out, _ = _pack(tmp_path, [other_key])
    with pytest.raises(UntrustedKeyError):
        verify_bundle(out, trusted, NOW)


def test_threshold_two_with_one_signer_is_refused(tmp_path: Path, key: SigningKey, other_key: SigningKey) -> None:
    two = TrustedKeys((key.public_key, other_key.public_key), threshold=2)
    one_signer, _ = _pack(tmp_path / "one", [key])
    with pytest.raises(UntrustedKeyError):
        verify_bundle(one_signer, two, NOW)
    both, _ = _pack(tmp_path / "both", [key, other_key])
    assert verify_bundle(both, two, NOW).signers == {key.keyid, other_key.keyid}


def test_unsigned_bundle_is_refused(tmp_path: Path, trusted: TrustedKeys) -> None:
    files = {"model.onnx": MODEL}
    out = _forge(tmp_path / "b.edge", _manifest_dict(files), [], files, signatures=b"[]")
    with pytest.raises(SignatureError, match="not signed"):
        verify_bundle(out, trusted, NOW)


def test_expired_manifest_is_refused(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    out, manifest = _pack(tmp_path, [key])
    verify_bundle(out, trusted, manifest.expires_at - 0.001)
    with pytest.raises(ExpiredError) as info:
        verify_bundle(out, trusted, manifest.expires_at)
    assert info.value.details == {"expires_at": manifest.expires_at, "now": manifest.expires_at}
    with pytest.raises(ExpiredError):
        verify_bundle(out, trusted, manifest.expires_at + 365 * 86400)


def test_rollback_is_refused(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    out, _ = _pack(tmp_path, [key], version=5)
    assert verify_bundle(out, trusted, NOW, installed_version=4).manifest.version == 5
    for installed in (5, 6, 1000):
        with pytest.raises(RollbackError) as info:
            verify_bundle(out, trusted, NOW, installed_version=installed)
        assert info.value.details == {"offered": 5, "installed": installed}


def test_signature_check_comes_before_manifest_content(
    tmp_path: Path, other_key: SigningKey, trusted: TrustedKeys
) -> None:
    """An attacker's expired, rolled-back manifest is reported as untrusted, not parsed further."""
    files = {"model.onnx": MODEL}
    out = _forge(
        tmp_path / "b.edge", _manifest_dict(files, expires_at=NOW - 10, created_at=NOW - 20), [other_key], files
    )
    with pytest.raises(UntrustedKeyError):
        verify_bundle(out, trusted, NOW, installed_version=7)


# --- mix and match, hashes, endless data --------------------------------------------------


def test_extra_member_not_in_manifest_is_refused(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    declared = {"model.onnx": MODEL}
    out = _forge(tmp_path / "b.edge", _manifest_dict(declared), [key], {**declared, "evil.so": b"\x7fELF"})
    with pytest.raises(FileSetMismatchError) as info:
        verify_bundle(out, trusted, NOW)
    assert info.value.details == {"extra_files": ["evil.so"]}


def test_missing_manifest_file_is_refused(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    declared = {"model.onnx": MODEL, "sample_input.npz": SAMPLE}
    out = _forge(
        tmp_path / "b.edge",
        _manifest_dict(declared, sample_input="sample_input.npz"),
        [key],
        {"model.onnx": MODEL},
    )
    with pytest.raises(FileSetMismatchError) as info:
        verify_bundle(out, trusted, NOW)
    assert info.value.details == {"missing_files": ["sample_input.npz"]}


def test_payload_swapped_between_files_is_refused(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    declared = {"model.onnx": MODEL, "sample_input.npz": SAMPLE}
    out = _forge(
        tmp_path / "b.edge",
        _manifest_dict(declared, sample_input="sample_input.npz"),
        [key],
        {"model.onnx": SAMPLE, "sample_input.npz": MODEL},
    )
    with pytest.raises(HashMismatchError):
        verify_bundle(out, trusted, NOW)


@pytest.mark.parametrize("extract", [False, True])
def test_same_size_different_content_is_refused(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys, extract: bool
) -> None:
    other = bytes(reversed(MODEL))
    out = _forge(tmp_path / "b.edge", _manifest_dict({"model.onnx": MODEL}), [key], {"model.onnx": other})
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(HashMismatchError) as info:
        verify_bundle(out, trusted, NOW, extract_to=dest if extract else None)
    assert info.value.details["expected"] == hashlib.sha256(MODEL).hexdigest()
    assert info.value.details["actual"] == hashlib.sha256(other).hexdigest()


def test_member_shorter_than_declared_is_refused(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    out = _forge(tmp_path / "b.edge", _manifest_dict({"model.onnx": MODEL}), [key], {"model.onnx": MODEL[:-1]})
    with pytest.raises(HashMismatchError):
        verify_bundle(out, trusted, NOW)


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Wrap TarFile.extractfile to count the bytes handed out per member name."""
    counts: dict[str, int] = {}
    original = tarfile.TarFile.extractfile

    def extractfile(tf: tarfile.TarFile, member: Any) -> Any:
        fh = original(tf, member)
        name = member.name if isinstance(member, tarfile.TarInfo) else member
        counts.setdefault(name, 0)

        class Counting:
            def read(self, n: int = -1) -> bytes:
                data = fh.read(n)
                counts[name] += len(data)
                return data

        return Counting()

    monkeypatch.setattr(tarfile.TarFile, "extractfile", extractfile)
    return counts


@pytest.mark.parametrize("extract", [False, True])
def test_member_larger_than_declared_is_refused_without_reading_past_the_declared_size(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys, extract: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    declared = MODEL[:1000]
    out = _forge(tmp_path / "b.edge", _manifest_dict({"model.onnx": declared}), [key], {"model.onnx": MODEL})
    counts = _count_reads(monkeypatch)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(HashMismatchError) as info:
        verify_bundle(out, trusted, NOW, extract_to=dest if extract else None)
    assert info.value.details["expected_size"] == 1000
    assert info.value.details["actual_size"] == len(MODEL)
    assert "manifest.json" in counts  # the wrapper really was in the path
    assert counts.get("payload/model.onnx", 0) <= 1000
    if extract:
        written = dest / "model.onnx"
        assert not written.exists() or written.stat().st_size <= 1000


def test_stream_is_bounded_by_the_declared_size(tmp_path: Path, key: SigningKey) -> None:
    out, _ = _pack(tmp_path, [key])
    with BundleReader(out) as reader:
        assert b"".join(reader.iter_member("model.onnx", len(MODEL))) == MODEL
        with pytest.raises(HashMismatchError):
            next(reader.iter_member("model.onnx", len(MODEL) - 1))


# --- hostile archives ----------------------------------------------------------------------


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info, b""


@pytest.mark.parametrize(
    "member",
    [
        _special("payload/model.onnx", tarfile.SYMTYPE, "/etc/passwd"),
        _special("payload/link", tarfile.SYMTYPE, "../../../../tmp"),
        _special("payload/hard", tarfile.LNKTYPE, "payload/model.onnx"),
        _special("payload/dev", tarfile.CHRTYPE),
        _special("payload/blk", tarfile.BLKTYPE),
        _special("payload/fifo", tarfile.FIFOTYPE),
        _special("payload/dir", tarfile.DIRTYPE),
    ],
    ids=lambda m: f"{m[0].name}-{m[0].type!r}",
)
def test_links_devices_and_directories_are_refused(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys, member: tuple[tarfile.TarInfo, bytes]
) -> None:
    out = _raw_tar(tmp_path / "b.edge", [*_signed_valid_members(key), member])
    with pytest.raises(BundleFormatError, match="not a regular file"):
        verify_bundle(out, trusted, NOW, extract_to=tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "payload/../evil",
        "payload/../../../../tmp/evil",
        "../payload/model2.onnx",
        "/payload/evil",
        "/etc/cron.d/evil",
        "payload//evil",
        "payload/./evil",
        "payload/a\\..\\evil",
        "payload/",
        "evil.txt",
        "payload",
    ],
)
def test_hostile_member_names_are_refused(tmp_path: Path, key: SigningKey, trusted: TrustedKeys, name: str) -> None:
    out = _raw_tar(tmp_path / "b.edge", [*_signed_valid_members(key), _reg(name, b"x")])
    with tarfile.open(out) as tf:
        assert name in [m.name for m in tf.getmembers()]  # the tar really carries it
    with pytest.raises(BundleFormatError):
        verify_bundle(out, trusted, NOW, extract_to=tmp_path)
    assert not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize("dup", ["payload/model.onnx", "manifest.json", "signatures.json"])
def test_duplicate_members_are_refused(tmp_path: Path, key: SigningKey, trusted: TrustedKeys, dup: str) -> None:
    members = _signed_valid_members(key)
    data = next(d for i, d in members if i.name == dup)
    out = _raw_tar(tmp_path / "b.edge", [*members, _reg(dup, data)])
    with pytest.raises(BundleFormatError, match="twice"):
        verify_bundle(out, trusted, NOW)


@pytest.mark.parametrize("drop", ["manifest.json", "signatures.json"])
def test_missing_metadata_members_are_refused(tmp_path: Path, key: SigningKey, trusted: TrustedKeys, drop: str) -> None:
    members = [m for m in _signed_valid_members(key) if m[0].name != drop]
    out = _raw_tar(tmp_path / "b.edge", members)
    with pytest.raises(BundleFormatError, match=f"no {drop}"):
        verify_bundle(out, trusted, NOW)


def test_non_canonical_headers_are_refused(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    members = _signed_valid_members(key)
    members[2][0].mode = 0o4755  # setuid payload
    out = _raw_tar(tmp_path / "b.edge", members)
    with pytest.raises(BundleFormatError, match="non-canonical"):
        verify_bundle(out, trusted, NOW)


def test_valid_hand_built_bundle_is_accepted(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    """Control for the hostile-archive tests: the same builder without the attack passes."""
    out = _raw_tar(tmp_path / "b.edge", _signed_valid_members(key))
    assert verify_bundle(out, trusted, NOW).manifest.name == "digits"


def test_too_many_members_are_refused(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    members = _signed_valid_members(key) + [_reg(f"payload/f{i}", b"x") for i in range(70)]
    out = _raw_tar(tmp_path / "b.edge", members)
    with pytest.raises(BundleFormatError, match="more than 66 members"):
        verify_bundle(out, trusted, NOW)
    small, _ = _pack(tmp_path / "small", [key])
    with pytest.raises(BundleFormatError, match="more than 3 members"):
        verify_bundle(small, trusted, NOW, limits=BundleLimits(max_members=3))


def test_size_limits_are_enforced(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    out, _ = _pack(tmp_path, [key])
    size = out.stat().st_size
    verify_bundle(out, trusted, NOW, limits=BundleLimits(max_bundle_bytes=size))
    with pytest.raises(BundleFormatError, match="limit"):
        verify_bundle(out, trusted, NOW, limits=BundleLimits(max_bundle_bytes=size - 1))
    with pytest.raises(BundleFormatError):
        verify_bundle(out, trusted, NOW, limits=BundleLimits(max_member_bytes=len(MODEL) - 1))
    with pytest.raises(BundleFormatError, match=r"signatures\.json"):
        verify_bundle(out, trusted, NOW, limits=BundleLimits(max_signatures_bytes=10))


def test_oversize_manifest_is_refused(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    files = {"model.onnx": MODEL}
    big = _manifest_dict(files, padding="x" * 300_000)  # a signed manifest above the 256 KiB default
    out = _forge(tmp_path / "b.edge", big, [key], files)
    with pytest.raises(BundleFormatError, match=r"manifest\.json"):
        verify_bundle(out, trusted, NOW)
    small, _ = _pack(tmp_path / "small", [key])
    with pytest.raises(BundleFormatError, match=r"manifest\.json"):
        verify_bundle(small, trusted, NOW, limits=BundleLimits(max_manifest_bytes=64))


def test_signed_manifest_nested_too_deep_is_refused(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    files = {"model.onnx": MODEL}
    deep = _manifest_dict(files, x_future=_nested(40))
    out = _forge(tmp_path / "deep.edge", deep, [key], files)
    with pytest.raises(ManifestError, match="deeper than 16"):
        verify_bundle(out, trusted, NOW)
    shallow = _forge(tmp_path / "shallow.edge", _manifest_dict(files, x_future=_nested(4)), [key], files)
    assert verify_bundle(shallow, trusted, NOW).manifest.extra == {"x_future": _nested(4)}
    with pytest.raises(ManifestError, match="deeper than 4"):
        verify_bundle(shallow, trusted, NOW, limits=BundleLimits(max_manifest_depth=4))


@pytest.mark.parametrize("content", [b"", b"\x00" * 10240, b"PK\x03\x04 not a tar" * 100, os.urandom(0) + b"x" * 10240])
def test_not_a_bundle(tmp_path: Path, trusted: TrustedKeys, content: bytes) -> None:
    p = tmp_path / "junk.edge"
    p.write_bytes(content)
    with pytest.raises(BundleFormatError):
        verify_bundle(p, trusted, NOW)


def test_missing_bundle_file_is_a_storage_error(tmp_path: Path, trusted: TrustedKeys) -> None:
    with pytest.raises(StorageError):
        verify_bundle(tmp_path / "nope.edge", trusted, NOW)


def test_signed_manifest_with_file_and_directory_clash_is_refused(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys
) -> None:
    files = {"model.onnx": MODEL, "model.onnx/x": b"x"}
    manifest_bytes = canonical_json(_manifest_dict(files))
    members = [
        _reg("manifest.json", manifest_bytes),
        _reg("signatures.json", encode_signatures([key.sign(manifest_bytes)])),
        _reg("payload/model.onnx", MODEL),
        _reg("payload/model.onnx/x", b"x"),
    ]
    out = _raw_tar(tmp_path / "b.edge", members)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ManifestError):
        verify_bundle(out, trusted, NOW, extract_to=dest)


# --- extraction containment ----------------------------------------------------------------


def test_extraction_does_not_follow_a_planted_directory_symlink(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys
) -> None:
    files = {"model.onnx": MODEL, "sub/weights.bin": b"w"}
    out = _forge(tmp_path / "b.edge", _manifest_dict(files), [key], files)
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    with pytest.raises(BundleFormatError, match="escapes"):
        verify_bundle(out, trusted, NOW, extract_to=dest)
    assert list(outside.iterdir()) == []


def test_extraction_does_not_follow_a_planted_file_symlink(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys
) -> None:
    out, _ = _pack(tmp_path, [key])
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "model.onnx").symlink_to(victim)
    with pytest.raises(StorageError):
        verify_bundle(out, trusted, NOW, extract_to=dest)
    assert victim.read_bytes() == b"precious"


# --- every byte, every length ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory, key: SigningKey) -> bytes:
    root = tmp_path_factory.mktemp("small-bundle")
    out, _ = _pack(root, [key])
    data = out.read_bytes()
    assert len(data) <= 16 << 10
    return data


def _refused(path: Path, trusted: TrustedKeys) -> UntrustedInputError | None:
    """The error verification raised, or None if the bundle was accepted."""
    try:
        verify_bundle(path, trusted, NOW)
    except UntrustedInputError as exc:
        return exc
    return None


def test_every_flipped_byte_is_refused(tmp_path: Path, small_bundle: bytes, trusted: TrustedKeys) -> None:
    p = tmp_path / "b.edge"
    p.write_bytes(small_bundle)
    assert _refused(p, trusted) is None
    accepted = []
    with open(p, "r+b", buffering=0) as fh:
        for i, byte in enumerate(small_bundle):
            fh.seek(i)
            fh.write(bytes([byte ^ 0xFF]))
            if _refused(p, trusted) is None:
                accepted.append(i)
            fh.seek(i)
            fh.write(bytes([byte]))
    assert accepted == []
    assert p.read_bytes() == small_bundle


def test_every_truncation_is_refused(tmp_path: Path, small_bundle: bytes, trusted: TrustedKeys) -> None:
    p = tmp_path / "b.edge"
    p.write_bytes(small_bundle)
    accepted = []
    for n in range(len(small_bundle) - 1, -1, -1):
        os.truncate(p, n)
        if _refused(p, trusted) is None:
            accepted.append(n)
    assert accepted == []


def test_appended_bytes_are_refused(tmp_path: Path, small_bundle: bytes, trusted: TrustedKeys) -> None:
    p = tmp_path / "b.edge"
    for tail in (
        b"\x00",  # no longer a whole number of tar records
        b"x" * tarfile.RECORDSIZE,  # non-zero bytes after the end-of-archive marker
        b"\x00" * 2 * tarfile.RECORDSIZE,  # more zero padding than a tar writer ever adds
        small_bundle,  # a second archive after the first
    ):
        p.write_bytes(small_bundle + tail)
        assert _refused(p, trusted) is not None, tail[:4]


def test_one_extra_zero_record_is_tolerated(tmp_path: Path, small_bundle: bytes, trusted: TrustedKeys) -> None:
    """Documents current behaviour: the reader allows up to two records of zero tail.

    Harmless (zeros carry nothing and the transfer's sha256 covers the whole file), but
    it means two different files verify as the same bundle.
    """
    p = tmp_path / "b.edge"
    p.write_bytes(small_bundle + bytes(tarfile.RECORDSIZE))
    assert _refused(p, trusted) is None


# --- property tests ----------------------------------------------------------------------


_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@_SETTINGS
@given(data=st.data())
def test_random_byte_mutations_are_never_accepted(
    small_bundle: bytes, trusted: TrustedKeys, data: st.DataObject
) -> None:
    edits = data.draw(
        st.lists(st.tuples(st.integers(0, len(small_bundle) - 1), st.integers(0, 255)), min_size=1, max_size=8)
    )
    mutated = bytearray(small_bundle)
    for pos, value in edits:
        mutated[pos] = value
    assume(bytes(mutated) != small_bundle)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "b.edge"
        p.write_bytes(bytes(mutated))
        assert _refused(p, trusted) is not None


_JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(0, 9), max_size=2),
)
_FIELDS = [
    "schema",
    "name",
    "version",
    "created_at",
    "expires_at",
    "runtime",
    "model",
    "precision",
    "files",
    "inputs",
    "sample_input",
    "brand_new_field",
]


@pytest.fixture(scope="module")
def signed_parts(tmp_path_factory: pytest.TempPathFactory, small_bundle: bytes) -> tuple[bytes, bytes]:
    root = tmp_path_factory.mktemp("parts")
    p = root / "b.edge"
    p.write_bytes(small_bundle)
    with BundleReader(p) as reader:
        return reader.manifest_bytes, reader.signatures_bytes


@_SETTINGS
@given(data=st.data())
def test_manifest_edits_without_resigning_are_never_accepted(
    signed_parts: tuple[bytes, bytes], trusted: TrustedKeys, data: st.DataObject
) -> None:
    manifest_bytes, signatures = signed_parts
    d = json.loads(manifest_bytes)
    for field in data.draw(st.lists(st.sampled_from(_FIELDS), min_size=1, max_size=3, unique=True)):
        choice = data.draw(st.sampled_from(["set", "delete", "bump"]))
        if choice == "delete":
            d.pop(field, None)
        elif choice == "bump" and isinstance(d.get(field), (int, float)) and not isinstance(d.get(field), bool):
            d[field] = d[field] + data.draw(st.sampled_from([1, -1, 86400 * 365]))
        elif choice == "bump" and field == "files":
            d["files"][0]["size"] += 1
        else:
            d[field] = data.draw(_JSON_VALUES)
    forged = canonical_json(d)
    assume(forged != manifest_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        model, sample = _sources(src)
        assert sample is not None
        out = Path(tmp) / "b.edge"
        write_bundle(out, forged, signatures, {"model.onnx": model, "sample_input.npz": sample})
        exc = _refused(out, trusted)
    assert isinstance(exc, SignatureError) and not isinstance(exc, UntrustedKeyError)


# --- target constraints, the signed command's expectation, explicit rollback ----------------


_PI = DeviceFacts("aarch64", 4 << 30, frozenset())
_JETSON = DeviceFacts("aarch64", 8 << 30, frozenset({"cuda", "tensorrt"}))


@pytest.mark.parametrize(
    "target, device, fits",
    [
        (Target(("aarch64", "armv7l")), _PI, True),
        (Target(("x86_64",)), _PI, False),
        (Target(min_memory_bytes=6 << 30), _PI, False),
        (Target(min_memory_bytes=6 << 30), _JETSON, True),
        (Target(accelerators=("cuda",)), _PI, False),
        (Target(("aarch64",), 1 << 30, ("cuda", "tensorrt")), _JETSON, True),
    ],
)
def test_target_constraints_are_checked_against_the_device(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys, target: Target, device: DeviceFacts, fits: bool
) -> None:
    out, manifest = _pack(tmp_path, [key], target=target)
    assert manifest.target == target and Manifest.from_bytes(manifest.to_bytes(), 1 << 20) == manifest
    if fits:
        assert verify_bundle(out, trusted, NOW, device=device).checks[4].startswith("target: aarch64")
    else:
        with pytest.raises(TargetMismatchError) as info:
            verify_bundle(out, trusted, NOW, device=device, extract_to=tmp_path / "x")
        assert info.value.details["constraint"] in ("arch", "min_memory_bytes", "accelerators")


@pytest.mark.parametrize("bad", [{"arch": "x86_64"}, {"arch": ["../x"]}, {"min_memory_bytes": -1}, {"gpu": True}, []])
def test_malformed_targets_are_refused(bad: Any) -> None:
    d = _manifest_dict({"model.onnx": MODEL}, target=bad)
    with pytest.raises(ManifestError):
        Manifest.from_bytes(canonical_json(d), 1 << 20)


def test_bundle_must_be_the_one_the_signed_command_names(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    out, _ = _pack(tmp_path, [key], version=3)
    verify_bundle(out, trusted, NOW, expect=Expected("digits", 3))
    for wrong in (Expected("digits", 4), Expected("other", 3)):
        with pytest.raises(ManifestError, match="signed command names"):
            verify_bundle(out, trusted, NOW, expect=wrong)


def test_only_an_explicit_signed_rollback_installs_an_older_version(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys
) -> None:
    out, _ = _pack(tmp_path, [key], version=2)
    with pytest.raises(RollbackError):
        verify_bundle(out, trusted, NOW, installed_version=5, expect=Expected("digits", 2))
    ok = verify_bundle(out, trusted, NOW, installed_version=5, expect=Expected("digits", 2, rollback=True))
    assert any("explicitly allowed" in c for c in ok.checks)
    with pytest.raises(ManifestError):  # the rollback allowance names one version, not any
        verify_bundle(out, trusted, NOW, installed_version=5, expect=Expected("digits", 1, rollback=True))


# --- hostile archives on the device: nothing written outside scratch, scratch removed -----------


def _compressed(tmp_path: Path, key: SigningKey, mode: str) -> Path:
    """A compression bomb: a valid-looking bundle whose payload inflates 1000x."""
    members = [*_signed_valid_members(key), _reg("payload/zeros.bin", bytes(8 << 20))]
    out = tmp_path / f"bomb.{mode}"
    with tarfile.open(out, mode=f"w:{mode}", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data))
    assert out.stat().st_size < 64 << 10
    return out


_HOSTILE = {
    "symlink": lambda p, k: _raw_tar(
        p, [*_signed_valid_members(k), _special("payload/x", tarfile.SYMTYPE, "/etc/passwd")]
    ),
    "hardlink": lambda p, k: _raw_tar(
        p, [*_signed_valid_members(k), _special("payload/x", tarfile.LNKTYPE, "/etc/shadow")]
    ),
    "device": lambda p, k: _raw_tar(p, [*_signed_valid_members(k), _special("payload/x", tarfile.CHRTYPE)]),
    "absolute": lambda p, k: _raw_tar(p, [*_signed_valid_members(k), _reg("/tmp/evil", b"x")]),
    "dotdot": lambda p, k: _raw_tar(p, [*_signed_valid_members(k), _reg("payload/../../evil", b"x")]),
    "duplicate": lambda p, k: _raw_tar(p, [*_signed_valid_members(k), _reg("payload/model.onnx", MODEL)]),
    "too-many": lambda p, k: _raw_tar(
        p, [*_signed_valid_members(k), *(_reg(f"payload/f{i}", b"x") for i in range(80))]
    ),
    "gzip-bomb": lambda p, k: _compressed(p.parent, k, "gz"),
    "xz-bomb": lambda p, k: _compressed(p.parent, k, "xz"),
}


@pytest.mark.parametrize("attack", sorted(_HOSTILE))
def test_hostile_archives_leave_the_device_unchanged(
    tmp_path: Path, key: SigningKey, trusted: TrustedKeys, attack: str
) -> None:
    from device_agent.installer import Installer

    installer = Installer(tmp_path / "data", trusted)
    good, _ = _pack(tmp_path / "good", [key], version=1)
    installer.activate(installer.stage(good, NOW))
    before = (installer.state_path.read_bytes(), _tree(installer.data_dir))
    (tmp_path / "attack").mkdir()
    bundle = _HOSTILE[attack](tmp_path / "attack" / "b.edge", key)
    with pytest.raises(BundleFormatError):
        installer.stage(bundle, NOW)
    assert (installer.state_path.read_bytes(), _tree(installer.data_dir)) == before
    assert list(installer.tmp_dir.iterdir()) == []
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()
