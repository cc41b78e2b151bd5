"""host_tools.fleet.bundle_store: deployed bundles kept by name and sha256, a few per name."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from edge_sdk.errors import ConfigError, StorageError
from host_tools.fleet.bundle_store import BundleStore


def _file(tmp_path: Path, name: str, data: bytes) -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_a_bundle_is_kept_once_by_content_and_found_again(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "bundles")
    bundle, sha = _file(tmp_path, "v1.edge", b"bundle v1" * 1000)
    assert store.get("mlp", sha) is None
    kept = store.put(bundle, "mlp", sha)
    assert kept == tmp_path / "bundles" / "mlp" / f"{sha}.edge" and store.get("mlp", sha) == kept
    assert kept.read_bytes() == bundle.read_bytes()
    inode = kept.stat().st_ino
    assert store.put(bundle, "mlp", sha) == kept and kept.stat().st_ino == inode  # not written again
    bundle.write_bytes(b"edited in place")  # the operator's file changes; the kept copy does not
    assert kept.read_bytes() == b"bundle v1" * 1000
    assert store.get("other", sha) is None
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name]  # no temporary file left


def test_at_most_keep_bundles_per_name_the_least_recently_deployed_go(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "bundles", keep=3)
    shas = []
    for i in range(5):
        bundle, sha = _file(tmp_path, f"v{i}.edge", f"version {i}".encode())
        store.put(bundle, "mlp", sha)
        os.utime(store.path("mlp", sha), (1000.0 + i, 1000.0 + i))  # deployed in this order
        shas.append(sha)
        if i == 2:
            other, other_sha = _file(tmp_path, "o.edge", b"another bundle")
            store.put(other, "other", other_sha)
    assert [store.get("mlp", s) is not None for s in shas] == [False, False, True, True, True]
    assert store.get("other", other_sha) is not None  # each name has its own bound
    again = tmp_path / "v2.edge"
    store.put(again, "mlp", shas[2])  # deployed again: the most recent now
    bundle, sha = _file(tmp_path, "v5.edge", b"version 5")
    store.put(bundle, "mlp", sha)
    assert [store.get("mlp", s) is not None for s in (*shas, sha)] == [False, False, True, False, True, True]


@pytest.mark.parametrize(
    ("name", "sha"),
    [("../etc", "a" * 64), ("", "a" * 64), ("UPPER", "a" * 64), ("mlp", "A" * 64), ("mlp", "a" * 63), ("mlp", "../x")],
)
def test_names_and_digests_are_checked(tmp_path: Path, name: str, sha: str) -> None:
    store = BundleStore(tmp_path / "bundles")
    with pytest.raises(ConfigError):
        store.get(name, sha)
    with pytest.raises(ConfigError):
        store.put(tmp_path, name, sha)
    assert not (tmp_path / "bundles").exists()


def test_a_file_that_is_not_the_one_named_is_not_kept(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "bundles")
    bundle, _sha = _file(tmp_path, "v1.edge", b"these bytes")
    with pytest.raises(StorageError, match="changed while it was kept"):
        store.put(bundle, "mlp", "0" * 64)
    assert list((tmp_path / "bundles" / "mlp").iterdir()) == []
    with pytest.raises(StorageError, match="cannot keep"):
        store.put(tmp_path / "missing.edge", "mlp", "1" * 64)
    with pytest.raises(ConfigError, match="at least 1"):
        BundleStore(tmp_path, keep=0)
