"""edge_sdk.bundle.delta: the delta format, and rebuilding a bundle from an installed slot.

Bundles are packed and signed for real; the base slot is laid out as the installer lays
it out (``manifest.json`` and ``payload/`` from a verifying extraction). Deltas are made
here by a small planner (COPY the prefix each payload file shares with the base file of
its path, DATA for the rest, ZERO for the archive's tail), and every attack is a real
delta file, written with the format's own encoders or, where the encoders refuse to
write it, byte by byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_sdk.bundle import BundleSpec, Manifest, content_digest, pack_bundle, verify_bundle
from edge_sdk.bundle import delta as delta_module
from edge_sdk.bundle.archive import BundleLimits, BundleReader
from edge_sdk.bundle.delta import (
    FORMAT_VERSION,
    MAGIC,
    CopyOp,
    DataOp,
    DeltaHeader,
    DeltaLimits,
    DeltaOp,
    ZeroOp,
    apply_delta,
    encode_header,
    read_delta_header,
    write_delta,
)
from edge_sdk.errors import ConfigError, DeltaError, StorageError, UntrustedInputError
from edge_sdk.protowire import encode_varint
from edge_sdk.trust import RecipientKey, SigningKey, TrustedKeys, canonical_json

NOW = 1_700_000_000.0
ROOT = Path(__file__).resolve().parents[3]
BASE_MODEL = bytes((i * 7 + i // 251) % 256 for i in range(40_000))
NEW_MODEL = BASE_MODEL[:36_000] + bytes(range(256)) * 16  # the last 4 KiB changed
SAMPLE = b"sample-npz" * 50


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def trusted(key: SigningKey) -> TrustedKeys:
    return TrustedKeys((key.public_key,))


def _pack(root: Path, key: SigningKey, version: int, model: bytes, name: str = "mlp", **kw: object) -> Path:
    src = root / f"src-{name}-{version}"
    src.mkdir(parents=True)
    (src / "model.onnx").write_bytes(model)
    (src / "sample.npz").write_bytes(SAMPLE)
    out = root / f"{name}-v{version}.edge"
    spec = BundleSpec(name, version, "onnxruntime", src / "model.onnx", sample_input=src / "sample.npz", **kw)  # type: ignore[arg-type]
    pack_bundle(spec, [key], out, now=NOW)
    return out


def _install(bundle: Path, slot: Path, trusted: TrustedKeys) -> Path:
    """A slot as the installer's ``stage`` writes it: the verified payload and the manifest."""
    (slot / "payload").mkdir(parents=True)
    verified = verify_bundle(bundle, trusted, NOW, extract_to=slot / "payload")
    (slot / "manifest.json").write_bytes(verified.manifest.to_bytes())
    return slot


def _prefix(a: bytes, b: bytes) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _plan(base: Path, new: Path) -> tuple[DeltaHeader, list[DeltaOp]]:
    """A simple delta: per payload file, COPY what it shares with the base file of its path."""
    new_bytes = new.read_bytes()
    with BundleReader(base) as br, BundleReader(new) as nr:
        base_manifest = Manifest.from_bytes(br.manifest_bytes, 1 << 20)
        new_manifest = Manifest.from_bytes(nr.manifest_bytes, 1 << 20)
        ops: list[DeltaOp] = []
        files: list[str] = []
        pos = 0
        for rel in nr.payload:
            offset, size = nr.member_span(rel)
            ops.append(DataOp(new_bytes[pos:offset]))
            shared = 0
            if rel in br.payload:
                boff, bsize = br.member_span(rel)
                shared = _prefix(new_bytes[offset : offset + size], base.read_bytes()[boff : boff + bsize])
            if shared:
                files.append(rel)
                ops.append(CopyOp(len(files) - 1, 0, shared))
            if shared < size:
                ops.append(DataOp(new_bytes[offset + shared : offset + size]))
            pos = offset + size
        assert new_bytes[pos:] == bytes(len(new_bytes) - pos)
        ops.append(ZeroOp(len(new_bytes) - pos))
    header = DeltaHeader(
        base_name=base_manifest.name,
        base_version=base_manifest.version,
        base_content=content_digest(base_manifest.files),
        target_sha256=hashlib.sha256(new_bytes).hexdigest(),
        target_size=len(new_bytes),
        target_name=new_manifest.name,
        target_version=new_manifest.version,
        files=tuple(files),
        ops=len(ops),
    )
    return header, ops


