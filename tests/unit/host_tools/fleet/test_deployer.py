"""host_tools.fleet.deployer: the offer carries the manifest's facts; the host refuses what the registry knows."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge_sdk.bundle import BundleSpec, Target, content_digest, pack_bundle
from edge_sdk.errors import RollbackError, TargetMismatchError, UntrustedInputError
from edge_sdk.protocol import DeployCommand
from edge_sdk.trust import SigningKey
from host_tools.fleet.deployer import (
    DeployOptions,
    DeployOutcome,
    already_runs,
    check_known_device,
    deploy_and_record,
    read_manifest,
    transfer_command,
)
from host_tools.fleet.registry import BundleRef, DeviceRecord, open_registry


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


def test_a_device_that_runs_the_version_already_is_not_a_failure() -> None:
    def outcome(error: RollbackError | None, **detail: object) -> DeployOutcome:
        return DeployOutcome("pi-01", "m", 2, "aa" * 32, "t" * 32, "refused", error=error, detail=dict(detail))

    same = {"offered": 2, "installed": 2, "floor": 2, "floor_reason": "installed"}
    assert already_runs(outcome(RollbackError("runs it", **same), refused_by="host"))  # skipped by the host
    assert already_runs(outcome(RollbackError("runs it", reason="not_newer", **same)))  # refused by the device
    newer = dict(same, installed=3, floor=3)
    assert not already_runs(outcome(RollbackError("older", reason="not_newer", **newer)))  # a real rollback
    assert not already_runs(outcome(RollbackError("differs", reason="content_differs", **same)))
    assert not already_runs(outcome(None))
