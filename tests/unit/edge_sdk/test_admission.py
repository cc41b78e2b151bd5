"""edge_sdk.bundle.admission: the version floor, one content per version, and the cheap checks of an offer."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.bundle import BundleSpec, Expected, FileEntry, Target, VersionHistory, pack_bundle, verify_bundle
from edge_sdk.bundle.admission import (
    OfferedBundle,
    check_offer,
    check_storage,
    check_version,
    content_digest,
    runtime_available,
    storage_needed,
)
from edge_sdk.bundle.manifest import DeviceFacts
from edge_sdk.errors import ExpiredError, ManifestError, RollbackError, StorageError, TargetMismatchError
from edge_sdk.trust import SigningKey, TrustedKeys

NOW = 1_700_000_000.0
A, B = "a" * 64, "b" * 64
DEVICE = DeviceFacts("aarch64", 4 << 30, frozenset({"npu"}))


# --- the floor ------------------------------------------------------------------------------


def test_a_version_above_the_floor_is_admitted_and_the_line_says_why() -> None:
    line = check_version(VersionHistory(installed=2, floor=2, ran={2: A}), "my-cnn", 3, B, rollback=False)
    assert line == "rollback: v3 is newer than the floor v2 (the version this device runs; installed: v2)"
    assert check_version(VersionHistory(), "my-cnn", 1, A, rollback=False).startswith("rollback: no floor")


def test_the_refusal_names_the_installed_version_the_floor_and_why() -> None:
    with pytest.raises(RollbackError) as info:
        check_version(VersionHistory(installed=2, floor=2, ran={2: A}), "my-cnn", 2, A, rollback=False)
    assert info.value.message == (
        "my-cnn v2 is not newer than the floor v2 (the version this device runs; installed: v2)"
    )
    assert info.value.details == {
        "offered": 2,
        "installed": 2,
        "floor": 2,
        "floor_reason": "ran",
        "reason": "not_newer",
    }


def test_after_a_signed_rollback_the_floor_is_the_restored_version() -> None:
    """The issue's case: after `rollback --version 1`, v2 deploys again (its content is the one that ran)."""
    after = VersionHistory(installed=1, floor=1, floor_reason="rollback", ran={1: A, 2: B})
    assert "newer than the floor v1" in check_version(after, "my-cnn", 2, B, rollback=False)
    with pytest.raises(RollbackError, match=r"not newer than the floor v1 \(the version this device runs, since a "):
        check_version(after, "my-cnn", 1, A, rollback=False)


def test_after_a_remove_the_message_says_nothing_is_installed() -> None:
    removed = VersionHistory(installed=None, floor=2, floor_reason="removed", ran={1: A, 2: B})
    with pytest.raises(RollbackError) as info:
        check_version(removed, "my-cnn", 1, A, rollback=False)
    assert info.value.message == (
        "my-cnn v1 is not newer than the floor v2 (the version this device last ran, until a signed remove; "
        "installed: none)"
    )
    assert "installed v" not in info.value.message and info.value.details["installed"] is None
    assert "explicitly allowed" in check_version(removed, "my-cnn", 1, A, rollback=True)


def test_same_version_other_content_is_refused_even_as_a_rollback() -> None:
    history = VersionHistory(installed=1, floor=1, floor_reason="rollback", ran={1: A, 2: A.replace("a", "c")})
    for rollback in (False, True):
        with pytest.raises(RollbackError) as info:
            check_version(history, "my-cnn", 2, B, rollback=rollback)
        assert "my-cnn v2 differs from the v2 this device already ran" in info.value.message
        assert "pack the change as a new version" in info.value.message
        assert info.value.details["reason"] == "content_differs"
    # Content unknown (an old host's offer): left to the check after receipt.
    assert check_version(history, "my-cnn", 2, None, rollback=False)


# --- content --------------------------------------------------------------------------------


def test_content_digest_names_the_file_list_not_the_order() -> None:
    f1, f2 = FileEntry("model.onnx", 10, A), FileEntry("sample_input.npz", 5, B)
    assert content_digest([f1, f2]) == content_digest([f2, f1])
    assert content_digest([f1, f2]) != content_digest([FileEntry("model.onnx", 10, B), f2])
    assert len(content_digest([f1])) == 64


