"""Signed commands: whoever controls the broker can replay nothing and command nothing. Pure.

A command that changes what runs on a device (:class:`DeployCommand`,
:class:`RollbackCommand`, :class:`RemoveCommand`) travels inside a :class:`SignedCommand`:
the command's exact JSON text plus signatures by a threshold of the keys the device's
root authorises for the ``commands`` role. Each command names its target ``device_id``,
a nonce (``command_id``, 128 random bits), its issue time (``ts``) and ``expires_at``.

:func:`open_command` checks, in order: the envelope parses; the signatures (before any
field is trusted); the command is one of the three kinds; it is addressed to this device;
it was not issued in the future (beyond the allowed clock skew), has not expired, and
does not live longer than the policy allows. The nonce check needs state (the nonces
already seen) and so lives in the device's shell, which keeps each nonce until the
command's expiry: that is why lifetimes are bounded.

Not signed: ``transfer_end`` (it only asks the device which chunks it still lacks) and the
chunks themselves (bound by the size and sha256 in the signed deploy command), and
``root_update`` (self-authenticating, see :class:`RootUpdate`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from edge_sdk.errors import ExpiredError, JsonError, MessageError, TargetMismatchError
from edge_sdk.protocol.codec import CodecLimits, decode, encode
from edge_sdk.protocol.messages import (
    DeployCommand,
    RemoveCommand,
    RollbackCommand,
    SignedCommand,
)
from edge_sdk.trust import Root, SigningKey, signatures_from_list, verify_signatures
from edge_sdk.untrusted_json import parse_json_object

__all__ = ["COMMAND_TYPES", "Command", "CommandPolicy", "open_command", "peek_command_id", "sign_command"]

Command = DeployCommand | RollbackCommand | RemoveCommand
COMMAND_TYPES = (DeployCommand, RollbackCommand, RemoveCommand)
_DEFAULT_LIMITS = CodecLimits()


@dataclass(frozen=True)
class CommandPolicy:
    """How strictly a device treats command times.

    Attributes:
        max_ttl_s: longest lifetime (``expires_at - ts``) accepted; bounds the nonce record.
        max_clock_skew_s: how far in the future ``ts`` may be (device and host clocks differ).
    """

    max_ttl_s: float = 24 * 3600.0
    max_clock_skew_s: float = 300.0


def sign_command(command: Command, keys: Iterable[SigningKey]) -> SignedCommand:
    """Wrap ``command`` with signatures by ``keys`` over its exact JSON bytes.

    Raises:
        MessageError: no key given, or the command lacks a device id or an expiry.
    """
    if not command.device_id or not command.expires_at:
        raise MessageError("a signed command needs a device_id and an expires_at")
    text = encode(command).decode()
    sigs = tuple(k.sign(text.encode()).to_dict() for k in {k.keyid: k for k in keys}.values())
    if not sigs:
        raise MessageError("a signed command needs at least one signing key")
    return SignedCommand(text, sigs)


def peek_command_id(signed: SignedCommand) -> str:
    """The command id the envelope claims, unverified: only to label a refusal for the host."""
    try:
        body = parse_json_object(signed.command.encode(), _DEFAULT_LIMITS.json_limits, what="command")
    except JsonError:
        return ""
    cid = body.get("command_id")
    return cid if isinstance(cid, str) and len(cid) == 32 else ""


def open_command(
    signed: SignedCommand,
    root: Root,
    device_id: str,
    now: float,
    policy: CommandPolicy = CommandPolicy(),
    limits: CodecLimits = _DEFAULT_LIMITS,
) -> Command:
    """Verify a signed command and return the command it carries.

    Args:
        signed: the envelope as received.
        root: the device's current root (its ``commands`` role decides who may command).
        device_id: this device.
        now: current time (unix seconds), injected.
        policy: lifetime and clock-skew bounds.
        limits: size and depth limits for the inner command.

    Returns:
        The verified command. The caller still checks its nonce against those seen.

    Raises:
        SignatureError: missing or invalid signatures.
        UntrustedKeyError: signed, but not by a threshold of the root's command keys.
        MessageError: the signed text is not a deploy, rollback or remove command.
        TargetMismatchError: the command is addressed to another device.
        ExpiredError: expired, issued in the future, or living longer than allowed.
    """
    data = signed.command.encode()
    verify_signatures(data, signatures_from_list(list(signed.signatures)), root.trusted("commands"))
    command = decode(data, limits)
    if not isinstance(command, COMMAND_TYPES):
        raise MessageError(f"a signed {command.TYPE!r} message is not a command")
    if command.device_id != device_id:
        raise TargetMismatchError(
            f"command {command.command_id} is addressed to device {command.device_id!r}, not {device_id!r}",
            constraint="device_id",
            required=command.device_id,
            actual=device_id,
        )
    issued, expires = command.ts, command.expires_at
    if not (math.isfinite(issued) and math.isfinite(expires)):
        raise ExpiredError("command times must be finite numbers")
    if now >= expires:
        raise ExpiredError(
            f"command {command.command_id} expired at {expires:.0f} (now {now:.0f})", expires_at=expires, now=now
        )
    if issued > now + policy.max_clock_skew_s:
        raise ExpiredError(
            f"command {command.command_id} was issued {issued - now:.0f} s in the future "
            f"(allowed clock skew {policy.max_clock_skew_s:g} s)",
            issued_at=issued,
            now=now,
        )
    if expires - issued > policy.max_ttl_s:
        raise ExpiredError(
            f"command {command.command_id} lives {expires - issued:.0f} s, longer than the "
            f"{policy.max_ttl_s:g} s this device accepts",
            issued_at=issued,
            expires_at=expires,
        )
    return command
