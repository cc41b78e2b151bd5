"""host_tools.fleet.deployer: the offer carries the manifest's facts; the host refuses what the registry knows."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from edge_sdk.bundle import BundleSpec, Target, content_digest, pack_bundle
from edge_sdk.errors import BundleFormatError, ConfigError, RollbackError, TargetMismatchError, UntrustedInputError
from edge_sdk.protocol import DeployCommand
from edge_sdk.trust import SigningKey
from host_tools.fleet import deployer
from host_tools.fleet.bundle_store import BundleStore
from host_tools.fleet.deployer import (
    DeltaSettings,
    DeployOptions,
    check_known_device,
    deploy_and_record,
    read_manifest,
    transfer_command,
)
from host_tools.fleet.registry import BundleRef, DeviceRecord, Registry, open_registry


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    model = tmp_path / "m.tflite"
    model.write_bytes(b"tflite model bytes" * 100)
    out = tmp_path / "m.edge"
    spec = BundleSpec("my-cnn", 2, "litert", model, target=Target(("aarch64",), 1 << 30, ("npu",)), ttl_s=3600)
    pack_bundle(spec, [SigningKey.generate()], out, now=time.time())
    return out


def _cmd(bundle: Path, rollback: bool = False) -> DeployCommand:
    return transfer_command("pi-01", bundle, DeployOptions(), time.time, rollback=rollback)


def test_the_deploy_command_offers_the_manifest_facts(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    facts = _cmd(bundle).bundle
    assert facts is not None
    assert (facts.runtime, facts.expires_at) == ("litert", manifest.expires_at)
    assert facts.content == content_digest(manifest.files)
    assert facts.unpacked_bytes == sum(f.size for f in manifest.files) == 1800
    assert (facts.arch, facts.min_memory_bytes, facts.accelerators) == (("aarch64",), 1 << 30, ("npu",))
    claimed = transfer_command("pi-01", bundle, DeployOptions(), time.time, claim=("my-cnn", 2))
    assert claimed.bundle is None  # a claim is for bundles whose manifest is not to be read


def _device(**kw: object) -> DeviceRecord:
    fields: dict[str, object] = {"device_id": "pi-01", "status": "online", "last_seen": time.time()}
    fields.update(kw)
    return DeviceRecord(**fields)  # type: ignore[arg-type]


def test_a_device_that_lacks_the_runtime_is_refused_by_the_host(bundle: Path) -> None:
    with pytest.raises(TargetMismatchError) as info:
        check_known_device(_device(runtimes={"onnxruntime": "1.20"}), _cmd(bundle))
    assert "my-cnn v2 needs runtime litert, which device pi-01 lacks (it has onnxruntime" in info.value.message
    assert "nothing was sent" in info.value.message and info.value.details["constraint"] == "runtime"
    check_known_device(_device(runtimes={"tflite-runtime": "2.14"}), _cmd(bundle))  # LiteRT's other package
    check_known_device(_device(runtimes=None), _cmd(bundle))  # not reported: the device checks
    check_known_device(None, _cmd(bundle))


@pytest.mark.parametrize("running", [2, 3])
def test_a_device_that_runs_this_version_or_newer_is_refused_by_the_host(bundle: Path, running: int) -> None:
    device = _device(active_bundles=(BundleRef("my-cnn", running),))
    with pytest.raises(RollbackError) as info:
        check_known_device(device, _cmd(bundle))
    assert f"my-cnn v2 is not newer than v{running}, which device pi-01 runs" in info.value.message
    assert isinstance(info.value, UntrustedInputError)  # a refusal: exit code 3
    check_known_device(device, _cmd(bundle, rollback=True))  # an explicit signed rollback goes through
    check_known_device(_device(active_bundles=(BundleRef("my-cnn", 1),)), _cmd(bundle))
    check_known_device(device, _cmd(bundle), versions=False)  # a record not yet refreshed by the retained status
    check_known_device(_device(active_bundles=(BundleRef("other", 9),)), _cmd(bundle))


def test_deploy_refuses_before_sending_or_recording_anything(bundle: Path, tmp_path: Path) -> None:
    class NoBroker:
        address = "mqtt://127.0.0.1:1"  # configuration, not a connection

        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"the host touched the broker ({name}) before refusing")

    with open_registry(tmp_path / "registry.db") as registry:
        registry.upsert_device(_device(runtimes={"onnxruntime": "1.20"}))
        outcome = deploy_and_record(NoBroker(), registry, "pi-01", bundle)  # type: ignore[arg-type]
        assert outcome.state == "refused" and isinstance(outcome.error, TargetMismatchError)
        assert outcome.detail == {"refused_by": "host", "sent": False} and outcome.metrics is None
        (recorded,) = registry.list_deployments("pi-01")
        assert (recorded.state, recorded.error_code) == ("refused", "target_mismatch")


# --- deltas: which devices are offered one, from which base ---------------------------------------


def _versions(tmp_path: Path) -> tuple[Path, Path]:
    """v1 and v2 of one bundle; v2 changes the model's last 2 KiB."""
    key = SigningKey.generate()
    model = os.urandom(200_000)
    out = []
    for version, data in ((1, model), (2, model[:-2048] + os.urandom(2048))):
        src = tmp_path / f"m{version}.tflite"
        src.write_bytes(data)
        bundle = tmp_path / f"cnn-v{version}.edge"
        pack_bundle(BundleSpec("cnn", version, "litert", src), [key], bundle, now=time.time())
        out.append(bundle)
    return out[0], out[1]


