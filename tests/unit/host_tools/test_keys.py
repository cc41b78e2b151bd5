"""host_tools.keys: what the CLI shows about the root, and the authority commands are signed with."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge_sdk.errors import ConfigError, KeyStoreError
from edge_sdk.trust import SignedRoot
from host_tools.keys import KeyRing, command_authority, init_keys, rotate_key

NOW = time.time()


def test_summary_names_every_role_and_where_private_keys_are(tmp_path: Path) -> None:
    ring, _ = init_keys(tmp_path / "keys", NOW, root_keys=2, root_threshold=2)
    root = ring.root
    gone = root.roles["root"].keyids[1]
    ring.private_path(gone).unlink()

    summary = ring.summary()
    assert (summary.root_path, summary.version, summary.expires_at) == (ring.root_path, 1, root.expires_at)
    assert [r.name for r in summary.roles] == list(root.roles)
    by_name = {r.name: r for r in summary.roles}
    assert by_name["root"].threshold == 2
    assert dict(by_name["root"].keys) == {root.roles["root"].keyids[0]: True, gone: False}
    assert summary.to_dict()["roles"]["bundles"]["keys"] == [
        {"keyid": root.roles["bundles"].keyids[0], "private_key_here": True}
    ]


def test_summary_without_a_root_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="edgectl keys init"):
        KeyRing(tmp_path).summary()


def test_command_authority_holds_command_keys_and_every_root(tmp_path: Path) -> None:
    ring, _ = init_keys(tmp_path / "keys", NOW)
    rotate_key(ring.dir, "commands", NOW)
    authority = command_authority(ring)
    assert [k.keyid for k in authority.keys] == list(ring.root.roles["commands"].keyids)
    assert [SignedRoot.from_bytes(r).root.version for r in authority.root_chain] == [1, 2]


def test_command_authority_needs_the_passphrase(tmp_path: Path) -> None:
    ring, _ = init_keys(tmp_path / "keys", NOW, passphrase=b"secret")
    # A passphrase missing or wrong is configuration (exit 2) from every command, not local state.
    with pytest.raises(ConfigError, match=r"signing key .* is encrypted: give its passphrase"):
        command_authority(ring)
    with pytest.raises(ConfigError, match=r"signing key .*: wrong passphrase"):
        command_authority(ring, b"not it")
    assert len(command_authority(ring, b"secret").keys) == 1
