"""device_agent.installer: slots, atomic activation, rollback and recovery on a real data dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from device_agent.installer import Installer
from edge_sdk.bundle import BundleSpec, content_digest, pack_bundle
from edge_sdk.errors import (
    BundleFormatError,
    ExpiredError,
    RollbackError,
    SignatureError,
    StorageError,
    UntrustedInputError,
    UntrustedKeyError,
)
from edge_sdk.trust import SigningKey, TrustedKeys

NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def make_bundle(tmp_path: Path, key: SigningKey):  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()

    def make(version: int, name: str = "digits", signer: SigningKey | None = None, ttl: float = 3600.0) -> Path:
        model = src / f"{name}-{version}.onnx"
        model.write_bytes(f"model {name} v{version}".encode() * 50)
        sample = src / f"{name}-{version}.npz"
        sample.write_bytes(b"sample")
        out = src / f"{name}-v{version}.edge"
        pack_bundle(
            BundleSpec(name, version, "onnxruntime", model, sample_input=sample, ttl_s=ttl),
            [signer or key],
            out,
            now=NOW,
        )
        return out

    return make


@pytest.fixture
def installer(tmp_path: Path, key: SigningKey) -> Installer:
    return Installer(tmp_path / "data", TrustedKeys((key.public_key,)))


def _listing(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() else None
    return out


def _install(installer: Installer, bundle: Path):  # type: ignore[no-untyped-def]
    """A successful install: staged, activated, and confirmed once its health check passed."""
    staged = installer.stage(bundle, NOW)
    before = installer.activate(staged)
    installer.confirm(staged.verified.manifest.name)
    return staged, before


def test_new_data_dir_has_the_layout(installer: Installer) -> None:
    for d in ("slots", "staging", "tmp"):
        assert (installer.data_dir / d).is_dir()
    assert installer.all_active() == []
    assert installer.active("digits") is None
    assert installer.accepted_version("digits") is None
    assert not installer.state_path.exists()


def test_stage_then_activate(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    staged = installer.stage(make_bundle(1), NOW)
    assert staged.slot == installer.slots_dir / "digits" / "v1"
    assert (staged.slot / "payload" / "digits-1.onnx").read_bytes() == b"model digits v1" * 50
    assert installer.active("digits") is None  # staged is not active
    assert installer.activate(staged) is None
    active = installer.active("digits")
    assert active is not None
    assert active.version == 1
    assert active.model_path.read_bytes() == b"model digits v1" * 50
    assert active.sample_path is not None and active.sample_path.read_bytes() == b"sample"
    assert active.to_dict() == {"name": "digits", "version": 1, "precision": "fp32"}
    assert installer.accepted_version("digits") is None  # not before it passed its health check
    assert list(installer.tmp_dir.iterdir()) == []
    state = json.loads(installer.state_path.read_bytes())
    assert state["bundles"]["digits"] == {
        "active": {"version": 1},
        "previous": None,
        "floor": None,
        "ran": {},
        "pending": {"command_id": ""},
    }
    installer.confirm("digits")
    assert installer.accepted_version("digits") == 1
    state = json.loads(installer.state_path.read_bytes())
    assert state["bundles"]["digits"] == {
        "active": {"version": 1},
        "previous": None,
        "floor": {"version": 1, "reason": "ran"},
        "ran": {"1": content_digest(staged.verified.manifest.files)},
    }


def test_second_version_makes_the_first_previous(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(1))
    _, before = _install(installer, make_bundle(2))
    assert before is not None and before.version == 1
    assert installer.active("digits").version == 2  # type: ignore[union-attr]
    assert installer.previous("digits").version == 1  # type: ignore[union-attr]
    # A third version prunes the oldest slot: only active and previous stay.
    _install(installer, make_bundle(3))
    assert sorted(p.name for p in (installer.slots_dir / "digits").iterdir()) == ["v2", "v3"]
    assert installer.accepted_version("digits") == 3


def test_state_survives_a_restart(tmp_path: Path, key: SigningKey, installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(1))
    _install(installer, make_bundle(2))
    again = Installer(installer.data_dir, TrustedKeys((key.public_key,)))
    assert again.active("digits").version == 2  # type: ignore[union-attr]
    assert again.previous("digits").version == 1  # type: ignore[union-attr]
    assert [a.name for a in again.all_active()] == ["digits"]


def test_rollback_restores_previous_and_removes_the_failed_slot(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(1))
    _install(installer, make_bundle(2))
    now_active = installer.rollback("digits")
    assert now_active is not None and now_active.version == 1
    assert installer.active("digits").version == 1  # type: ignore[union-attr]
    assert installer.previous("digits") is None
    assert not (installer.slots_dir / "digits" / "v2").exists()
    assert (installer.slots_dir / "digits" / "v1" / "payload").is_dir()


def test_rollback_protection_survives_rollback(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = make_bundle(1), make_bundle(2)
    _install(installer, v1)
    _install(installer, v2)
    installer.rollback("digits")
    assert installer.accepted_version("digits") == 2
    # The failed v2 cannot be installed again, and neither can the older v1.
    with pytest.raises(RollbackError):
        installer.stage(v2, NOW)
    with pytest.raises(RollbackError):
        installer.stage(v1, NOW)
    assert installer.stage(make_bundle(3), NOW).slot.name == "v3"


def test_rollback_with_nothing_previous_keeps_the_high_water_mark(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    v1 = make_bundle(1)
    _install(installer, v1)
    assert installer.rollback("digits") is None
    assert installer.active("digits") is None
    assert installer.all_active() == []
    assert installer.accepted_version("digits") == 1
    assert not (installer.slots_dir / "digits" / "v1").exists()
    with pytest.raises(RollbackError):
        installer.stage(v1, NOW)
    # Rolling back again, or rolling back an unknown name, is harmless.
    assert installer.rollback("digits") is None
    assert installer.rollback("never-installed") is None
    assert installer.accepted_version("digits") == 1


def test_bundles_of_different_names_are_independent(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(5, name="digits"))
    _install(installer, make_bundle(1, name="minilm"))
    assert [(a.name, a.version) for a in installer.all_active()] == [("digits", 5), ("minilm", 1)]
    assert installer.accepted_version("minilm") == 1


def test_recover_removes_leftovers_but_keeps_active_and_previous(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(1))
    _install(installer, make_bundle(2))
    (installer.tmp_dir / "unpack-abc").mkdir()
    (installer.tmp_dir / "unpack-abc" / "half.bin").write_bytes(b"x")
    partial = installer.staging_dir / f"{'ab' * 16}.part"
    partial.write_bytes(b"partial transfer")
    orphan = installer.slots_dir / "digits" / "v9"
    (orphan / "payload").mkdir(parents=True)
    other = installer.slots_dir / "ghost" / "v1"
    other.mkdir(parents=True)
    removed = installer.recover()
    assert sorted(removed) == sorted(str(p) for p in (installer.tmp_dir / "unpack-abc", orphan, other))
    assert list(installer.tmp_dir.iterdir()) == []
    # A partial transfer is kept for device_agent.receiving to resume (or remove by its own bounds).
    assert list(installer.staging_dir.iterdir()) == [partial] and partial.read_bytes() == b"partial transfer"
    assert sorted(p.name for p in (installer.slots_dir / "digits").iterdir()) == ["v1", "v2"]
    assert installer.active("digits").version == 2  # type: ignore[union-attr]
    assert installer.previous("digits").version == 1  # type: ignore[union-attr]
    assert installer.recover() == []


def test_staged_but_not_activated_slot_is_removed_by_recover(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(1))
    staged = installer.stage(make_bundle(2), NOW)  # power cut before activate()
    assert staged.slot.exists()
    installer.recover()
    assert not staged.slot.exists()
    assert installer.active("digits").version == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b'{"schema": 3, "bundles": {}}', b'{"schema": 1, "bundles": []}', b"[]", b"null", b"3"],
    ids=repr,
)
def test_corrupt_state_json_is_a_storage_error(tmp_path: Path, key: SigningKey, content: bytes) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "state.json").write_bytes(content)
    with pytest.raises(StorageError, match="corrupt"):
        Installer(data, TrustedKeys((key.public_key,)))


def test_unwritable_data_dir_is_a_storage_error(tmp_path: Path, key: SigningKey) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    with pytest.raises(StorageError):
        Installer(blocker / "data", TrustedKeys((key.public_key,)))


def test_missing_slot_named_in_state_is_a_storage_error(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(1))
    (installer.slots_dir / "digits" / "v1" / "manifest.json").unlink()
    with pytest.raises(StorageError):
        installer.active("digits")


def _refusals(make_bundle, tmp_path: Path) -> list[tuple[Path, type[UntrustedInputError]]]:  # type: ignore[no-untyped-def]
    corrupt = tmp_path / "corrupt.edge"
    good = make_bundle(7).read_bytes()
    corrupt.write_bytes(good[:5000] + bytes([good[5000] ^ 1]) + good[5001:])
    junk = tmp_path / "junk.edge"
    junk.write_bytes(b"junk" * 1000)
    return [
        (make_bundle(8, signer=SigningKey.generate()), UntrustedKeyError),
        (make_bundle(9, ttl=1.0), ExpiredError),
        (make_bundle(1), RollbackError),  # older than the installed v2
        (corrupt, UntrustedInputError),
        (junk, BundleFormatError),
    ]


def test_refused_bundles_change_nothing(installer: Installer, make_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(1))
    _install(installer, make_bundle(2))
    for bundle, error in _refusals(make_bundle, tmp_path):
        slots_before = _listing(installer.slots_dir)
        state_before = installer.state_path.read_bytes()
        with pytest.raises(error):
            installer.stage(bundle, NOW + 10)
        assert _listing(installer.slots_dir) == slots_before, bundle.name
        assert installer.state_path.read_bytes() == state_before
        assert list(installer.tmp_dir.iterdir()) == [], bundle.name
    assert installer.active("digits").version == 2  # type: ignore[union-attr]


def test_hash_mismatch_after_partial_extraction_leaves_no_scratch(
    installer: Installer, make_bundle, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The payload flip is caught only after some bytes were extracted into tmp/."""
    good = make_bundle(3)
    data = bytearray(good.read_bytes())
    at = data.find(b"model digits v3")
    assert at > 0
    data[at] ^= 0x20
    bad = tmp_path / "bad-payload.edge"
    bad.write_bytes(bytes(data))
    before = _listing(installer.data_dir)
    with pytest.raises(UntrustedInputError):
        installer.stage(bad, NOW)
    assert _listing(installer.data_dir) == before
    assert list(installer.tmp_dir.iterdir()) == []