def test_verify_bundle_with_a_history_refuses_other_content_under_a_version_that_ran(tmp_path: Path) -> None:
    key = SigningKey.generate()
    trusted = TrustedKeys((key.public_key,))

    def pack(version: int, payload: bytes, out: str, signer: SigningKey = key) -> Path:
        model = tmp_path / f"{out}.onnx"
        model.write_bytes(payload)
        pack_bundle(BundleSpec("my-cnn", version, "onnxruntime", model, ttl_s=3600), [signer], tmp_path / out, NOW)
        return tmp_path / out

    v2 = pack(2, b"weights two" * 20, "v2.edge")
    v2_other = pack(2, b"weights TWO" * 20, "v2-other.edge")
    ran = verify_bundle(v2, trusted, NOW).manifest
    history = VersionHistory(installed=1, floor=1, floor_reason="rollback", ran={2: content_digest(ran.files)})
    assert verify_bundle(v2, trusted, NOW, installed_version=history).manifest.version == 2
    with pytest.raises(RollbackError, match="differs from the v2 this device already ran"):
        verify_bundle(v2_other, trusted, NOW, installed_version=lambda _name: history)
    # The signed command names the content: a bundle with other content is not the one it offered.
    with pytest.raises(ManifestError, match="does not hold the content the signed command describes"):
        verify_bundle(v2_other, trusted, NOW, expect=Expected("my-cnn", 2, content=content_digest(ran.files)))


# --- storage --------------------------------------------------------------------------------


def test_storage_counts_the_download_and_the_unpacked_payload() -> None:
    mb = 1 << 20
    # The case: 12 MB fits on a 20 MB disk as a download, not once it is unpacked too.
    assert storage_needed(12 * mb, 12 * mb) > 20 * mb > 12 * mb
    with pytest.raises(StorageError) as info:
        check_storage("big", 1, 12 * mb, 12 * mb, 20 * mb, "/data")
    msg = info.value.message
    assert f"{12 * mb} bytes to download + {12 * mb} bytes unpacked" in msg and f"{20 * mb} bytes free" in msg
    assert info.value.details["needed_bytes"] == storage_needed(12 * mb, 12 * mb)
    assert check_storage("small", 1, mb, mb, 20 * mb, "/data").startswith("storage: ")


# --- the offer ------------------------------------------------------------------------------


def _offer(**kw: object) -> OfferedBundle:
    fields: dict[str, object] = {"name": "my-cnn", "version": 3, "size": 1000, "runtime": "onnxruntime"}
    fields.update(kw)
    return OfferedBundle(**fields)  # type: ignore[arg-type]


def test_an_offer_passes_every_check_it_carries() -> None:
    lines = check_offer(
        _offer(expires_at=NOW + 10, unpacked_bytes=900, target=Target(("aarch64",), 1 << 30, ("npu",))),
        VersionHistory(installed=2, floor=2),
        DEVICE,
        {"onnxruntime"},
        NOW,
        (1 << 30, "/data"),
    )
    assert [line.split(":")[0] for line in lines] == ["rollback", "runtime", "target", "storage"]


@pytest.mark.parametrize(
    "offer, error, match",
    [
        (_offer(version=2), RollbackError, "not newer than the floor v2"),
        (_offer(expires_at=NOW - 1), ExpiredError, "expired"),
        (_offer(runtime="litert"), TargetMismatchError, "needs runtime litert, which this device lacks"),
        (_offer(target=Target(("x86_64",))), TargetMismatchError, "built for x86_64"),
        (_offer(target=Target(min_memory_bytes=8 << 30)), TargetMismatchError, "bytes of memory"),
        (_offer(target=Target(accelerators=("cuda",))), TargetMismatchError, "accelerator"),
        (_offer(unpacked_bytes=3 << 20, size=3 << 20), StorageError, "bytes unpacked"),
    ],
    ids=["version", "expired", "runtime", "arch", "memory", "accelerator", "storage"],
)
def test_an_offer_is_refused_for_what_it_says(offer: OfferedBundle, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_offer(offer, VersionHistory(installed=2, floor=2), DEVICE, {"onnxruntime"}, NOW, (6 << 20, "/data"))


def test_a_profile_offer_skips_the_version_and_a_bare_offer_checks_only_the_version() -> None:
    assert check_offer(_offer(version=1), None, DEVICE, {"onnxruntime"}, NOW) == ("runtime: onnxruntime is installed",)
    bare = OfferedBundle("my-cnn", 3, 1000)  # an older host's command: name, version and size only
    assert check_offer(bare, VersionHistory(installed=2, floor=2), DEVICE, (), NOW, (0, "/data")) == (
        "rollback: v3 is newer than the floor v2 (the version this device runs; installed: v2)",
    )


def test_litert_bundles_run_on_either_litert_package() -> None:
    assert runtime_available("litert", {"tflite-runtime"}) and runtime_available("litert", ["litert"])
    assert not runtime_available("litert", {"onnxruntime"}) and not runtime_available("onnxruntime", ())