def _runs(registry: Registry, device_id: str, version: int, sha256: str | None) -> None:
    """The registry knows the device runs cnn ``version``, installed from the bundle ``sha256`` (if given)."""
    registry.upsert_device(_device(device_id=device_id, active_bundles=(BundleRef("cnn", version),)))
    if sha256 is not None:
        dep = registry.record_deployment(device_id, "cnn", version, sha256, started_at=time.time())
        registry.update_deployment(dep, "installed", finished_at=time.time())


def _plan(
    tmp_path: Path, registry: Registry, devices: list[str], deltas: DeltaSettings, new: Path
) -> tuple[dict[str, DeployCommand], dict[str, object]]:
    options = DeployOptions(chunk_size=1024, deltas=deltas)
    manifest = read_manifest(new)
    commands = {d: transfer_command(d, new, options, time.time, manifest=manifest) for d in devices}
    explicit = deployer._explicit_base(deltas, manifest)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return deployer._offer_deltas(registry, "", commands, new, options, explicit, work)  # type: ignore[return-value]


def test_devices_whose_bundle_the_store_has_are_offered_one_delta(tmp_path: Path) -> None:
    v1, v2 = _versions(tmp_path)
    v1_sha = hashlib.sha256(v1.read_bytes()).hexdigest()
    store = BundleStore(tmp_path / "store")
    store.put(v1, "cnn", v1_sha)
    with open_registry(tmp_path / "registry.db") as registry:
        _runs(registry, "pi-01", 1, v1_sha)
        _runs(registry, "pi-02", 1, v1_sha)
        _runs(registry, "pi-03", 1, "9" * 64)  # installed from a bundle the store does not have
        _runs(registry, "pi-04", 1, None)  # the registry does not know which bundle it installed
        commands, deltas = _plan(
            tmp_path, registry, ["pi-01", "pi-02", "pi-03", "pi-04", "pi-05"], DeltaSettings(store), v2
        )
    offers = {d: c.delta for d, c in commands.items()}
    assert offers["pi-03"] is None and offers["pi-04"] is None and offers["pi-05"] is None  # pi-05: not known
    assert offers["pi-01"] is not None and offers["pi-01"] == offers["pi-02"]  # one delta for one base
    (tid,) = deltas
    assert offers["pi-01"].transfer.transfer_id == tid
    assert offers["pi-01"].base_version == 1
    assert offers["pi-01"].base_content == content_digest(read_manifest(v1).files)
    assert offers["pi-01"].transfer.size < v2.stat().st_size / 10
    assert all(c.transfer == commands["pi-05"].transfer for c in commands.values())  # the bundle's offer stays


def test_an_explicit_base_serves_devices_that_run_its_version_unless_they_installed_another(tmp_path: Path) -> None:
    v1, v2 = _versions(tmp_path)
    v1_sha = hashlib.sha256(v1.read_bytes()).hexdigest()
    with open_registry(tmp_path / "registry.db") as registry:
        _runs(registry, "pi-01", 1, None)
        _runs(registry, "pi-02", 1, v1_sha)
        _runs(registry, "pi-03", 1, "9" * 64)
        _runs(registry, "pi-04", 2, v1_sha)  # runs the version being deployed: nothing to build on
        commands, deltas = _plan(
            tmp_path, registry, ["pi-01", "pi-02", "pi-03", "pi-04"], DeltaSettings(None, base=v1), v2
        )
    assert [d for d, c in commands.items() if c.delta is not None] == ["pi-01", "pi-02"]
    assert len(deltas) == 1


def test_no_delta_when_it_would_not_pay_or_the_base_is_unusable(tmp_path: Path) -> None:
    v1, v2 = _versions(tmp_path)
    unrelated = tmp_path / "unrelated.tflite"
    unrelated.write_bytes(os.urandom(200_000))
    other_v1 = tmp_path / "other-v1.edge"
    pack_bundle(BundleSpec("cnn", 1, "litert", unrelated), [SigningKey.generate()], other_v1, now=time.time())
    with open_registry(tmp_path / "registry.db") as registry:
        _runs(registry, "pi-01", 1, None)
        commands, deltas = _plan(tmp_path, registry, ["pi-01"], DeltaSettings(None, base=other_v1), v2)
        assert commands["pi-01"].delta is None and deltas == {}  # everything changed: the bundle is cheaper
        broken = tmp_path / "broken.edge"
        broken.write_bytes(v1.read_bytes()[:-100])
        with pytest.raises(BundleFormatError):
            _plan(tmp_path, registry, ["pi-01"], DeltaSettings(None, base=broken), v2)
    with pytest.raises(ConfigError, match="the version being deployed"):
        deployer._explicit_base(DeltaSettings(None, base=v2), read_manifest(v2))
    with pytest.raises(ConfigError, match="is bundle 'my-cnn', not 'cnn'"):
        deployer._explicit_base(DeltaSettings(None, base=_tflite_bundle(tmp_path)), read_manifest(v2))
    assert deployer._explicit_base(DeltaSettings(None, offer=False, base=v1), read_manifest(v2)) is None


def _tflite_bundle(tmp_path: Path) -> Path:
    model = tmp_path / "x.tflite"
    model.write_bytes(b"x" * 100)
    out = tmp_path / "x.edge"
    pack_bundle(BundleSpec("my-cnn", 1, "litert", model), [SigningKey.generate()], out, now=time.time())
    return out