def test_untrusted_signer_cannot_raise_the_rollback_mark(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    """A forged high version must not lock the device out of genuine updates."""
    _install(installer, make_bundle(1))
    with pytest.raises(SignatureError):
        installer.stage(make_bundle(1000, signer=SigningKey.generate()), NOW)
    assert installer.accepted_version("digits") == 1
    assert installer.stage(make_bundle(2), NOW).slot.name == "v2"


def test_stage_replaces_a_leftover_slot_of_the_same_version(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    leftover = installer.slots_dir / "digits" / "v1"
    (leftover / "payload").mkdir(parents=True)
    (leftover / "payload" / "stale.bin").write_bytes(b"stale")
    staged = installer.stage(make_bundle(1), NOW)
    assert sorted(os.listdir(staged.slot / "payload")) == ["digits-1.onnx", "sample_input.npz"]


# --- two-phase activation, crash recovery, deferred installs, profiling scratch ---------------


def test_activation_is_pending_until_confirmed(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(1))
    installer.confirm("digits")
    staged = installer.stage(make_bundle(2), NOW)
    installer.activate(staged, "c" * 32)
    assert installer.pending() == ["digits"]
    installer.confirm("digits")
    assert installer.pending() == []
    assert installer.active("digits").version == 2  # type: ignore[union-attr]
    assert installer.previous("digits").version == 1  # type: ignore[union-attr]


def test_restart_rolls_back_an_unconfirmed_version(
    tmp_path: Path, key: SigningKey, installer: Installer, make_bundle
) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(1))
    installer.confirm("digits")
    staged = installer.stage(make_bundle(2), NOW)
    installer.activate(staged, "c" * 32)  # power cut during the health check
    again = Installer(tmp_path / "data", TrustedKeys((key.public_key,)))
    again.recover()
    (rb,) = again.roll_back_pending()
    assert (rb.name, rb.version, rb.command_id, rb.restored) == ("digits", 2, "c" * 32, 1)
    assert again.active("digits").version == 1  # type: ignore[union-attr]
    assert not staged.slot.exists()
    assert again.pending() == [] and again.roll_back_pending() == []
    assert again.accepted_version("digits") == 1  # the version that never proved itself does not raise the floor


def test_unconfirmed_first_install_rolls_back_to_nothing(
    tmp_path: Path, key: SigningKey, installer: Installer, make_bundle
) -> None:  # type: ignore[no-untyped-def]
    installer.activate(installer.stage(make_bundle(1), NOW))  # never confirmed
    again = Installer(tmp_path / "data", TrustedKeys((key.public_key,)))
    (rb,) = again.roll_back_pending()
    assert rb.restored is None and again.active("digits") is None and again.all_active() == []


def test_checkpoints_are_reached_in_order(tmp_path: Path, key: SigningKey, make_bundle) -> None:  # type: ignore[no-untyped-def]
    seen: list[str] = []
    inst = Installer(tmp_path / "cp", TrustedKeys((key.public_key,)), checkpoint=seen.append)
    inst.activate(inst.stage(make_bundle(1), NOW))
    inst.confirm("digits")
    assert seen == ["staged", "activated", "confirmed"]


def test_recover_removes_a_torn_state_temp_file(installer: Installer) -> None:
    torn = installer.data_dir / ".state.json.abc123.tmp"
    torn.write_bytes(b'{"schema": 1, "bun')
    assert str(torn) in installer.recover()
    assert not torn.exists()


def test_deferred_installs_survive_restart_and_incomplete_ones_vanish(
    tmp_path: Path, key: SigningKey, installer: Installer, make_bundle
) -> None:  # type: ignore[no-untyped-def]
    part = installer.staging_dir / f"{'a' * 32}.part"
    part.write_bytes(make_bundle(1).read_bytes())
    installer.defer("a" * 32, part, b'{"cmd": 1}')
    (installer.deferred_dir / f"{'b' * 32}.edge").write_bytes(b"bundle without its command")
    (installer.deferred_dir / f"{'c' * 32}.cmd").write_bytes(b"command without its bundle")
    again = Installer(tmp_path / "data", TrustedKeys((key.public_key,)))
    again.recover()
    [(tid, path, cmd)] = again.deferred()
    assert tid == "a" * 32 and cmd == b'{"cmd": 1}' and path.read_bytes() == make_bundle(1).read_bytes()
    assert sorted(p.name for p in again.deferred_dir.iterdir()) == [f"{'a' * 32}.cmd", f"{'a' * 32}.edge"]
    again.drop_deferred(tid)
    assert again.deferred() == [] and list(again.deferred_dir.iterdir()) == []


def test_profiling_scratch_never_touches_state_and_skips_rollback_protection(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(2))
    installer.confirm("digits")
    before = installer.state_path.read_bytes()
    slots = _listing(installer.slots_dir)
    scratch = installer.stage_scratch(make_bundle(1), NOW)  # older than installed: fine for profiling
    assert scratch.slot.parent == installer.tmp_dir
    assert (scratch.slot / "payload" / "digits-1.onnx").read_bytes() == b"model digits v1" * 50
    installer.discard(scratch)
    assert not scratch.slot.exists()
    assert installer.state_path.read_bytes() == before and _listing(installer.slots_dir) == slots


def test_profiling_scratch_still_refuses_an_untrusted_bundle(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UntrustedKeyError):
        installer.stage_scratch(make_bundle(1, signer=SigningKey.generate()), NOW)
    assert list(installer.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("method, names", [("stage", "slots"), ("stage_scratch", "tmp")])
def test_disk_full_while_unpacking_is_a_storage_error_and_leaves_no_scratch(
    installer: Installer,
    make_bundle,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    names: str,  # type: ignore[no-untyped-def]
) -> None:
    import device_agent.installer as installer_module

    def disk_full(*args: object, extract_to: Path, **kwargs: object) -> None:
        (extract_to / "half-written.bin").write_bytes(b"x" * 100)
        raise OSError(28, "No space left on device")

    bundle = make_bundle(1)
    monkeypatch.setattr(installer_module, "verify_bundle", disk_full)
    with pytest.raises(StorageError, match=f"cannot unpack bundle into .*{names}: No space left on device"):
        getattr(installer, method)(bundle, NOW)
    assert list(installer.tmp_dir.iterdir()) == []
    assert _listing(installer.slots_dir) == {}


def test_stage_checks_the_bundle_against_the_typed_request(installer: Installer, make_bundle, key: SigningKey) -> None:  # type: ignore[no-untyped-def]
    from device_agent.installer import BundleChecks
    from edge_sdk.bundle import Expected

    bundle = make_bundle(1)
    with pytest.raises(UntrustedInputError):
        installer.stage(bundle, NOW, BundleChecks(expect=Expected("digits", 2)))
    with pytest.raises(UntrustedKeyError):
        installer.stage(bundle, NOW, BundleChecks(trusted=TrustedKeys((SigningKey.generate().public_key,))))
    with pytest.raises(UntrustedInputError):
        installer.stage_scratch(bundle, NOW, BundleChecks(expect=Expected("other", 1)))
    assert installer.all_active() == [] and list(installer.tmp_dir.iterdir()) == []
    staged = installer.stage(
        bundle, NOW, BundleChecks(trusted=TrustedKeys((key.public_key,)), expect=Expected("digits", 1))
    )
    assert staged.verified.manifest.version == 1


# --- the floor: what a signed deploy must exceed (edge_sdk.bundle.admission) -----------------


def test_a_signed_rollback_resets_the_floor_so_the_left_version_deploys_again(
    installer: Installer, make_bundle
) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = make_bundle(1), make_bundle(2)
    _install(installer, v1)
    _install(installer, v2)
    assert installer.rollback("digits", signed=True).version == 1  # type: ignore[union-attr]
    history = installer.history("digits")
    assert (history.installed, history.floor, history.floor_reason) == (1, 1, "rollback")
    with pytest.raises(RollbackError, match=r"v1 is not newer than the floor v1 .*since a signed rollback"):
        installer.stage(v1, NOW)
    _install(installer, v2)  # the version the operator left is not locked out
    assert installer.active("digits").version == 2 and installer.accepted_version("digits") == 2  # type: ignore[union-attr]


def test_a_failed_version_does_not_raise_the_floor_and_a_corrected_one_installs(
    installer: Installer, make_bundle, tmp_path: Path, key: SigningKey
) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(2))
    broken = installer.stage(make_bundle(3), NOW)
    installer.activate(broken)
    installer.rollback("digits")  # its health check failed
    assert installer.accepted_version("digits") == 2
    assert installer.history("digits").ran.keys() == {2}
    src = tmp_path / "fixed.onnx"
    src.write_bytes(b"corrected model" * 40)
    fixed = tmp_path / "fixed.edge"
    pack_bundle(BundleSpec("digits", 3, "onnxruntime", src, ttl_s=3600), [key], fixed, now=NOW)
    _install(installer, fixed)
    assert installer.active("digits").version == 3 and installer.accepted_version("digits") == 3  # type: ignore[union-attr]


def test_remove_keeps_the_removed_version_as_the_floor_and_says_nothing_is_installed(
    installer: Installer, make_bundle
) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(1))
    _install(installer, make_bundle(2))
    assert installer.remove("digits") == 2
    with pytest.raises(RollbackError) as info:
        installer.stage(make_bundle(2), NOW)
    assert "floor v2 (the version this device last ran, until a signed remove; installed: none)" in info.value.message
    assert "installed v2" not in info.value.message
    assert installer.stage(make_bundle(3), NOW).slot.name == "v3"


