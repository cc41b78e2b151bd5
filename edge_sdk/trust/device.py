"""Device identity: each device signs what it says with its own Ed25519 key. Pure.

A device message (status, event, metrics report) travels inside a :class:`DeviceEnvelope`:
the message's exact bytes, the device id, a sequence number and the device's time, signed
together by the device's key. The signed bytes are::

    b"edge-sdk device message v1\\n" + canonical_json({"device_id", "seq", "ts"}) + b"\\n" + payload

so a signature covers one message from one device at one place in its sequence; changing
any of them breaks it.

:func:`verify_device_message` is how the host accepts one, in the style of
:func:`~edge_sdk.trust.root.verify_root_update`: the enrolled key, the device id taken from
the topic, the last sequence number accepted from that device and ``now`` go in; the
verified payload comes out, or an error whose ``reason`` detail (one of :data:`DROP_REASONS`)
says why it is dropped. Sequence numbers are strictly increasing per device; the device
persists them (in blocks reserved ahead), so a restart continues above every number it used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from edge_sdk.errors import ExpiredError, ReplayError, SignatureError, TargetMismatchError, UntrustedKeyError
from edge_sdk.trust._keys import PublicKey, SigningKey, canonical_json

__all__ = [
    "DROP_REASONS",
    "MAX_SEQ",
    "DeviceEnvelope",
    "DevicePolicy",
    "SignatureCheck",
    "check_device_signatures",
    "fingerprint",
    "sign_device_message",
    "signed_device_bytes",
    "verify_device_message",
]

_CONTEXT = b"edge-sdk device message v1\n"
#: Largest sequence number accepted (JSON integers beyond 2**53 lose precision elsewhere).
MAX_SEQ = (1 << 53) - 1

#: Why the host drops a device message; counted per device and reason.
DROP_REASONS = (
    "malformed",  # not a signed device message, or its fields are out of range
    "unsigned",  # a plain message where a signed one is required
    "unenrolled",  # no approved key for the device the topic names
    "bad_signature",  # the signature does not verify with the enrolled key
    "device_mismatch",  # the envelope or the message names another device than the topic
    "replayed",  # sequence number not above the last one accepted
    "future_time",  # dated further in the future than the allowed clock skew
    "pending_full",  # too many devices wait for approval already
)


@dataclass(frozen=True)
class DevicePolicy:
    """How strictly the host judges a device's clock.

    Attributes:
        max_future_s: how far ahead of the host's clock a message may be dated. An hour:
            boards without a real-time clock (a Raspberry Pi) run with a skewed clock until
            NTP answers, and must not go silent for it; a row's ``last_seen`` is never later
            than the host's own clock anyway, so a future date cannot freeze it.
    """

    max_future_s: float = 3600.0


@dataclass(frozen=True)
class DeviceEnvelope:
    """One signed device message.

    Attributes:
        device_id: the device that signed it.
        seq: its sequence number, strictly increasing per device.
        ts: the device's time when it signed (unix seconds).
        payload: the message's exact bytes.
        keyid: the signing key's id.
        sig: the Ed25519 signature over :func:`signed_device_bytes`.
    """

    device_id: str
    seq: int
    ts: float
    payload: bytes
    keyid: str
    sig: bytes


def signed_device_bytes(device_id: str, seq: int, ts: float, payload: bytes) -> bytes:
    """The bytes a device signature covers (see the module docstring)."""
    return _CONTEXT + canonical_json({"device_id": device_id, "seq": seq, "ts": ts}) + b"\n" + payload


#: One signature to check: (the raw enrolled key, the signature, the bytes it must cover).
SignatureCheck = tuple[bytes, bytes, bytes]


def check_device_signatures(checks: Sequence[SignatureCheck]) -> list[bool]:
    """Whether each signature verifies with its key: the costly part of
    :func:`verify_device_message`, for many messages at once (a collector runs it in worker
    processes). Only the answer is computed here; every other rule stays with the caller.

    Args:
        checks: the signatures to check.

    Returns:
        One answer per check, in order.
    """
    return [_key_of(raw).verifies(sig, data) for raw, sig, data in checks]


@functools.lru_cache(maxsize=4096)
def _key_of(raw: bytes) -> PublicKey:
    """The key of raw bytes, with its verifier built once (a worker checks many messages per key)."""
    return PublicKey(raw)


def fingerprint(key: PublicKey) -> str:
    """A device key as an operator compares it: its key id in groups of four hex digits."""
    kid = key.keyid
    return ":".join(kid[i : i + 4] for i in range(0, len(kid), 4))


def sign_device_message(key: SigningKey, device_id: str, seq: int, ts: float, payload: bytes) -> DeviceEnvelope:
    """Sign ``payload`` as message number ``seq`` of ``device_id``, dated ``ts``.

    Args:
        key: the device's own key.
        device_id: the device.
        seq: its next sequence number.
        ts: its clock now.
        payload: the message's bytes.

    Returns:
        The envelope.
    """
    sig = key.sign(signed_device_bytes(device_id, seq, ts, payload))
    return DeviceEnvelope(device_id, seq, ts, payload, sig.keyid, sig.sig)


def verify_device_message(
    enrolled_key: PublicKey,
    topic_device_id: str,
    envelope: DeviceEnvelope,
    last_seq: int | None,
    now: float,
    policy: DevicePolicy | None = None,
) -> bytes:
    """Accept one device message, or raise why it is dropped.

    Args:
        enrolled_key: the key the host enrolled for ``topic_device_id``.
        topic_device_id: the device the topic names (what the broker's ACL binds).
        envelope: the message as received.
        last_seq: the highest sequence number accepted from this device, or None for none yet.
        now: the host's clock (unix seconds), injected.
        policy: the allowed clock skew (default :class:`DevicePolicy`).

    Returns:
        The payload, now attributed to ``topic_device_id``.

    Raises:
        TargetMismatchError: the envelope names another device (reason ``device_mismatch``).
        UntrustedKeyError: signed by another key than the enrolled one (``bad_signature``).
        SignatureError: the signature does not verify (``bad_signature``).
        ExpiredError: the time is not finite, negative, or too far ahead (``future_time``).
        ReplayError: the sequence number is not above ``last_seq`` (``replayed``).
    """
    if envelope.device_id != topic_device_id:
        raise TargetMismatchError(
            f"message signed as device {envelope.device_id!r} arrived on the topic of {topic_device_id!r}",
            reason="device_mismatch",
        )
    if envelope.keyid != enrolled_key.keyid:
        raise UntrustedKeyError(
            f"message from {topic_device_id!r} is signed by key {envelope.keyid}, not its enrolled key",
            reason="bad_signature",
        )
    if not enrolled_key.verifies(
        envelope.sig, signed_device_bytes(envelope.device_id, envelope.seq, envelope.ts, envelope.payload)
    ):
        raise SignatureError(f"message from {topic_device_id!r} has an invalid signature", reason="bad_signature")
    policy = policy or DevicePolicy()
    ts = envelope.ts
    if not math.isfinite(ts) or ts < 0 or ts > now + policy.max_future_s:
        raise ExpiredError(
            f"message from {topic_device_id!r} is dated {ts!r}, more than {policy.max_future_s:g} s "
            f"ahead of {now:.0f} or not a valid time",
            reason="future_time",
        )
    if last_seq is not None and envelope.seq <= last_seq:
        raise ReplayError(
            f"message {envelope.seq} from {topic_device_id!r} is not after message {last_seq}",
            reason="replayed",
            seq=envelope.seq,
            last_seq=last_seq,
        )
    return envelope.payload
