"""edge_sdk.trust: keys, signature envelopes, thresholds, the root of trust.

Also signed commands and the device's trust store, which are built on them.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk.errors import (
    ExpiredError,
    KeyStoreError,
    MessageError,
    ReplayError,
    RollbackError,
    RootError,
    SignatureError,
    TargetMismatchError,
    UntrustedInputError,
    UntrustedKeyError,
)
from edge_sdk.protocol import (
    DeltaOffer,
    DeployCommand,
    RemoveCommand,
    RollbackCommand,
    SignedCommand,
    TransferEnd,
    TransferOffer,
    encode,
    open_command,
    sign_command,
)
from edge_sdk.trust import (
    MAX_SIGNATURES,
    MAX_SIGNATURES_BYTES,
    PublicKey,
    Role,
    Root,
    Signature,
    SignedRoot,
    SigningKey,
    TrustedKeys,
    decode_signatures,
    encode_signatures,
    load_root,
    sign_root,
    update_root_chain,
    verify_root,
    verify_root_update,
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
    ec_pem = (
        generate_private_key(SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
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


def test_signature_envelope_bounds_are_checked_before_its_entries(keys: list[SigningKey]) -> None:
    env = encode_signatures([keys[0].sign(DATA)])
    assert decode_signatures(env, max_bytes=len(env)) == [keys[0].sign(DATA)]
    with pytest.raises(SignatureError, match="limit"):
        decode_signatures(env, max_bytes=len(env) - 1)
    with pytest.raises(SignatureError, match="limit"):
        decode_signatures(b" " * (MAX_SIGNATURES_BYTES + 1))
    with pytest.raises(SignatureError, match="deeper"):
        decode_signatures(json.dumps([{"keyid": "a", "sig": "AA==", "x": _nested(20)}]).encode())
    with pytest.raises(SignatureError, match="not UTF-8 JSON"):
        decode_signatures(b'[{"keyid": "a", "sig": NaN}]')


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


# --- the root of trust ----------------------------------------------------------------------

NOW = 1_700_000_000.0
YEAR = 365 * 86400.0


@pytest.fixture(scope="module")
def pki() -> dict[str, SigningKey]:
    """root1, root2 (a second root key), bundles, commands, and spares."""
    return {n: SigningKey.generate() for n in ("root1", "root2", "bundles", "commands", "new", "evil")}


def _root(
    version: int,
    root_keys: list[SigningKey],
    bundles: list[SigningKey],
    commands: list[SigningKey],
    threshold: int = 1,
    expires: float = NOW + YEAR,
) -> Root:
    every = {k.keyid: k.public_key for k in (*root_keys, *bundles, *commands)}
    return Root(
        version,
        expires,
        every,
        {
            "root": Role(tuple(k.keyid for k in root_keys), threshold),
            "bundles": Role(tuple(k.keyid for k in bundles)),
            "commands": Role(tuple(k.keyid for k in commands)),
        },
    )


@pytest.fixture(scope="module")
def root_v1(pki: dict[str, SigningKey]) -> SignedRoot:
    return sign_root(_root(1, [pki["root1"]], [pki["bundles"]], [pki["commands"]]), [pki["root1"]])


def test_root_round_trips_through_canonical_bytes(root_v1: SignedRoot) -> None:
    again = SignedRoot.from_bytes(root_v1.to_bytes())
    assert again == root_v1 and verify_root(again) == root_v1.root
    assert again.to_bytes() == root_v1.to_bytes()
    assert root_v1.root.trusted("bundles").threshold == 1


def test_rotation_needs_old_and_new_root_keys(pki: dict[str, SigningKey], root_v1: SignedRoot) -> None:
    new = _root(2, [pki["new"]], [pki["bundles"]], [pki["commands"]])
    good = sign_root(new, [pki["root1"], pki["new"]])
    assert verify_root_update(root_v1.root, good.to_bytes(), NOW) == new
    with pytest.raises(UntrustedKeyError, match="current root keys"):
        verify_root_update(root_v1.root, sign_root(new, [pki["new"]]), NOW)  # attacker's own new root
    with pytest.raises(UntrustedKeyError, match="its own root keys"):
        verify_root_update(root_v1.root, sign_root(new, [pki["root1"]]), NOW)  # new keys never proved


def test_root_threshold_counts_distinct_old_keys(pki: dict[str, SigningKey]) -> None:
    v1 = _root(1, [pki["root1"], pki["root2"]], [pki["bundles"]], [pki["commands"]], threshold=2)
    v2 = _root(2, [pki["root1"], pki["root2"]], [pki["new"]], [pki["commands"]], threshold=2)
    with pytest.raises(UntrustedKeyError, match="1 trusted signature"):
        verify_root_update(v1, sign_root(v2, [pki["root1"]]), NOW)
    assert verify_root_update(v1, sign_root(v2, [pki["root1"], pki["root2"]]), NOW) == v2


@pytest.mark.parametrize("version, error", [(1, RollbackError), (0, RootError), (3, RootError)])
def test_root_version_must_be_exactly_the_next(
    pki: dict[str, SigningKey], root_v1: SignedRoot, version: int, error: type
) -> None:
    signers = [pki["root1"]]
    with pytest.raises(error):
        verify_root_update(
            root_v1.root,
            sign_root(replace(root_v1.root, version=version), signers)
            if version
            else b'{"signed":{"version":0},"signatures":[]}',
            NOW,
        )


def test_expired_new_root_is_refused(pki: dict[str, SigningKey], root_v1: SignedRoot) -> None:
    stale = _root(2, [pki["root1"]], [pki["bundles"]], [pki["commands"]], expires=NOW - 1)
    with pytest.raises(ExpiredError):
        verify_root_update(root_v1.root, sign_root(stale, [pki["root1"]]), NOW)
    with pytest.raises(ExpiredError):
        root_v1.root.check_not_expired(NOW + 2 * YEAR)


def test_chain_walks_versions_in_order_and_revocation_takes_effect(
    pki: dict[str, SigningKey], root_v1: SignedRoot
) -> None:
    v2 = sign_root(_root(2, [pki["root1"]], [pki["bundles"], pki["new"]], [pki["commands"]]), [pki["root1"]])
    v3 = sign_root(_root(3, [pki["root1"]], [pki["new"]], [pki["commands"]]), [pki["root1"]])  # revokes "bundles"
    with pytest.raises(RootError, match="skips"):
        verify_root_update(root_v1.root, v3, NOW)
    final = update_root_chain(root_v1.root, [root_v1.to_bytes(), v2.to_bytes(), v3.to_bytes()], NOW)
    assert final.version == 3
    data = b"manifest"
    verify_signatures(data, [pki["bundles"].sign(data)], root_v1.root.trusted("bundles"))
    with pytest.raises(UntrustedKeyError):
        verify_signatures(data, [pki["bundles"].sign(data)], final.trusted("bundles"))


@pytest.mark.parametrize(
    "doc",
    [
        b"",
        b"[]",
        b'{"signed": {}}',
        b'{"signed": {}, "signatures": []}',
        b"x" * (70 << 10),
        b'{"signed": {"schema": 1, "type": "root"}, "signatures": [{"keyid": "a", "sig": "AA=="}]}',
    ],
)
def test_malformed_roots_are_refused(root_v1: SignedRoot, doc: bytes) -> None:
    with pytest.raises(UntrustedInputError):
        verify_root_update(root_v1.root, doc, NOW)


def _nested(levels: int) -> Any:
    """A JSON value of exactly ``levels`` levels: ``levels - 1`` objects around a scalar."""
    value: Any = 1
    for _ in range(levels - 1):
        value = {"n": value}
    return value


def test_root_nested_too_deep_is_refused_before_its_signatures(pki: dict[str, SigningKey], root_v1: SignedRoot) -> None:
    # The document is depth 1 and "signed" depth 2, so an unknown field of the root may hold 14 levels.
    ok = sign_root(replace(root_v1.root, version=2, extra={"x_future": _nested(14)}), [pki["root1"]])
    assert SignedRoot.from_bytes(ok.to_bytes()).root.extra == {"x_future": _nested(14)}
    deep = sign_root(replace(root_v1.root, version=2, extra={"x_future": _nested(15)}), [pki["root1"]])
    with pytest.raises(RootError, match="root document nests deeper than 16 levels"):
        SignedRoot.from_bytes(deep.to_bytes())
    # Signed by the current root keys or not, a deep root_update is refused the same way.
    with pytest.raises(RootError, match="deeper"):
        verify_root_update(root_v1.root, deep.to_bytes(), NOW)
    with pytest.raises(RootError, match="deeper"):
        load_root(deep.to_bytes())
    with pytest.raises(RootError, match="deeper than 4"):
        SignedRoot.from_bytes(root_v1.to_bytes(), max_depth=4)
    exhausting = b'{"signed":' + b"[" * 60_000 + b"]" * 60_000 + b',"signatures":[]}'
    with pytest.raises(RootError):
        verify_root_update(root_v1.root, exhausting, NOW)


def test_load_root_parses_and_checks_the_roots_own_signatures(pki: dict[str, SigningKey], root_v1: SignedRoot) -> None:
    assert load_root(root_v1.to_bytes()) == root_v1
    # Hand-edited after signing: the signatures no longer cover it.
    edited = SignedRoot(replace(root_v1.root, expires_at=root_v1.root.expires_at + 1), root_v1.signatures)
    with pytest.raises(SignatureError):
        load_root(edited.to_bytes())
    # Signed, but not by its own root role.
    with pytest.raises(UntrustedKeyError):
        load_root(sign_root(root_v1.root, [pki["evil"]]).to_bytes())
    with pytest.raises(RootError, match="not UTF-8 JSON"):
        load_root(b"{")
    with pytest.raises(RootError, match="limit"):
        load_root(root_v1.to_bytes(), max_bytes=len(root_v1.to_bytes()) - 1)


def test_root_key_ids_must_match_their_keys(pki: dict[str, SigningKey], root_v1: SignedRoot) -> None:
    body = json.loads(root_v1.to_bytes())
    keyid = pki["bundles"].keyid
    body["signed"]["keys"][keyid]["public"] = pki["evil"].public_key.raw.hex()  # swap the key under a trusted id
    with pytest.raises(RootError, match="does not match"):
        SignedRoot.from_bytes(json.dumps(body).encode())


_ROOT_SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@_ROOT_SETTINGS
@given(data=st.data())
def test_mutated_root_updates_are_never_accepted(
    pki: dict[str, SigningKey], root_v1: SignedRoot, data: st.DataObject
) -> None:
    """A valid v2 with any byte changed, or re-signed by an outsider, is refused."""
    v2 = sign_root(_root(2, [pki["root1"]], [pki["new"]], [pki["commands"]]), [pki["root1"]]).to_bytes()
    if data.draw(st.booleans()):
        edits = data.draw(st.lists(st.tuples(st.integers(0, len(v2) - 1), st.integers(0, 255)), min_size=1, max_size=4))
        mutated = bytearray(v2)
        for pos, value in edits:
            mutated[pos] = value
        doc = bytes(mutated)
    else:
        body = json.loads(v2)
        field = data.draw(st.sampled_from(["version", "expires_at", "roles", "keys"]))
        body["signed"][field] = {"version": 3, "expires_at": NOW + 10 * YEAR, "roles": {}, "keys": {}}[field]
        signed = (
            sign_root(Root.from_dict(body["signed"]), [pki["evil"]]) if field in ("version", "expires_at") else None
        )
        doc = signed.to_bytes() if signed else json.dumps(body).encode()
    try:
        accepted = verify_root_update(root_v1.root, doc, NOW)
    except UntrustedInputError:
        return
    assert accepted == SignedRoot.from_bytes(v2).root  # only an equivalent encoding may pass


# --- signed commands ---------------------------------------------------------------------------

_CID = "0123456789abcdef0123456789abcdef"


def _deploy(device: str = "pi-1", ts: float = NOW, ttl: float = 600.0) -> DeployCommand:
    offer = TransferOffer("ab" * 16, 4096, "0" * 64, 1024, "1" * 64)
    return DeployCommand(_CID, "digits", 2, offer, ts, device_id=device, expires_at=ts + ttl)


def test_signed_command_opens_only_for_its_device_and_time(pki: dict[str, SigningKey], root_v1: SignedRoot) -> None:
    root = root_v1.root
    signed = sign_command(_deploy(), [pki["commands"]])
    assert open_command(signed, root, "pi-1", NOW + 1) == _deploy()
    with pytest.raises(TargetMismatchError, match="addressed to device"):
        open_command(signed, root, "pi-2", NOW + 1)
    with pytest.raises(ExpiredError, match="expired"):
        open_command(signed, root, "pi-1", NOW + 601)
    with pytest.raises(ExpiredError, match="future"):
        open_command(sign_command(_deploy(ts=NOW + 3600), [pki["commands"]]), root, "pi-1", NOW)
    with pytest.raises(ExpiredError, match="lives"):
        open_command(sign_command(_deploy(ttl=3 * 86400), [pki["commands"]]), root, "pi-1", NOW)
    for cmd in (
        RollbackCommand(_CID, "digits", 1, NOW, "pi-1", NOW + 60),
        RemoveCommand(_CID, "digits", NOW, "pi-1", NOW + 60),
    ):
        assert open_command(sign_command(cmd, [pki["commands"]]), root, "pi-1", NOW) == cmd


def test_commands_need_a_command_key(pki: dict[str, SigningKey], root_v1: SignedRoot) -> None:
    root = root_v1.root
    for wrong in ("bundles", "root1", "evil"):  # keys of other roles do not command
        with pytest.raises(UntrustedKeyError):
            open_command(sign_command(_deploy(), [pki[wrong]]), root, "pi-1", NOW)
    with pytest.raises(SignatureError, match="not signed"):
        open_command(SignedCommand(encode(_deploy()).decode(), ()), root, "pi-1", NOW)
    with pytest.raises(MessageError, match="not a command"):
        text = encode(TransferEnd(_CID, "ab" * 16)).decode()
        open_command(SignedCommand(text, (pki["commands"].sign(text.encode()).to_dict(),)), root, "pi-1", NOW)
    with pytest.raises(MessageError):
        sign_command(
            DeployCommand(_CID, "digits", 2, _deploy().transfer, NOW), [pki["commands"]]
        )  # no device, no expiry


def test_a_delta_offer_is_signed_with_its_command(pki: dict[str, SigningKey], root_v1: SignedRoot) -> None:
    delta = DeltaOffer(TransferOffer("cd" * 16, 2048, "2" * 64, 1024, "3" * 64), 1, "4" * 64)
    cmd = replace(_deploy(), delta=delta)
    signed = sign_command(cmd, [pki["commands"]])
    assert open_command(signed, root_v1.root, "pi-1", NOW + 1) == cmd
    body = json.loads(signed.command)
    forged: list[dict[str, Any]] = []
    for path, value in ((("transfer", "sha256"), "5" * 64), (("base_version",), 2), (("base_content",), "6" * 64)):
        changed = json.loads(signed.command)
        target = changed["delta"]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        forged.append(changed)
    forged.append({k: v for k, v in body.items() if k != "delta"})  # the offer dropped: the signature covered it
    for changed in forged:
        text = json.dumps(changed, separators=(",", ":"))
        with pytest.raises(SignatureError):
            open_command(SignedCommand(text, signed.signatures), root_v1.root, "pi-1", NOW + 1)


@_ROOT_SETTINGS
@given(data=st.data())
def test_mutated_signed_commands_are_never_accepted(
    pki: dict[str, SigningKey], root_v1: SignedRoot, data: st.DataObject
) -> None:
    signed = sign_command(_deploy(), [pki["commands"]])
    text = signed.command
    kind = data.draw(st.sampled_from(["text", "field", "resign"]))
    if kind == "text":
        pos = data.draw(st.integers(0, len(text) - 1))
        ch = data.draw(st.characters(codec="ascii"))
        mutated = SignedCommand(text[:pos] + ch + text[pos + 1 :], signed.signatures)
        if mutated.command == text:
            return
    else:
        body = json.loads(text)
        field = data.draw(st.sampled_from(["device_id", "expires_at", "bundle_version", "rollback", "bundle_name"]))
        body[field] = {
            "device_id": "pi-2",
            "expires_at": NOW + 86000,
            "bundle_version": 1,
            "rollback": True,
            "bundle_name": "other",
        }[field]
        new_text = json.dumps(body, separators=(",", ":"))
        sigs = (pki["evil"].sign(new_text.encode()).to_dict(),) if kind == "resign" else signed.signatures
        mutated = SignedCommand(new_text, sigs)
    with pytest.raises(UntrustedInputError):
        open_command(mutated, root_v1.root, "pi-1", NOW + 1)


# --- the device's trust store (persisted root and nonces) -----------------------------------


def test_trust_store_refuses_replays_across_restarts(tmp_path, root_v1: SignedRoot) -> None:  # type: ignore[no-untyped-def]
    from device_agent.trust_store import TrustStore

    store = TrustStore(tmp_path, root_v1.to_bytes())
    store.admit(_CID, NOW + 60, NOW)
    again = TrustStore(tmp_path, root_v1.to_bytes())  # a reboot
    with pytest.raises(ReplayError):
        again.admit(_CID, NOW + 60, NOW + 1)
    with pytest.raises(ReplayError):  # the device's clock alone (it can go back) forgets nothing
        again.admit(_CID, NOW + 200, NOW + 61)
    again.observe(NOW + 61, NOW + 61)  # a signed time past the nonce's expiry raises the time floor
    again.admit(_CID, NOW + 200, NOW + 61)  # only then is the expired nonce forgotten
    small = TrustStore(tmp_path / "small", root_v1.to_bytes(), max_nonces=2)
    small.admit("a" * 32, NOW + 60, NOW)
    small.admit("b" * 32, NOW + 60, NOW)
    with pytest.raises(ReplayError, match="limit"):
        small.admit("c" * 32, NOW + 60, NOW)


def test_trust_store_keeps_rotations_and_ignores_older_shipped_roots(
    tmp_path, pki: dict[str, SigningKey], root_v1: SignedRoot
) -> None:  # type: ignore[no-untyped-def]
    from device_agent.trust_store import TrustStore

    store = TrustStore(tmp_path, root_v1.to_bytes())
    v2 = sign_root(_root(2, [pki["root1"]], [pki["new"]], [pki["commands"]]), [pki["root1"]])
    assert store.update_root(v2.to_bytes(), NOW) is True
    assert store.update_root(v2.to_bytes(), NOW) is False  # a repeat changes nothing
    assert store.update_root(root_v1.to_bytes(), NOW) is False
    forged = sign_root(_root(3, [pki["evil"]], [pki["evil"]], [pki["evil"]]), [pki["evil"]])
    with pytest.raises(UntrustedKeyError):
        store.update_root(forged.to_bytes(), NOW)
    rebooted = TrustStore(tmp_path, root_v1.to_bytes())  # shipped v1 does not undo the rotation
    assert rebooted.root.version == 2 and pki["bundles"].keyid not in rebooted.root.keys
