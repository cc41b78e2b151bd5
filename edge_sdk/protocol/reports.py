"""Signed device messages on the wire: seal on the device, open on the host. Pure.

A device wraps every status, event and metrics report it publishes in a
:class:`~edge_sdk.protocol.messages.SignedReport` (:func:`seal`). The host opens it with
:func:`open_report`: the envelope is verified first (:func:`edge_sdk.trust.verify_device_message`:
signer, the topic's device id, sequence, time), then the inner message is decoded and must
name the same device and belong on the topic's channel (a status on ``status``, an event on
``events``, a report on ``metrics``).

Two cases have rules of their own:

- A device not yet enrolled announces itself with a status carrying its public key, signed
  by that key (:func:`open_enrolment_request`): proof that whoever sent it holds the key,
  no more. The host may list it as *pending*; nothing else it says is believed.
- The last will is signed when the agent connects, so it carries an older sequence number
  than the statuses after it. Each ``online`` status names that number (``will_seq``);
  :func:`open_report` accepts an ``offline`` status with exactly that number once more.

Every refusal raises an :class:`~edge_sdk.errors.UntrustedInputError` whose ``reason``
detail is one of :data:`~edge_sdk.trust.device.DROP_REASONS`.
"""

from __future__ import annotations

import base64
import binascii

from edge_sdk.errors import MessageError, SignatureError, TargetMismatchError, UntrustedInputError
from edge_sdk.protocol.codec import CodecLimits, decode, encode
from edge_sdk.protocol.messages import DeviceStatus, Event, Heartbeat, Message, MetricsReport, SignedReport
from edge_sdk.protocol.topics import Channel
from edge_sdk.trust import PublicKey, SigningKey
from edge_sdk.trust.device import (
    DeviceEnvelope,
    DevicePolicy,
    sign_device_message,
    signed_device_bytes,
    verify_device_message,
)

__all__ = [
    "CHANNEL_OF",
    "DeviceMessage",
    "open_enrolment_request",
    "open_report",
    "seal",
    "seal_bytes",
    "signature_input",
    "signed_report_of",
]

DeviceMessage = DeviceStatus | Event | MetricsReport | Heartbeat
#: The one channel each kind of device message belongs on.
CHANNEL_OF: dict[type[Message], Channel] = {
    DeviceStatus: Channel.STATUS,
    Event: Channel.EVENTS,
    MetricsReport: Channel.METRICS,
    Heartbeat: Channel.HEARTBEAT,
}
_DEFAULT_LIMITS = CodecLimits()
_DEFAULT_POLICY = DevicePolicy()


def seal_bytes(payload: bytes, device_id: str, key: SigningKey, seq: int, ts: float) -> bytes:
    """Sign an encoded message as the device's message number ``seq`` and encode the envelope.

    Args:
        payload: the encoded message (what :func:`~edge_sdk.protocol.encode` returned).
        device_id: the device.
        key: the device's own key.
        seq: the next sequence number.
        ts: the device's clock now.

    Returns:
        The bytes to publish.
    """
    env = sign_device_message(key, device_id, seq, ts, payload)
    report = SignedReport(device_id, seq, ts, payload.decode(), env.keyid, base64.b64encode(env.sig).decode("ascii"))
    return encode(report)


def seal(msg: DeviceMessage, key: SigningKey, seq: int, ts: float) -> bytes:
    """:func:`seal_bytes` of ``msg`` encoded, as ``msg.device_id``."""
    return seal_bytes(encode(msg), msg.device_id, key, seq, ts)


def signed_report_of(payload: bytes, limits: CodecLimits = _DEFAULT_LIMITS) -> SignedReport:
    """Decode a published device message that must be signed.

    Raises:
        MessageError: not a message (reason ``malformed``), or a plain one (reason ``unsigned``).
    """
    try:
        msg = decode(payload, limits)
    except MessageError as exc:
        raise MessageError(exc.message, reason="malformed") from exc
    if not isinstance(msg, SignedReport):
        raise MessageError(f"a {msg.TYPE} message from a device must be signed", reason="unsigned")
    return msg


