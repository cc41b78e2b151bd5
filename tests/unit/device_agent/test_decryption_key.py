"""device_agent.decryption_key: the device's X25519 key on disk, and the recipient check of an offer."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from device_agent.decryption_key import (
    PRIVATE_NAME,
    PUBLIC_NAME,
    check_recipient,
    load_or_create_decryption_key,
)
from edge_sdk.errors import KeyStoreError, NotRecipientError
from edge_sdk.protocol import DeployCommand, TransferOffer, decode, encode
from edge_sdk.trust import RecipientKey, RecipientPublicKey


def _cmd(encrypted_for: tuple[str, ...] = ()) -> DeployCommand:
    offer = TransferOffer(uuid.uuid4().hex, 4096, "0" * 64, 1024, "1" * 64, encrypted_for=encrypted_for)
    return DeployCommand(uuid.uuid4().hex, "tiny", 1, offer, 1.0)


def test_key_is_made_once_private_0600_and_public_file_written(tmp_path: Path) -> None:
    key = load_or_create_decryption_key(tmp_path)
    assert (tmp_path / PRIVATE_NAME).stat().st_mode & 0o777 == 0o600
    assert RecipientPublicKey.from_file_bytes((tmp_path / PUBLIC_NAME).read_bytes()) == key.public
    assert load_or_create_decryption_key(tmp_path).keyid == key.keyid  # the same key at the next start


def test_provisioned_key_is_used_and_its_public_file_refreshed(tmp_path: Path) -> None:
    provisioned = RecipientKey.generate()
    (tmp_path / PRIVATE_NAME).write_bytes(provisioned.to_pem())
    (tmp_path / PRIVATE_NAME).chmod(0o600)
    (tmp_path / PUBLIC_NAME).write_bytes(RecipientKey.generate().public.to_pem())  # stale
    assert load_or_create_decryption_key(tmp_path).keyid == provisioned.keyid
    assert RecipientPublicKey.from_file_bytes((tmp_path / PUBLIC_NAME).read_bytes()) == provisioned.public


def test_key_readable_by_others_or_of_the_wrong_kind_is_refused(tmp_path: Path) -> None:
    (tmp_path / PRIVATE_NAME).write_bytes(RecipientKey.generate().to_pem())
    (tmp_path / PRIVATE_NAME).chmod(0o644)
    with pytest.raises(KeyStoreError, match="readable by others"):
        load_or_create_decryption_key(tmp_path)
    (tmp_path / PRIVATE_NAME).write_bytes(b"not a key")
    (tmp_path / PRIVATE_NAME).chmod(0o600)
    with pytest.raises(KeyStoreError):
        load_or_create_decryption_key(tmp_path)


def test_offer_for_other_recipients_is_refused_and_plain_or_own_offers_pass() -> None:
    mine, other = RecipientKey.generate(), RecipientKey.generate()
    check_recipient(_cmd(), mine)
    check_recipient(_cmd((other.keyid, mine.keyid)), mine)
    with pytest.raises(NotRecipientError, match=mine.keyid) as info:
        check_recipient(_cmd((other.keyid,)), mine)
    assert info.value.details["recipients"] == [other.keyid]


def test_offer_wire_form_is_unchanged_for_plain_bundles_and_carries_recipients_otherwise() -> None:
    plain = _cmd()
    assert "encrypted_for" not in plain.transfer.to_dict()
    keyid = RecipientKey.generate().keyid
    enc = _cmd((keyid,))
    back = decode(encode(enc))
    assert isinstance(back, DeployCommand) and back.transfer.encrypted_for == (keyid,)
    with pytest.raises(Exception, match="encrypted_for"):
        TransferOffer(uuid.uuid4().hex, 4096, "0" * 64, 1024, "1" * 64, encrypted_for=("NOT-HEX",))