@dataclasses.dataclass
class Case:
    base: Path
    new: Path
    slot: Path
    header: DeltaHeader
    ops: list[DeltaOp]
    delta: Path
    out: Path

    def write(self, header: DeltaHeader | None = None, ops: list[DeltaOp] | None = None) -> Path:
        ops = self.ops if ops is None else ops
        header = dataclasses.replace(header or self.header, ops=len(ops))
        write_delta(self.delta, header, ops)
        return self.delta

    def raw(self, data: bytes) -> Path:
        self.delta.write_bytes(data)
        return self.delta

    def refused(self, error: type[Exception], match: str, limits: DeltaLimits | None = None) -> None:
        with pytest.raises(error, match=match):
            apply_delta(self.delta, self.slot, self.out, *(() if limits is None else (limits,)))
        assert not self.out.exists()
        assert [p.name for p in self.out.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left


@pytest.fixture
def case(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> Case:
    base = _pack(tmp_path, key, 1, BASE_MODEL)
    new = _pack(tmp_path, key, 2, NEW_MODEL)
    slot = _install(base, tmp_path / "slots" / "mlp" / "v1", trusted)
    header, ops = _plan(base, new)
    (tmp_path / "out").mkdir()
    c = Case(base, new, slot, header, ops, tmp_path / "mlp-v2.delta", tmp_path / "out" / "mlp-v2.edge")
    c.write()
    return c


def _raw_delta(header: dict[str, object], ops: bytes) -> bytes:
    body = canonical_json(header)
    return MAGIC + bytes([FORMAT_VERSION]) + encode_varint(len(body)) + body + ops


# --- what works ------------------------------------------------------------------------


def test_rebuilt_bundle_is_byte_identical_and_verifies(case: Case, trusted: TrustedKeys) -> None:
    size = write_delta(case.delta, case.header, case.ops)
    assert size == case.delta.stat().st_size
    assert size < case.new.stat().st_size // 4  # most of the model came from the slot
    assert read_delta_header(case.delta) == case.header

    apply_delta(case.delta, case.slot, case.out)

    assert case.out.read_bytes() == case.new.read_bytes()
    verified = verify_bundle(case.out, trusted, NOW, installed_version=1)
    assert (verified.manifest.name, verified.manifest.version) == ("mlp", 2)
    assert sorted(p.name for p in case.out.parent.iterdir()) == ["mlp-v2.edge"]


def test_header_round_trips_and_keeps_unknown_fields(case: Case) -> None:
    d = case.header.to_dict() | {"hint": {"from": "a newer builder"}}
    header = DeltaHeader.from_dict(json.loads(canonical_json(d)))
    assert header.extra == {"hint": {"from": "a newer builder"}}
    assert dataclasses.replace(header, extra={}) == case.header
    assert json.loads(header.to_bytes()) == d


def test_exported_names() -> None:
    assert sorted(delta_module.__all__) == sorted(
        [
            "DELTA_SCHEMA",
            "FORMAT_VERSION",
            "MAGIC",
            "CopyOp",
            "DataOp",
            "DeltaHeader",
            "DeltaLimits",
            "DeltaOp",
            "ZeroOp",
            "apply_delta",
            "encode_header",
            "read_delta_header",
            "write_delta",
        ]
    )


def test_applying_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "import edge_sdk.bundle.delta\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'onnx', 'onnxruntime', 'torch', 'host_tools'})\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_limits_follow_the_bundle_limits_and_refuse_nonsense() -> None:
    limits = DeltaLimits.for_bundles(BundleLimits(max_bundle_bytes=1 << 20, max_manifest_bytes=4096), max_ops=10)
    assert (limits.max_target_bytes, limits.max_manifest_bytes, limits.max_ops) == (1 << 20, 4096, 10)
    with pytest.raises(ConfigError, match="max_ops"):
        DeltaLimits(max_ops=0)


# --- the base: damaged slot (local state) or another base (the delta's fault) ---------------


def test_one_altered_byte_in_the_base_slot_is_refused_as_local_state(case: Case) -> None:
    model = case.slot / "payload" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[100] ^= 1
    model.write_bytes(bytes(data))
    case.refused(StorageError, "does not match the slot's manifest")


def test_a_base_file_swapped_for_a_link_is_refused(case: Case, tmp_path: Path) -> None:
    model = case.slot / "payload" / "model.onnx"
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes(model.read_bytes())  # the very same bytes, but not in the slot
    model.unlink()
    model.symlink_to(outside)
    case.refused(StorageError, "model.onnx")


def test_missing_base_slot_is_refused(case: Case) -> None:
    for path in sorted(case.slot.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    case.slot.rmdir()
    case.refused(StorageError, "is missing")


def test_corrupt_slot_manifest_is_refused_as_local_state(case: Case) -> None:
    (case.slot / "manifest.json").write_bytes(b'{"schema": 1')
    case.refused(StorageError, "corrupt")


@pytest.mark.parametrize(
    ("field", "value"),
    [("base_version", 7), ("base_content", "0" * 64)],
)
def test_delta_naming_another_base_is_refused(case: Case, field: str, value: object) -> None:
    case.write(dataclasses.replace(case.header, **{field: value}))
    case.refused(DeltaError, "but the base slot holds mlp v1")


def test_encrypted_base_is_refused(case: Case, tmp_path: Path, key: SigningKey) -> None:
    encrypted = _pack(tmp_path, key, 1, BASE_MODEL, name="enc", encrypt_to=(RecipientKey.generate().public,))
    with BundleReader(encrypted) as reader:
        (case.slot / "manifest.json").write_bytes(reader.manifest_bytes)
    case.refused(DeltaError, "is encrypted")


def test_path_not_in_the_base_manifest_is_refused(case: Case) -> None:
    header = dataclasses.replace(case.header, files=(*case.header.files, "extra.bin"))
    case.write(header, [*case.ops[:-1], CopyOp(len(header.files) - 1, 0, 1), ZeroOp(case.ops[-1].length - 1)])
    case.refused(DeltaError, "'extra.bin', which the base manifest lacks")


@pytest.mark.parametrize("path", ["../v1/payload/model.onnx", "/etc/passwd", "payload/./x", "a/../model.onnx"])
def test_unsafe_paths_in_the_header_are_refused(case: Case, path: str) -> None:
    d = case.header.to_dict()
    d["files"] = [path]
    case.raw(_raw_delta(d, b""))
    case.refused(DeltaError, "unsafe base file path")
    with pytest.raises(DeltaError):
        dataclasses.replace(case.header, files=(path,))


# --- operations out of bounds --------------------------------------------------------------


def test_copy_past_the_end_of_a_base_file_is_refused(case: Case) -> None:
    ops = list(case.ops)
    i = next(i for i, op in enumerate(ops) if isinstance(op, CopyOp))
    op = ops[i]
    assert isinstance(op, CopyOp)
    ops[i] = CopyOp(op.file, len(BASE_MODEL) - op.length + 1, op.length)
    case.write(ops=ops)
    case.refused(DeltaError, f"copies bytes {len(BASE_MODEL) - op.length + 1}..{len(BASE_MODEL) + 1} of 'model.onnx'")


def test_copy_from_a_file_index_the_header_lacks_is_refused(case: Case) -> None:
    body = encode_header(case.header)
    ops = b"".join(op.head() + (op.data if isinstance(op, DataOp) else b"") for op in case.ops[:1])
    ops += bytes([1]) + encode_varint(9) + encode_varint(0) + encode_varint(10)
    case.raw(body + ops)
    case.refused(DeltaError, "copies from base file 9; the header lists 2")


def test_ops_writing_past_the_declared_size_are_stopped_before_they_run(case: Case) -> None:
    # One literal claiming a terabyte, with ten bytes behind it: refused on its length,
    # before anything is read or written, not later as "truncated" or at the hash.
    case.raw(encode_header(dataclasses.replace(case.header, ops=1)) + bytes([2]) + encode_varint(1 << 40) + bytes(10))
    case.refused(DeltaError, r"operation 0 would write past the declared size \(0 \+ 1099511627776 >")
    # Operations that each fit but together exceed the size: the first that overflows is named.
    ops = [*case.ops, ZeroOp(1)]
    case.raw(encode_header(dataclasses.replace(case.header, ops=len(ops))) + _encode(ops))
    case.refused(DeltaError, f"operation {len(ops) - 1} would write past the declared size")


def _encode(ops: list[DeltaOp]) -> bytes:
    return b"".join(op.head() + (bytes(op.data) if isinstance(op, DataOp) else b"") for op in ops)


def test_output_size_mismatch_is_refused(case: Case) -> None:
    ops = [*case.ops[:-1], ZeroOp(case.ops[-1].length - 512)]
    case.raw(encode_header(case.header) + _encode(ops))
    case.refused(DeltaError, f"delta writes {case.header.target_size - 512} bytes, its header declares")


def test_wrong_bytes_of_the_right_size_are_refused_at_the_hash(case: Case) -> None:
    ops = list(case.ops)
    i = next(i for i, op in enumerate(ops) if isinstance(op, DataOp) and len(op.data) > 600)
    op = ops[i]
    assert isinstance(op, DataOp)
    data = bytearray(op.data)
    data[-1] ^= 0xFF
    ops[i] = DataOp(bytes(data))
    case.write(ops=ops)
    case.refused(DeltaError, "rebuilt bundle has sha256")


# --- malformed files ---------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 5, 8, 9, 40, -4000, -1])
def test_truncated_delta_is_refused(case: Case, keep: int) -> None:
    data = case.delta.read_bytes()
    case.raw(data[:keep] if keep >= 0 else data[: len(data) + keep])
    case.refused(DeltaError, "truncated|writes")


def test_trailing_bytes_are_refused(case: Case) -> None:
    case.raw(case.delta.read_bytes() + b"\x00")
    case.refused(DeltaError, "bytes after its")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: b"EDGEDLX" + d[7:], "bad magic"),
        (lambda d: d[:7] + bytes([9]) + d[8:], "delta format 9"),
        (lambda d: d[:8] + b"\xff" * 11 + d[8:], "overlong varint"),
        (lambda d: d[:8] + encode_varint(1 << 30) + d[9:], "header is 1073741824 bytes"),
    ],
)
def test_bad_magic_version_and_header_length_are_refused(case: Case, mutate: object, match: str) -> None:
    assert callable(mutate)
    case.raw(mutate(case.delta.read_bytes()))
    case.refused(DeltaError, match)
    with pytest.raises(DeltaError, match=match):
        read_delta_header(case.delta)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"schema": 2}, "unsupported delta header schema 2"),
        ({"target_sha256": "ab"}, "target_sha256 must be 64"),
        ({"target_size": 0}, "target_size must be positive"),
        ({"target_name": "other"}, "same bundle"),
        ({"ops": -1}, "ops must be"),
        ({"files": "model.onnx"}, "files must be a list"),
        ({"files": ["model.onnx", "model.onnx"]}, "twice"),
        ({"base_version": True}, "base_version must be"),
    ],
)
def test_malformed_headers_are_refused(case: Case, change: dict[str, object], match: str) -> None:
    case.raw(_raw_delta(case.header.to_dict() | change, b""))
    case.refused(DeltaError, match)


