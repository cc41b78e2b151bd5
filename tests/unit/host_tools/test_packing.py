"""host_tools.packing: what `edgectl pack` and `edgectl verify` do, with real keys, models and onnxruntime."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from harness import TinyModel, build_tiny_model
from sparse_models import mlp

import host_tools.packing
from edge_sdk.bundle import BundleSpec, DeviceFacts, Target, TensorInfo, pack_bundle, verify_bundle
from edge_sdk.errors import (
    CompressionError,
    ConfigError,
    KeyStoreError,
    ManifestError,
    ModelLoadError,
    RollbackError,
    TargetMismatchError,
)
from host_tools.keys import KeyRing, init_keys
from host_tools.packing import (
    CHECKS,
    CheckOptions,
    PackOptions,
    SparseOptions,
    canonical_sample,
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


# --- the sample input (--sample) --------------------------------------------------------


def _inputs(*specs: tuple[str, tuple[int | None, ...], str]) -> tuple[TensorInfo, ...]:
    return tuple(TensorInfo(name, shape, dtype) for name, shape, dtype in specs)


def test_sample_layouts_become_the_model_input_names() -> None:
    one = _inputs(("input", (None, 16), "float32"))
    x = np.ones((2, 16), np.float64)
    for arrays in ({"input": x}, {"x": x}, {"x.input": x}, {"input": x, "y": np.zeros(2, np.int64)}):
        sample = canonical_sample(arrays, one)
        assert list(sample) == ["input"] and sample["input"].dtype == np.float32
    two = _inputs(("input_ids", (None, None), "int64"), ("attention_mask", (None, None), "int64"))
    ids = np.ones((1, 7), np.int32)
    sample = canonical_sample({"x.attention_mask": ids, "x.input_ids": ids}, two)
    assert list(sample) == ["input_ids", "attention_mask"] and sample["input_ids"].dtype == np.int64


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.ones((2, 15), np.float32)}, r"'input' expects shape \[\?, 16\] .* the sample has \[2, 15\]"),
        ({"x": np.ones((2, 2, 16), np.float32)}, r"'input' expects shape \[\?, 16\]"),
        ({"x": np.ones((2, 16), np.float32), "x.other": np.ones((2, 16))}, r"has both|no input named other"),
        ({"x.other": np.ones((2, 16), np.float32)}, r"no input named other; missing x.input"),
        ({"pixels": np.ones((2, 16), np.float32)}, r"no array for model input 'input' \(the sample has \['pixels'\]"),
    ],
)
def test_sample_that_does_not_fit_is_refused_naming_the_input(arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        canonical_sample(arrays, _inputs(("input", (None, 16), "float32")), "s.npz")


def test_sample_dtype_must_keep_its_kind() -> None:
    ids = _inputs(("input_ids", (None, 8), "int64"))
    with pytest.raises(ConfigError, match=r"'input_ids' expects int64, the sample has float32"):
        canonical_sample({"x": np.ones((1, 8), np.float32)}, ids)
    with pytest.raises(ConfigError, match=r"one array 'x', but the model takes 2 inputs"):
        canonical_sample({"x": np.ones((1, 8))}, (*ids, TensorInfo("mask", (None, 8), "int64")))


def test_pack_stores_the_canonical_sample_and_refuses_a_wrong_one(
    ring: KeyRing, tiny: TinyModel, tmp_path: Path
) -> None:
    eval_layout = tmp_path / "eval.npz"
    np.savez(eval_layout, x=np.ones((3, 16), np.float64), y=np.zeros(3, np.int64))
    out = tmp_path / "t.edge"
    pack_model(PackOptions(tiny.path, out, "t", 1, sample=eval_layout), ring, NOW)
    staged = tmp_path / "staged"
    staged.mkdir()
    verify_bundle(out, ring.root.trusted("bundles"), NOW, extract_to=staged)
    with np.load(staged / "sample_input.npz") as npz:
        assert npz.files == ["input"] and npz["input"].dtype == np.float32 and npz["input"].shape == (3, 16)

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, input=np.ones((3, 4), np.float32))
    with pytest.raises(ConfigError, match=r"'input' expects shape \[\?, 16\]"):
        pack_model(PackOptions(tiny.path, tmp_path / "w.edge", "t", 2, sample=wrong), ring, NOW)
    assert not (tmp_path / "w.edge").exists()
    with pytest.raises(ConfigError, match=r"no such file"):
        pack_model(PackOptions(tiny.path, tmp_path / "w.edge", "t", 2, sample=tmp_path / "none.npz"), ring, NOW)


def test_verify_refuses_a_bundled_sample_the_device_could_not_feed(
    ring: KeyRing, tiny: TinyModel, tmp_path: Path
) -> None:
    # A bundle packed without the check (e.g. by an older edgectl): its sample is keyed "x".
    x_layout = tmp_path / "x.npz"
    np.savez(x_layout, x=np.ones((1, 16), np.float32))
    out = tmp_path / "old.edge"
    spec = BundleSpec(
        "old", 1, "onnxruntime", tiny.path, "fp32", (TensorInfo("input", (None, 16), "float32"),), x_layout
    )
    pack_bundle(spec, ring.role_keys("bundles"), out, NOW)
    with pytest.raises(ManifestError, match=r"sample: sample_input.npz has no array named 'input'"):
        check_bundle(out, ring, NOW)

    bad_shape = tmp_path / "bad.npz"
    np.savez(bad_shape, input=np.ones((1, 3), np.float32))
    pack_bundle(dataclasses.replace(spec, version=2, sample_input=bad_shape), ring.role_keys("bundles"), out, NOW)
    with pytest.raises(ManifestError, match=r"sample: sample_input.npz: input 'input' expects shape"):
        check_bundle(out, ring, NOW)


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