def test_other_content_under_a_version_that_ran_is_refused(
    installer: Installer, make_bundle, tmp_path: Path, key: SigningKey
) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(1))
    _install(installer, make_bundle(2))
    installer.rollback("digits", signed=True)
    src = tmp_path / "other.onnx"
    src.write_bytes(b"another v2" * 40)
    other = tmp_path / "other-v2.edge"
    pack_bundle(BundleSpec("digits", 2, "onnxruntime", src, ttl_s=3600), [key], other, now=NOW)
    with pytest.raises(RollbackError, match="digits v2 differs from the v2 this device already ran"):
        installer.stage(other, NOW)


def test_the_versions_that_ran_are_bounded(installer: Installer, make_bundle) -> None:  # type: ignore[no-untyped-def]
    from edge_sdk.bundle.admission import MAX_RAN_VERSIONS

    for version in range(1, MAX_RAN_VERSIONS + 3):
        _install(installer, make_bundle(version))
    ran = installer.history("digits").ran
    assert len(ran) == MAX_RAN_VERSIONS and min(ran) == 3 and max(ran) == MAX_RAN_VERSIONS + 2


def test_a_schema_1_state_file_is_migrated_in_place(
    tmp_path: Path, key: SigningKey, installer: Installer, make_bundle
) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(1))
    _install(installer, make_bundle(2))
    _install(installer, make_bundle(1, name="gone"))
    installer.remove("gone")
    digests = dict(installer.history("digits").ran)
    # What today's agents wrote: v2 active after a rollback from v3, and a removed name.
    old = {
        "schema": 1,
        "bundles": {
            "digits": {"active": {"version": 2}, "previous": {"version": 1}, "highest": 3},
            "gone": {"active": None, "previous": None, "highest": 4},
        },
    }
    installer.state_path.write_text(json.dumps(old))
    again = Installer(installer.data_dir, TrustedKeys((key.public_key,)))
    digits, gone = again.history("digits"), again.history("gone")
    assert (digits.installed, digits.floor, digits.floor_reason, dict(digits.ran)) == (2, 2, "ran", digests)
    assert (gone.installed, gone.floor, gone.floor_reason) == (None, 4, "highest")
    assert json.loads(again.state_path.read_bytes())["schema"] == 2
    assert again.active("digits").version == 2 and again.previous("digits").version == 1  # type: ignore[union-attr]
    with pytest.raises(RollbackError, match="the highest version this device accepted before it kept floors"):
        again.stage(make_bundle(4, name="gone"), NOW)


def test_a_pending_version_in_a_schema_1_state_file_is_not_the_floor(
    tmp_path: Path, key: SigningKey, installer: Installer, make_bundle
) -> None:  # type: ignore[no-untyped-def]
    _install(installer, make_bundle(1))
    installer.activate(installer.stage(make_bundle(2), NOW), "c" * 32)
    old = {
        "schema": 1,
        "bundles": {
            "digits": {
                "active": {"version": 2},
                "previous": {"version": 1},
                "highest": 2,
                "pending": {"command_id": "c" * 32},
            }
        },
    }
    installer.state_path.write_text(json.dumps(old))
    again = Installer(installer.data_dir, TrustedKeys((key.public_key,)))
    assert again.history("digits").floor == 1 and set(again.history("digits").ran) == {1}
    (rb,) = again.roll_back_pending()
    assert rb.restored == 1 and again.accepted_version("digits") == 1