def test_header_that_is_not_json_or_lacks_fields_is_refused(case: Case) -> None:
    case.raw(MAGIC + bytes([FORMAT_VERSION]) + encode_varint(3) + b"{{{")
    case.refused(DeltaError, "delta header")
    d = case.header.to_dict()
    del d["target_size"]
    case.raw(_raw_delta(d, b""))
    case.refused(DeltaError, "lacks field")


def test_limits_bound_header_ops_and_target(case: Case) -> None:
    case.refused(DeltaError, "header is", DeltaLimits(max_header_bytes=64))
    case.refused(DeltaError, f"declares {case.header.ops} operations", DeltaLimits(max_ops=2))
    case.refused(DeltaError, "rebuilds", DeltaLimits(max_target_bytes=1000))


@pytest.mark.parametrize(("op", "match"), [(bytes([7]), "unknown kind 7"), (bytes([3, 0]), "length 0")])
def test_unknown_or_empty_operations_are_refused(case: Case, op: bytes, match: str) -> None:
    case.raw(encode_header(dataclasses.replace(case.header, ops=1)) + op)
    case.refused(DeltaError, match)


def test_writer_refuses_ops_that_disagree_with_the_header(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "bad.delta"
    with pytest.raises(DeltaError, match="declares"):
        write_delta(out, case.header, case.ops[:-1])
    with pytest.raises(DeltaError, match="operations write"):
        write_delta(out, case.header, [*case.ops[:-1], ZeroOp(1)])
    with pytest.raises(DeltaError, match="COPY names base file 5"):
        write_delta(
            out,
            dataclasses.replace(case.header, ops=len(case.ops) + 1),
            [CopyOp(5, 0, 1), *case.ops[:-1], ZeroOp(case.ops[-1].length - 1)],
        )
    assert not out.exists()
    with pytest.raises(DeltaError):
        DataOp(b"")
    with pytest.raises(DeltaError):
        CopyOp(0, -1, 3)


def test_errors_say_who_is_to_blame() -> None:
    assert issubclass(DeltaError, UntrustedInputError)
    assert DeltaError("x").to_dict()["code"] == "delta_invalid"


def test_unreadable_delta_is_local_state(case: Case) -> None:
    os.unlink(case.delta)
    case.refused(StorageError, "cannot read delta")
    with pytest.raises(StorageError):
        read_delta_header(case.delta)
