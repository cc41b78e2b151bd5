"""device_agent.identity: the device's own key (0600, made once) and sequence numbers that survive restarts."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from device_agent.identity import DeviceIdentity, SequenceCounter, load_identity
from edge_sdk.errors import KeyStoreError, StorageError
from edge_sdk.protocol import Channel, DeviceStatus, open_report, signed_report_of
from edge_sdk.trust import PublicKey, SigningKey


def test_the_key_is_made_once_private_and_its_public_half_written(tmp_path: Path) -> None:
    ident = tmp_path / "identity"
    key = load_identity(ident)
    mode = stat.S_IMODE((ident / "device.key").stat().st_mode)
    assert mode == 0o600 and stat.S_IMODE(ident.stat().st_mode) == 0o700
    assert PublicKey.from_pem((ident / "device.pub").read_bytes()) == key.public_key
    assert load_identity(ident).keyid == key.keyid  # the same key after a restart


def test_a_provisioned_key_is_used_and_a_bad_one_refused(tmp_path: Path) -> None:
    provisioned = SigningKey.generate()
    path = tmp_path / "given.key"
    path.write_bytes(provisioned.to_pem())
    assert load_identity(tmp_path / "identity", path).keyid == provisioned.keyid
    assert not (tmp_path / "identity" / "device.key").exists()  # nothing made beside it
    path.write_bytes(b"not a key")
    with pytest.raises(KeyStoreError):
        load_identity(tmp_path / "identity", path)


def test_sequence_numbers_only_grow_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    first = SequenceCounter(path, block=5)
    used = [first.next() for _ in range(7)]
    assert used == list(range(1, 8))
    assert json.loads(path.read_text())["reserved"] == 10  # two blocks reserved, durably
    second = SequenceCounter(path, block=5)  # a restart (or a crash) after using 7
    assert second.next() == 11  # continues above every number that could have been used


def test_a_corrupt_sequence_file_is_refused_rather_than_reused(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    path.write_text('{"reserved": -4}')
    with pytest.raises(StorageError):
        SequenceCounter(path)


def test_the_identity_signs_with_increasing_numbers_and_a_will_taken_first(tmp_path: Path) -> None:
    ident = DeviceIdentity("pi-1", tmp_path / "identity")
    will = signed_report_of(ident.will("1.0", 100.0))
    assert will.seq == ident.will_seq == 1
    status = DeviceStatus("pi-1", "online", 100.0, will_seq=ident.will_seq)
    sealed = [signed_report_of(ident.seal(status, 100.0)) for _ in range(3)]
    assert [s.seq for s in sealed] == [2, 3, 4]
    msg = open_report(sealed[-1], ident.public_key, "pi-1", Channel.STATUS, 3, 100.0)
    assert msg == status
    restarted = DeviceIdentity("pi-1", tmp_path / "identity")
    assert restarted.public_key == ident.public_key and restarted.will_seq > 4
