"""device_agent.trust_store: the time floor and the nonce record, on a real disk."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from device_agent.trust_store import MAX_FLOOR_LEAD_S, TrustStore
from edge_sdk.errors import ReplayError, StorageError
from edge_sdk.trust import Role, Root, SigningKey, sign_root


@pytest.fixture
def shipped() -> bytes:
    key = SigningKey.generate()
    roles = {name: Role((key.keyid,)) for name in ("root", "bundles", "commands")}
    return sign_root(Root(1, time.time() + 86400, {key.keyid: key.public_key}, roles), [key]).to_bytes()


def test_the_floor_only_rises_is_durable_and_outranks_the_clock(tmp_path: Path, shipped: bytes) -> None:
    store = TrustStore(tmp_path, shipped)
    assert store.floor == 0.0 and store.now(1000.0) == 1000.0
    assert store.observe(2000.0, clock=1900.0)
    assert not store.observe(1500.0, clock=1900.0)  # older: changes nothing
    assert not store.observe(float("nan"), clock=1900.0)
    assert store.now(1000.0) == 2000.0  # a clock earlier than the floor is not believed
    assert store.now(3000.0) == 3000.0
    assert TrustStore(tmp_path, shipped).floor == 2000.0  # survives a restart


def test_a_signed_time_far_ahead_of_the_device_does_not_move_the_floor(tmp_path: Path, shipped: bytes) -> None:
    store = TrustStore(tmp_path, shipped)
    assert not store.observe(1000.0 + MAX_FLOOR_LEAD_S + 1, clock=1000.0)
    assert store.observe(1000.0 + MAX_FLOOR_LEAD_S, clock=1000.0)


def test_nonces_are_forgotten_when_the_floor_passes_their_expiry_not_the_clock(tmp_path: Path, shipped: bytes) -> None:
    store = TrustStore(tmp_path, shipped)
    store.admit("a" * 32, expires_at=1600.0, now=1000.0)
    store.admit("b" * 32, expires_at=5000.0, now=4000.0)  # the clock is past a's expiry: a is still on record
    with pytest.raises(ReplayError):
        TrustStore(tmp_path, shipped).admit("a" * 32, expires_at=1600.0, now=1300.0)
    store.observe(1700.0, clock=1700.0)  # now the floor has passed a's expiry
    store.admit("c" * 32, expires_at=5000.0, now=1700.0)
    assert "a" * 32 not in TrustStore(tmp_path, shipped)._nonces


def test_a_corrupt_floor_is_a_storage_error(tmp_path: Path, shipped: bytes) -> None:
    TrustStore(tmp_path, shipped)
    (tmp_path / "time.json").write_text('{"floor": "tomorrow"}')
    with pytest.raises(StorageError, match=r"time\.json"):
        TrustStore(tmp_path, shipped)
