"""Keys, signatures, the root of trust, and verification. Pure: bytes + keys + now in, verified or an error out.

This package never opens a file or reads the clock. Callers load key bytes from wherever
they keep them and pass them in; callers that check expiry pass ``now`` in.

- :mod:`edge_sdk.trust._keys`: Ed25519 :class:`SigningKey` / :class:`PublicKey`, the
  signature envelope (a JSON list of ``{"keyid": ..., "sig": base64}`` over the exact
  bytes signed) and :func:`verify_signatures` against a :class:`TrustedKeys` threshold.
- :mod:`edge_sdk.trust.root`: the :class:`Root` document that says which keys may sign
  bundles, commands and the next root, :func:`load_root` (parse a stored root and check
  its own signatures) and :func:`verify_root_update` (rotation).
- :mod:`edge_sdk.trust.recipient`: X25519 :class:`RecipientKey` / :class:`RecipientPublicKey`
  and the wrap of an encrypted bundle's content key for each recipient
  (:func:`wrap_content_key`, :func:`unwrap_content_key`).
- :mod:`edge_sdk.trust.device`: a device's own key signs what it reports
  (:func:`sign_device_message`); the host accepts it with :func:`verify_device_message`.
"""

from edge_sdk.trust._keys import (
    MAX_SIGNATURES,
    MAX_SIGNATURES_BYTES,
    PublicKey,
    Signature,
    SigningKey,
    TrustedKeys,
    canonical_json,
    decode_signatures,
    encode_signatures,
    signatures_from_list,
    verify_signatures,
)
from edge_sdk.trust.device import (
    DROP_REASONS,
    DeviceEnvelope,
    DevicePolicy,
    SignatureCheck,
    check_device_signatures,
    fingerprint,
    sign_device_message,
    verify_device_message,
)
from edge_sdk.trust.recipient import (
    RecipientKey,
    RecipientPublicKey,
    WrappedKey,
    new_content_key,
    unwrap_content_key,
    wrap_content_key,
)
from edge_sdk.trust.root import (
    MAX_ROOT_BYTES,
    MAX_ROOT_DEPTH,
    ROLES,
    Role,
    Root,
    SignedRoot,
    load_root,
    sign_root,
    update_root_chain,
    verify_root,
    verify_root_update,
)

__all__ = [
    "DROP_REASONS",
    "MAX_ROOT_BYTES",
    "MAX_ROOT_DEPTH",
    "MAX_SIGNATURES",
    "MAX_SIGNATURES_BYTES",
    "ROLES",
    "DeviceEnvelope",
    "DevicePolicy",
    "PublicKey",
    "RecipientKey",
    "RecipientPublicKey",
    "Role",
    "Root",
    "Signature",
    "SignatureCheck",
    "SignedRoot",
    "SigningKey",
    "TrustedKeys",
    "WrappedKey",
    "canonical_json",
    "check_device_signatures",
    "decode_signatures",
    "encode_signatures",
    "fingerprint",
    "load_root",
    "new_content_key",
    "sign_device_message",
    "sign_root",
    "signatures_from_list",
    "unwrap_content_key",
    "update_root_chain",
    "verify_device_message",
    "verify_root",
    "verify_root_update",
    "verify_signatures",
    "wrap_content_key",
]
