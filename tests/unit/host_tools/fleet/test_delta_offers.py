"""host_tools.fleet.delta_offers: which devices are offered a delta, from which base.

Real bundles, a real SQLite registry and bundle store. A device is offered a delta only when
the registry says which version it runs and the host has the bundle it installed that version
from (the store, by the sha256 the registry recorded, or a base given explicitly); devices
with one base share one delta.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from edge_sdk.bundle import BundleSpec, content_digest, pack_bundle
from edge_sdk.errors import BundleFormatError, ConfigError
from edge_sdk.protocol import DeployCommand
from edge_sdk.trust import SigningKey
from host_tools.fleet.bundle_store import BundleStore
from host_tools.fleet.delta_offers import (
    DeltaSettings,
    PreparedDelta,
    base_of,
    explicit_base,
    keep_bundle,
    offer_deltas,
)
from host_tools.fleet.deployer import DeployOptions, _known_device, read_manifest, transfer_command
from host_tools.fleet.registry import BundleRef, DeviceRecord, Registry, open_registry


def _device(device_id: str, version: int) -> DeviceRecord:
    return DeviceRecord(device_id, "online", time.time(), active_bundles=(BundleRef("cnn", version),))


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
    registry.upsert_device(_device(device_id, version))
    if sha256 is not None:
        dep = registry.record_deployment(device_id, "cnn", version, sha256, started_at=time.time())
        registry.update_deployment(dep, "installed", finished_at=time.time())


def _plan(
    tmp_path: Path, registry: Registry, devices: list[str], settings: DeltaSettings, new: Path
) -> tuple[dict[str, DeployCommand], dict[str, PreparedDelta]]:
    """What deploy_many does before signing: each device's base, then the deltas offered."""
    options = DeployOptions(chunk_size=1024, deltas=settings)
    manifest = read_manifest(new)
    commands = {d: transfer_command(d, new, options, time.time, manifest=manifest) for d in devices}
    explicit = explicit_base(settings, manifest)
    bases = {}
    for d, cmd in commands.items():
        base = base_of(registry, _known_device(registry, d, ""), cmd, settings, explicit)
        if base is not None:
            bases[d] = base
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return offer_deltas(commands, bases, new, settings.build, options.chunk_size, work)


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
        explicit_base(DeltaSettings(None, base=v2), read_manifest(v2))
    with pytest.raises(ConfigError, match="is bundle 'my-cnn', not 'cnn'"):
        explicit_base(DeltaSettings(None, base=_tflite_bundle(tmp_path)), read_manifest(v2))
    assert explicit_base(DeltaSettings(None, offer=False, base=v1), read_manifest(v2)) is None


def _tflite_bundle(tmp_path: Path) -> Path:
    model = tmp_path / "x.tflite"
    model.write_bytes(b"x" * 100)
    out = tmp_path / "x.edge"
    pack_bundle(BundleSpec("my-cnn", 1, "litert", model), [SigningKey.generate()], out, now=time.time())
    return out


def test_a_store_that_fails_costs_deltas_not_the_deploy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    v1, v2 = _versions(tmp_path)
    v1_sha = hashlib.sha256(v1.read_bytes()).hexdigest()
    store = BundleStore(tmp_path / "store")
    store.put(v1, "cnn", v1_sha).write_bytes(b"damaged in the store")
    with open_registry(tmp_path / "registry.db") as registry:
        _runs(registry, "pi-01", 1, v1_sha)
        commands, deltas = _plan(tmp_path, registry, ["pi-01"], DeltaSettings(store), v2)
    assert commands["pi-01"].delta is None and deltas == {}
    assert "no delta from" in caplog.text
    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"a file where the store's directory should be")
    keep_bundle(BundleStore(blocked), v2, "cnn", hashlib.sha256(v2.read_bytes()).hexdigest())  # logged, not raised
    assert "did not keep" in caplog.text
    keep_bundle(None, v2, "cnn", "0" * 64)  # no store: nothing to do
