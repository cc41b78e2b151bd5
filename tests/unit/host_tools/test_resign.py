"""host_tools.packing.resign_bundle: after a bundle-key rotation, old bundles are signed again.

Real keys, real bundles, the real verifier: a re-signed bundle keeps its manifest bytes
and payload, passes every check with the current root, and only bundles this key
directory signed with a key it rotated out (not revoked) are re-signed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import TinyModel, build_tiny_model

from edge_sdk.bundle.archive import BundleReader
from edge_sdk.errors import ExpiredError, HashMismatchError, UntrustedKeyError
from edge_sdk.trust import Role
from host_tools.keys import KeyRing, _next_root, _publish_next, init_keys, revoke_key, rotate_key, rotation_warning
from host_tools.packing import PackOptions, check_bundle, pack_model, resign_bundle
from host_tools.report.bundle import resigned_text

NOW = time.time()


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return init_keys(tmp_path / "keys", NOW)[0]


@pytest.fixture
def tiny(tmp_path: Path) -> TinyModel:
    return build_tiny_model(tmp_path)


def _pack(ring: KeyRing, tiny: TinyModel, out: Path, version: int = 3, ttl_s: float = 86400.0) -> Path:
    pack_model(PackOptions(tiny.path, out, "tiny", version, sample=tiny.sample, ttl_s=ttl_s), ring, NOW)
    return out


def _content(bundle: Path) -> tuple[bytes, dict[str, str]]:
    with BundleReader(bundle) as reader:
        return reader.manifest_bytes, {
            name: reader.hash_member(name, info.size)[0] for name, info in reader.payload.items()
        }


def test_a_bundle_packed_before_a_rotation_is_refused_then_resigned(
    ring: KeyRing, tiny: TinyModel, tmp_path: Path
) -> None:
    old_key = ring.root.roles["bundles"].keyids[0]
    bundle = _pack(ring, tiny, tmp_path / "v3.edge")
    replaced, new_key, _ = rotate_key(ring.dir, "bundles", NOW)
    assert replaced == old_key
    with pytest.raises(UntrustedKeyError):
        check_bundle(bundle, ring, NOW + 1)  # what `edgectl verify` and every device with root v2 say

    out = tmp_path / "v3-resigned.edge"
    resigned = resign_bundle(bundle, ring, NOW + 1, out)
    assert (resigned.path, resigned.source) == (out, bundle)
    assert resigned.signed_by == (new_key.keyid,) and resigned.previously_signed_by == (old_key,)
    assert resigned.vouched_by_root == 1
    assert _content(out) == _content(bundle)  # manifest bytes (so version and expiry) and payload unchanged
    check = check_bundle(out, ring, NOW + 1)
    assert check.manifest.version == 3 and resigned.checks == check.checks
    assert f"by trusted key(s) {new_key.keyid}" in check.checks[2]
    assert resigned.to_dict()["manifest"] == check.manifest.to_dict()
    assert resigned_text(resigned) == (
        f"re-signed tiny v3 (payload and manifest unchanged) -> {out}\n"
        f"signed by {new_key.keyid} (was {old_key}, a bundle key of root v1)"
    )


def test_without_an_output_the_bundle_is_replaced_in_place(ring: KeyRing, tiny: TinyModel, tmp_path: Path) -> None:
    bundle = _pack(ring, tiny, tmp_path / "v3.edge")
    before = _content(bundle)
    rotate_key(ring.dir, "bundles", NOW)
    resign_bundle(bundle, ring, NOW + 1)
    assert _content(bundle) == before
    check_bundle(bundle, ring, NOW + 1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".edge") == ["v3.edge"]  # no leftovers


def test_a_tampered_payload_is_not_resigned(ring: KeyRing, tiny: TinyModel, tmp_path: Path) -> None:
    bundle = _pack(ring, tiny, tmp_path / "v3.edge")
    data = bytearray(bundle.read_bytes())
    with BundleReader(bundle) as reader:
        member = next(iter(reader.payload.values()))
        offset = member.offset_data
    data[offset] ^= 0xFF
    bundle.write_bytes(bytes(data))
    rotate_key(ring.dir, "bundles", NOW)
    with pytest.raises(HashMismatchError):
        resign_bundle(bundle, ring, NOW + 1, tmp_path / "out.edge")
    assert not (tmp_path / "out.edge").exists()


def test_a_bundle_another_key_directory_signed_is_not_resigned(ring: KeyRing, tiny: TinyModel, tmp_path: Path) -> None:
    other = init_keys(tmp_path / "other-keys", NOW)[0]
    foreign = _pack(other, tiny, tmp_path / "foreign.edge")
    with pytest.raises(UntrustedKeyError, match="not signed by a bundle key of any root"):
        resign_bundle(foreign, ring, NOW + 1, tmp_path / "out.edge")
    assert not (tmp_path / "out.edge").exists()


def test_a_bundle_signed_by_a_revoked_key_is_not_resigned(ring: KeyRing, tiny: TinyModel, tmp_path: Path) -> None:
    first = ring.root.roles["bundles"].keyids[0]
    bundle = _pack(ring, tiny, tmp_path / "v3.edge")  # signed by the first bundle key alone
    # root v2: a second bundle key joins; root v3: the first one is revoked (dropped, not replaced).
    second = ring._new_key(None)
    roles = dict(ring.root.roles)
    roles["bundles"] = Role((first, second.keyid), 1)
    _publish_next(ring, _next_root(ring.root, roles, {second.keyid: second.public_key}, NOW, 86400.0), [], NOW, None)
    revoke_key(ring.dir, first, NOW)
    assert ring.root.version == 3 and ring.root.roles["bundles"].keyids == (second.keyid,)
    with pytest.raises(UntrustedKeyError, match="not revoked"):
        resign_bundle(bundle, ring, NOW + 1, tmp_path / "out.edge")
    assert not (tmp_path / "out.edge").exists()


def test_an_expired_bundle_is_not_resigned(ring: KeyRing, tiny: TinyModel, tmp_path: Path) -> None:
    bundle = _pack(ring, tiny, tmp_path / "v3.edge", ttl_s=60.0)
    rotate_key(ring.dir, "bundles", NOW)
    with pytest.raises(ExpiredError):
        resign_bundle(bundle, ring, NOW + 120, tmp_path / "out.edge")


def test_rotating_the_bundle_key_warns_with_the_consequence_and_the_fix() -> None:
    warning = rotation_warning("bundles", "abc123", 4)
    assert warning is not None
    assert "signed by abc123" in warning and "refused" in warning and "root v4" in warning
    assert "edgectl resign BUNDLE" in warning
    assert rotation_warning("commands", "abc123", 4) is None and rotation_warning("root", "abc123", 4) is None