def _envelope(signed: SignedReport) -> DeviceEnvelope:
    try:
        sig = base64.b64decode(signed.sig, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("signed report signature is not base64", reason="bad_signature") from exc
    return DeviceEnvelope(signed.device_id, signed.seq, signed.ts, signed.message.encode(), signed.keyid, sig)


def signature_input(signed: SignedReport) -> tuple[bytes, bytes] | None:
    """A signed report's signature and the exact bytes :func:`open_report` checks it over.

    For checking many signatures at once (elsewhere) before :func:`open_report` judges
    each message; the signature decides nothing by itself.

    Returns:
        ``(signature, signed bytes)``; None when the signature is not base64 (``open_report``
        drops it as ``bad_signature``).
    """
    try:
        env = _envelope(signed)
    except SignatureError:
        return None
    return env.sig, signed_device_bytes(env.device_id, env.seq, env.ts, env.payload)


def _inner(signed: SignedReport, topic_device_id: str, channel: Channel, limits: CodecLimits) -> DeviceMessage:
    try:
        msg = decode(signed.message.encode(), limits)
    except MessageError as exc:
        raise MessageError(f"signed report carries no valid message: {exc.message}", reason="malformed") from exc
    if not isinstance(msg, (DeviceStatus, Event, MetricsReport, Heartbeat)) or CHANNEL_OF[type(msg)] is not channel:
        raise MessageError(f"a signed {msg.TYPE} message does not belong on {channel.value}", reason="malformed")
    if msg.device_id != topic_device_id:
        raise TargetMismatchError(
            f"message for device {msg.device_id!r} arrived on the topic of {topic_device_id!r}",
            reason="device_mismatch",
        )
    return msg


def open_report(
    signed: SignedReport,
    enrolled_key: PublicKey,
    topic_device_id: str,
    channel: Channel,
    last_seq: int | None,
    now: float,
    *,
    will_seq: int | None = None,
    policy: DevicePolicy = _DEFAULT_POLICY,
    limits: CodecLimits = _DEFAULT_LIMITS,
) -> DeviceMessage:
    """Verify a device's signed message and return the message it carries.

    Args:
        signed: the envelope as received.
        enrolled_key: the key enrolled for ``topic_device_id``.
        topic_device_id: the device the topic names.
        channel: the topic's channel.
        last_seq: the highest sequence number accepted from the device (None: none yet).
        now: the host's clock, injected.
        will_seq: the sequence number the device's latest ``online`` status gave for its will.
        policy: the allowed clock skew.
        limits: size and depth limits for the inner message.

    Returns:
        The verified message: its device is the topic's.

    Raises:
        UntrustedInputError: with ``reason`` in :data:`~edge_sdk.trust.device.DROP_REASONS`.
    """
    env = _envelope(signed)
    is_will = will_seq is not None and signed.seq == will_seq and channel is Channel.STATUS
    verify_device_message(enrolled_key, topic_device_id, env, None if is_will else last_seq, now, policy)
    msg = _inner(signed, topic_device_id, channel, limits)
    if is_will and not (isinstance(msg, DeviceStatus) and msg.state == "offline"):
        verify_device_message(enrolled_key, topic_device_id, env, last_seq, now, policy)  # raises: replayed
    return msg


def open_enrolment_request(
    signed: SignedReport,
    topic_device_id: str,
    now: float,
    policy: DevicePolicy = _DEFAULT_POLICY,
    limits: CodecLimits = _DEFAULT_LIMITS,
) -> DeviceStatus:
    """Accept an unenrolled device's status as a request to be enrolled with the key it carries.

    Args:
        signed: the envelope as received on the device's status topic.
        topic_device_id: the device the topic names.
        now: the host's clock, injected.
        policy: the allowed clock skew.
        limits: size and depth limits for the inner message.

    Returns:
        The status, signed by the key it names (``public_key``): record it as pending only.

    Raises:
        UntrustedInputError: with ``reason`` in :data:`~edge_sdk.trust.device.DROP_REASONS`
            (``unenrolled`` when the status names no key).
    """
    msg = _inner(signed, topic_device_id, Channel.STATUS, limits)
    assert isinstance(msg, DeviceStatus)
    if not msg.public_key:
        raise UntrustedInputError(f"device {topic_device_id!r} is not enrolled", reason="unenrolled")
    key = PublicKey(bytes.fromhex(msg.public_key))
    verify_device_message(key, topic_device_id, _envelope(signed), None, now, policy)
    return msg
