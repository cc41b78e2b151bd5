"""host_tools.packing: what `edgectl pack` and `edgectl verify` do, with real keys, models and onnxruntime."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import onnx
import pytest
from harness import TinyModel, build_tiny_model
from sparse_models import mlp

import host_tools.packing
from edge_sdk.bundle import DeviceFacts, Target
from edge_sdk.errors import CompressionError, KeyStoreError, ModelLoadError, RollbackError, TargetMismatchError
from host_tools.keys import KeyRing, init_keys
from host_tools.packing import (
    CHECKS,
    CheckOptions,
    PackOptions,
    SparseOptions,
    check_bundle,
    checklist_bundle,
    pack_model,
)
from host_tools.report.bundle import check_text, checklist_text, packed_text

NOW = time.time()


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return init_keys(tmp_path / "keys", NOW)[0]


@pytest.fixture
def tiny(tmp_path: Path) -> TinyModel:
    return build_tiny_model(tmp_path)


def test_pack_then_check_a_dense_bundle(ring: KeyRing, tiny: TinyModel, tmp_path: Path) -> None:
    out = tmp_path / "tiny.edge"
    options = PackOptions(tiny.path, out, "tiny", 3, sample=tiny.sample, max_latency_ms=50.0)
    packed = pack_model(options, ring, NOW)

    bundle_key = ring.root.roles["bundles"].keyids[0]
    assert packed.signed_by == (bundle_key,)
    m = packed.manifest
    assert (m.name, m.version, m.runtime, m.precision, m.sparse) == ("tiny", 3, "onnxruntime", "fp32", None)
    assert [(t.name, t.dtype) for t in m.inputs] == [("input", "float32")]
    assert packed.to_dict() == {"bundle": str(out), "signed_by": [bundle_key], "manifest": m.to_dict()}
    assert packed_text(packed) == (
        f"packed tiny v3 (onnxruntime, fp32, {len(m.files)} file(s)) -> {out}\nsigned by {bundle_key}"
    )

    check = check_bundle(out, ring, NOW + 60)
    assert check.manifest == m
    assert [c.split(":")[0] for c in check.checks] == [
        "root",
        "archive",
        "signature",
        "manifest",
        "expiry",
        "target",
        "rollback",
        "files",
        "hashes",
    ]
    assert check.checks[0].startswith(f"root: v1, valid for another 365 days; bundle keys {bundle_key}, threshold 1")
    assert check.to_dict() == {"ok": True, "checks": list(check.checks), "manifest": m.to_dict()}
    assert check_text(check).splitlines()[0] == f"ok  {check.checks[0]}"
    assert check_text(check).endswith(f"\n{out}: tiny v3 verified")


def test_check_against_another_root_file_installed_version_and_device(
    ring: KeyRing, tiny: TinyModel, tmp_path: Path
) -> None:
    out = tmp_path / "t.edge"
    target = Target(("aarch64",), 0, ())
    pack_model(PackOptions(tiny.path, out, "t", 2, target=target), ring, NOW)
    assert check_bundle(out, ring, NOW, CheckOptions(root_file=ring.root_path)).manifest.version == 2
    with pytest.raises(RollbackError):
        check_bundle(out, ring, NOW, CheckOptions(installed_version=2))
    with pytest.raises(TargetMismatchError):
        check_bundle(out, ring, NOW, CheckOptions(device=DeviceFacts("x86_64", 1 << 30, frozenset())))
    with pytest.raises(KeyStoreError, match="cannot read root"):
        check_bundle(out, ring, NOW, CheckOptions(root_file=tmp_path / "missing.json"))


def test_a_model_that_does_not_load_writes_nothing(ring: KeyRing, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 definitely not protobuf")
    out = tmp_path / "g.edge"
    with pytest.raises(ModelLoadError, match=r"garbage\.onnx"):
        pack_model(PackOptions(garbage, out, "g", 1), ring, NOW)
    assert not out.exists()


def test_missing_bundle_keys_write_nothing(tiny: TinyModel, tmp_path: Path) -> None:
    ring = init_keys(tmp_path / "keys", NOW)[0]
    for keyid in ring.root.roles["bundles"].keyids:
        ring.private_path(keyid).unlink()
    out = tmp_path / "t.edge"
    with pytest.raises(KeyStoreError, match="bundles"):
        pack_model(PackOptions(tiny.path, out, "t", 1), ring, NOW)
    assert not out.exists()


@pytest.mark.parametrize("int8_values", [False, True])
def test_sparse_bundle_carries_csr_layers_and_pinned_execution(
    ring: KeyRing, tmp_path: Path, int8_values: bool
) -> None:
    model = tmp_path / "sparse.onnx"
    onnx.save(mlp([16, 64, 8], 0.9), model)
    out = tmp_path / "s.edge"
    execution = "dense_int8" if int8_values else "sparse"
    sparse = SparseOptions(0.5, int8_values, execution)
    packed = pack_model(PackOptions(model, out, "s", 1, sparse=sparse), ring, NOW)

    m = packed.manifest
    assert m.sparse is not None and m.execution == execution
    assert m.sparse.values == ("int8" if int8_values else "fp32")
    assert [layer.sparsity > 0.5 for layer in m.sparse.layers] == [True, True]
    assert packed_text(packed).splitlines()[2].startswith(f"sparse: 2 layer(s) as CSR ({m.sparse.values} values): ")
    assert check_bundle(out, ring, NOW).manifest == m


def test_sparse_split_that_disagrees_with_the_model_is_not_packed(
    ring: KeyRing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "sparse.onnx"
    onnx.save(mlp([16, 32, 8], 0.9), model)
    monkeypatch.setattr(host_tools.packing, "agreement", lambda *_: "outputs differ")
    out = tmp_path / "s.edge"
    with pytest.raises(CompressionError, match="differ"):
        pack_model(PackOptions(model, out, "s", 1, sparse=SparseOptions()), ring, NOW)
    assert not out.exists()


def test_options_are_frozen() -> None:
    options = PackOptions(Path("m.onnx"), Path("b.edge"), "m", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.version = 2  # type: ignore[misc]  # the assignment under test


def test_checklist_marks_the_failing_check_and_what_did_not_run(ring: KeyRing, tiny: TinyModel, tmp_path: Path) -> None:
    out = tmp_path / "t.edge"
    pack_model(PackOptions(tiny.path, out, "t", 2, target=Target(("aarch64",), 0, ())), ring, NOW)

    passed = checklist_bundle(out, ring, NOW)
    assert passed.error is None and passed.failed is None and passed.manifest is not None
    assert [i.name for i in passed.items] == list(CHECKS) and {i.status for i in passed.items} == {"ok"}
    assert checklist_text(passed) == check_text(check_bundle(out, ring, NOW))
    assert passed.to_dict()["checks"] == list(check_bundle(out, ring, NOW).checks)

    old = checklist_bundle(out, ring, NOW, CheckOptions(installed_version=2))
    assert isinstance(old.error, RollbackError) and old.failed is not None and old.failed.name == "rollback"
    assert [i.status for i in old.items] == ["ok"] * 6 + ["failed", "not run", "not run"]
    assert old.items[2].detail.startswith("1 of threshold 1 by trusted key(s)")  # the passed checks keep details
    text = checklist_text(old).splitlines()
    assert text[6] == f"FAIL rollback: {old.error.message}" and text[7].startswith("--  files: not run")
    assert text[-1] == f"{out}: failed the rollback check; a device would refuse it"
    data = old.to_dict()
    assert data["ok"] is False and data["checklist"][6] == {
        "check": "rollback",
        "status": "failed",
        "detail": old.error.message,
    }

    wrong_device = checklist_bundle(out, ring, NOW, CheckOptions(device=DeviceFacts("x86_64", 1 << 30, frozenset())))
    assert wrong_device.failed is not None and wrong_device.failed.name == "target"

    expired = checklist_bundle(out, ring, NOW + 400 * 86400)  # the root (365 days) expires first
    assert expired.failed is not None and expired.failed.name == "root"
    assert "UTC" in expired.failed.detail and str(int(NOW))[:6] not in expired.failed.detail  # no epoch seconds
    target_line = next(i.detail for i in passed.items if i.name == "target")
    assert "{" not in target_line and "aarch64" in target_line  # never a Python dict
    assert [i.status for i in expired.items][1:] == ["not run"] * 8

    cut = tmp_path / "cut.edge"
    cut.write_bytes(out.read_bytes()[:-3000])
    broken = checklist_bundle(cut, ring, NOW)
    assert broken.failed is not None and broken.error is not None and broken.manifest is None
