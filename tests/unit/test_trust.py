"""edge_sdk.trust: keys, signature envelopes, threshold verification."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from edge_sdk.errors import KeyStoreError, SignatureError, UntrustedKeyError
from edge_sdk.trust import (
    MAX_SIGNATURES,
    PublicKey,
    Signature,
    SigningKey,
    TrustedKeys,
    decode_signatures,
    encode_signatures,
    verify_signatures,
)

DATA = b'{"name":"demo","version":3}'


@pytest.fixture(scope="module")
def keys() -> list[SigningKey]:
    return [SigningKey.generate() for _ in range(3)]


# --- keys --------------------------------------------------------------------------------


def test_keyid_is_stable_and_derived_from_the_public_key(keys: list[SigningKey]) -> None:
    k = keys[0]
    assert k.keyid == k.public_key.keyid
    assert len(k.keyid) == 32
    assert int(k.keyid, 16) >= 0
    assert PublicKey(k.public_key.raw).keyid == k.keyid
    assert len({key.keyid for key in keys}) == len(keys)


def test_public_key_must_be_32_bytes() -> None:
    with pytest.raises(KeyStoreError):
        PublicKey(b"\x00" * 31)
    with pytest.raises(KeyStoreError):
        PublicKey(b"\x00" * 33)


def test_public_pem_round_trip(keys: list[SigningKey]) -> None:
    pub = keys[0].public_key
    pem = pub.to_pem()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert PublicKey.from_pem(pem) == pub


def test_public_pem_refuses_garbage_and_other_algorithms() -> None:
    with pytest.raises(KeyStoreError):
        PublicKey.from_pem(b"not a pem")
    ec_pem = generate_private_key(SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(KeyStoreError, match="not Ed25519"):
        PublicKey.from_pem(ec_pem)


def test_private_pem_round_trip_unencrypted(keys: list[SigningKey]) -> None:
    pem = keys[0].to_pem()
    assert b"ENCRYPTED" not in pem
    loaded = SigningKey.from_pem(pem)
    assert loaded.keyid == keys[0].keyid
    assert loaded.public_key.verifies(loaded.sign(DATA).sig, DATA)


def test_private_pem_round_trip_with_passphrase(keys: list[SigningKey]) -> None:
    pem = keys[0].to_pem(passphrase=b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in pem
    loaded = SigningKey.from_pem(pem, passphrase=b"correct horse")
    assert loaded.keyid == keys[0].keyid
    # Ed25519 is deterministic: the same key signs the same bytes identically.
    assert loaded.sign(DATA) == keys[0].sign(DATA)


def test_wrong_or_missing_passphrase_is_a_keystore_error(keys: list[SigningKey]) -> None:
    pem = keys[0].to_pem(passphrase=b"correct horse")
    with pytest.raises(KeyStoreError) as info:
        SigningKey.from_pem(pem, passphrase=b"battery staple")
    assert info.value.__cause__ is not None
    with pytest.raises(KeyStoreError):
        SigningKey.from_pem(pem)  # encrypted, no passphrase given
    with pytest.raises(KeyStoreError):
        SigningKey.from_pem(keys[0].to_pem(), passphrase=b"unexpected")  # not encrypted


def test_private_pem_refuses_garbage_and_other_algorithms() -> None:
    with pytest.raises(KeyStoreError):
        SigningKey.from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    ec_pem = generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(KeyStoreError, match="not Ed25519"):
        SigningKey.from_pem(ec_pem)


def test_signing_key_repr_does_not_leak_the_secret(keys: list[SigningKey]) -> None:
    text = repr(keys[0])
    assert keys[0].keyid in text
    assert b"PRIVATE" not in text.encode()
    raw = keys[0].to_pem().decode()
    assert raw not in text


# --- trusted key sets --------------------------------------------------------------------


def test_trusted_keys_threshold_bounds(keys: list[SigningKey]) -> None:
    pubs = tuple(k.public_key for k in keys)
    assert TrustedKeys(pubs, threshold=3).threshold == 3
    with pytest.raises(KeyStoreError):
        TrustedKeys(pubs, threshold=0)
    with pytest.raises(KeyStoreError):
        TrustedKeys(pubs, threshold=4)
    # The same key listed twice counts once.
    with pytest.raises(KeyStoreError):
        TrustedKeys((pubs[0], pubs[0]), threshold=2)
    with pytest.raises(KeyStoreError):
        TrustedKeys((), threshold=1)


# --- envelopes ---------------------------------------------------------------------------


def test_envelope_round_trip_is_canonical(keys: list[SigningKey]) -> None:
    sigs = [k.sign(DATA) for k in keys]
    env = encode_signatures(sigs)
    assert decode_signatures(env) == sigs
    assert encode_signatures(decode_signatures(env)) == env
    body = json.loads(env)
    assert all(set(e) == {"keyid", "sig"} for e in body)
    assert b" " not in env


@pytest.mark.parametrize(
    "envelope",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"{}",
        b'"sig"',
        b"[]",
        b"[1]",
        b'[{"keyid": "a"}]',
        b'[{"sig": "AAAA"}]',
        b'[{"keyid": 1, "sig": "AAAA"}]',
        b'[{"keyid": "a", "sig": 5}]',
        b'[{"keyid": "a", "sig": "not base64!"}]',
        b'[{"keyid": "a", "sig": "AAA"}]',
        b"[" * 100_000,
    ],
    ids=lambda e: repr(e[:24]),
)
def test_malformed_envelopes_are_signature_errors(envelope: bytes) -> None:
    with pytest.raises(SignatureError):
        decode_signatures(envelope)


def test_too_many_signatures_is_refused_before_decoding_entries(keys: list[SigningKey]) -> None:
    env = encode_signatures([keys[0].sign(DATA)] * MAX_SIGNATURES)
    assert len(decode_signatures(env)) == MAX_SIGNATURES
    over = json.dumps([{"keyid": "x", "sig": "!!"}] * (MAX_SIGNATURES + 1)).encode()
    with pytest.raises(SignatureError, match="too many"):
        decode_signatures(over)


# --- verification ------------------------------------------------------------------------


def test_one_trusted_signature_verifies(keys: list[SigningKey]) -> None:
    trusted = TrustedKeys((keys[0].public_key,))
    assert verify_signatures(DATA, [keys[0].sign(DATA)], trusted) == frozenset({keys[0].keyid})


def test_no_signatures_is_a_signature_error(keys: list[SigningKey]) -> None:
    with pytest.raises(SignatureError, match="not signed"):
        verify_signatures(DATA, [], TrustedKeys((keys[0].public_key,)))


def test_signature_by_an_untrusted_key_is_refused(keys: list[SigningKey]) -> None:
    trusted = TrustedKeys((keys[0].public_key,))
    with pytest.raises(UntrustedKeyError) as info:
        verify_signatures(DATA, [keys[1].sign(DATA)], trusted)
    assert info.value.details["signers"] == [keys[1].keyid]
    assert info.value.details["trusted"] == [keys[0].keyid]


def test_attacker_claiming_a_trusted_keyid_is_a_signature_error(keys: list[SigningKey]) -> None:
    """The attacker signs with their own key but labels it with the trusted key id."""
    trusted = TrustedKeys((keys[0].public_key,))
    forged = Signature(keys[0].keyid, keys[1].sign(DATA).sig)
    with pytest.raises(SignatureError) as info:
        verify_signatures(DATA, [forged], trusted)
    assert not isinstance(info.value, UntrustedKeyError)
    assert info.value.details["keyid"] == keys[0].keyid


def test_tampered_data_is_a_signature_error(keys: list[SigningKey]) -> None:
    trusted = TrustedKeys((keys[0].public_key,))
    sig = keys[0].sign(DATA)
    with pytest.raises(SignatureError):
        verify_signatures(DATA.replace(b"3", b"4"), [sig], trusted)
    with pytest.raises(SignatureError):
        verify_signatures(DATA + b" ", [sig], trusted)


def test_truncated_or_zero_signature_bytes_do_not_verify(keys: list[SigningKey]) -> None:
    trusted = TrustedKeys((keys[0].public_key,))
    sig = keys[0].sign(DATA).sig
    for bad in (b"", sig[:-1], bytes(64), sig + b"\x00"):
        with pytest.raises(SignatureError):
            verify_signatures(DATA, [Signature(keys[0].keyid, bad)], trusted)


def test_threshold_two_with_one_signer_is_refused(keys: list[SigningKey]) -> None:
    trusted = TrustedKeys((keys[0].public_key, keys[1].public_key), threshold=2)
    with pytest.raises(UntrustedKeyError, match="1 trusted signature"):
        verify_signatures(DATA, [keys[0].sign(DATA)], trusted)


def test_threshold_is_not_met_by_repeating_one_signature(keys: list[SigningKey]) -> None:
    trusted = TrustedKeys((keys[0].public_key, keys[1].public_key), threshold=2)
    sig = keys[0].sign(DATA)
    with pytest.raises(UntrustedKeyError):
        verify_signatures(DATA, [sig, sig, sig], trusted)


def test_threshold_is_not_met_by_untrusted_signers(keys: list[SigningKey]) -> None:
    trusted = TrustedKeys((keys[0].public_key, keys[1].public_key), threshold=2)
    with pytest.raises(UntrustedKeyError):
        verify_signatures(DATA, [keys[0].sign(DATA), keys[2].sign(DATA)], trusted)


def test_threshold_met_by_distinct_trusted_keys_ignores_extra_untrusted(keys: list[SigningKey]) -> None:
    trusted = TrustedKeys((keys[0].public_key, keys[1].public_key), threshold=2)
    sigs = [keys[2].sign(DATA), keys[1].sign(DATA), keys[0].sign(DATA)]
    assert verify_signatures(DATA, sigs, trusted) == frozenset({keys[0].keyid, keys[1].keyid})


def test_one_bad_trusted_signature_spoils_an_otherwise_sufficient_set(keys: list[SigningKey]) -> None:
    trusted = TrustedKeys((keys[0].public_key, keys[1].public_key), threshold=1)
    bad = Signature(keys[1].keyid, bytes(64))
    with pytest.raises(SignatureError):
        verify_signatures(DATA, [keys[0].sign(DATA), bad], trusted)


def test_envelope_round_trip_then_verify(keys: list[SigningKey]) -> None:
    trusted = TrustedKeys((keys[0].public_key,))
    env = encode_signatures([keys[0].sign(DATA)])
    assert verify_signatures(DATA, decode_signatures(env), trusted) == {keys[0].keyid}
    # Flip one bit of the base64 signature: still valid base64, no longer a valid signature.
    body = json.loads(env)
    raw = bytearray(base64.b64decode(body[0]["sig"]))
    raw[10] ^= 1
    body[0]["sig"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(SignatureError):
        verify_signatures(DATA, decode_signatures(json.dumps(body).encode()), trusted)
