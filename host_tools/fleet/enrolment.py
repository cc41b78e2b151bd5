"""Which device messages the host believes: the enrolled keys, and the gate every message passes.

A :class:`ReportGate` is built from the registry's enrolments (:meth:`ReportGate.from_registry`)
and checks each message a device published (:meth:`ReportGate.check`): it must be a
:class:`~edge_sdk.protocol.SignedReport` from an approved device, signed by its enrolled key,
for the device and channel its topic names, with a sequence number above the last one
accepted from that device on that channel (a retained status is older than the events
after it; a message cannot change channel, its type is bound to it) and a plausible time
(:func:`edge_sdk.protocol.open_report`). What fails is dropped
and counted per device and reason (drops from devices the host does not know are counted
under ``*``, so a flood of invented ids adds no rows). An unenrolled device's status that
carries its key and is signed by it is kept as a request to be enrolled, never as a device.

The gate holds what it learns in memory (it is called from a router's worker thread);
:meth:`ReportGate.flush` writes the counts, sequence numbers and enrolment requests to the
registry from the thread that owns it.

A collector that splits a shared subscription with others sees each device's messages out
of order and, after a restart, again: it builds the gate with ``unordered`` channels
(events and metrics), whose messages are stored under their own unique key, so a repeat
changes nothing. On those channels the signature, device and time are checked, the order
is not.

Unsigned messages are refused unless the gate is built with ``allow_unsigned=True``, for a
migration period while older agents are replaced (``edgectl --allow-unsigned-reports``).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.errors import ConfigError, EdgeError, MessageError, UntrustedInputError
from edge_sdk.protocol import (
    CHANNEL_OF,
    Channel,
    CodecLimits,
    DeviceMessage,
    DeviceStatus,
    Event,
    Heartbeat,
    MetricsReport,
    ParsedTopic,
    SignedReport,
    decode,
    open_enrolment_request,
    open_report,
    parse_topic,
    signature_input,
)
from edge_sdk.protocol.topics import check_device_id
from edge_sdk.trust import DevicePolicy, PublicKey, SignatureCheck
from edge_sdk.trust import fingerprint as fingerprint_of
from host_tools.fleet.registry import UNKNOWN_DEVICE, EnrolmentRecord, Registry

__all__ = [
    "DEFAULT_MAX_PENDING",
    "Dropped",
    "PreparedBatch",
    "ReportGate",
    "SignatureChecker",
    "Verified",
    "enroll_device",
    "key_fingerprint",
    "pending_enrolment",
    "read_public_key",
]

log = logging.getLogger(__name__)

#: Most devices that may wait for approval at once (bounds what invented ids can add).
DEFAULT_MAX_PENDING = 256


#: Checks many signatures at once: ``(raw key, signature, signed bytes)`` -> verifies
#: (:func:`edge_sdk.trust.check_device_signatures`, perhaps in worker processes).
SignatureChecker = Callable[[Sequence[SignatureCheck]], list[bool]]


@dataclass(frozen=True)
class _CheckedKey(PublicKey):
    """An enrolled key that already knows its answer for one signature over one text.

    The answer was computed elsewhere from these very bytes and this very key; any other
    signature or text is verified as usual.
    """

    checked: tuple[bytes, bytes] = (b"", b"")
    ok: bool = False

    def verifies(self, signature: bytes, data: bytes) -> bool:
        if (signature, data) == self.checked:
            return self.ok
        return super().verifies(signature, data)


@dataclass(frozen=True)
class PreparedBatch:
    """Messages decoded by :meth:`ReportGate.prepare`, waiting for their signatures' answers.

    Attributes:
        decoded: per message, its topic and message, or why it was dropped already.
        checks: the signatures to check, ``(raw key, signature, signed bytes)``.
        keyed: per check, the index of its message, the key and the signed text.
    """

    decoded: list[tuple[ParsedTopic, object] | Dropped]
    checks: list[SignatureCheck]
    keyed: list[tuple[int, PublicKey, tuple[bytes, bytes]]]


@dataclass(frozen=True)
class Verified:
    """A device message the gate let through.

    Attributes:
        msg: the message; its device is the topic's.
        fresh: False for a repeat of the last message accepted from the device (a retained
            status or report heard again): deliver statuses, store nothing twice.
        seq: its sequence number (None for an unsigned message let through).
    """

    msg: DeviceMessage
    fresh: bool
    seq: int | None = None


@dataclass(frozen=True)
class Dropped:
    """A device message the gate refused, and why (one of :data:`edge_sdk.trust.DROP_REASONS`,
    or ``pending`` for a valid enrolment request, which is kept but not delivered)."""

    reason: str


class ReportGate:
    """Verifies device messages against the enrolled keys; counts what it drops.

    Args:
        enrolments: the registry's enrolments; only approved ones may speak.
        allow_unsigned: let plain (unsigned) messages through (migration period only).
        policy: the allowed clock skew of devices.
        limits: size limits for decoding.
        max_pending: most devices that may wait for approval.
        unordered: channels whose messages need not come in order (each is stored once
            under its own key): a sequence number at or below the last is not a replay there.

    Attributes:
        drops: (device id or ``*``, reason) -> messages dropped since the last flush.
        requests: device id -> its latest enrolment request (a status with its key), not yet recorded.
    """

    def __init__(
        self,
        enrolments: list[EnrolmentRecord] | tuple[EnrolmentRecord, ...] = (),
        *,
        allow_unsigned: bool = False,
        policy: DevicePolicy | None = None,
        limits: CodecLimits | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        unordered: frozenset[Channel] = frozenset(),
    ) -> None:
        self.allow_unsigned = allow_unsigned
        self.unordered = unordered
        self.policy = policy or DevicePolicy()
        self.limits = limits or CodecLimits()
        self.max_pending = max_pending
        self.drops: Counter[tuple[str, str]] = Counter()
        self.requests: dict[str, DeviceStatus] = {}
        self._known = {e.device_id for e in enrolments}
        self._keys = {e.device_id: PublicKey(bytes.fromhex(e.public_key)) for e in enrolments if e.state == "approved"}
        self._last = {(e.device_id, ch): n for e in enrolments for ch, n in e.sequences.items()}
        self._will = {e.device_id: e.will_seq for e in enrolments if e.will_seq is not None}
        self._advanced: dict[tuple[str, str], tuple[int, int | None]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_registry(
        cls, registry: Registry, *, allow_unsigned: bool = False, unordered: frozenset[Channel] = frozenset()
    ) -> ReportGate:
        """A gate for the registry's enrolments.

        Raises:
            StorageError: the registry cannot be read.
        """
        return cls(registry.list_enrolments(), allow_unsigned=allow_unsigned, unordered=unordered)

    def _drop(self, device_id: str, reason: str, why: str) -> Dropped:
        who = device_id if device_id in self._known else UNKNOWN_DEVICE
        self.drops[(who, reason)] += 1
        log.info("dropped a message on the topic of %r (%s): %s", device_id, reason, why)
        return Dropped(reason)

    def check(self, topic: str, payload: bytes, now: float) -> Verified | Dropped:
        """Verify one message a device published; what is dropped is counted.

        Args:
            topic: the topic it arrived on (names the device and channel).
            payload: its bytes.
            now: the host's clock.

        Returns:
            The verified message, or why it was dropped.
        """
        decoded = self._decode(topic, payload)
        return decoded if isinstance(decoded, Dropped) else self._judge(*decoded, now)

    def check_many(
        self, messages: Sequence[tuple[str, bytes]], now: float, signatures: SignatureChecker
    ) -> list[Verified | Dropped]:
        """:meth:`check` each message in order, their signatures checked all at once first.

        Every rule but the signature itself (the enrolled key, the device, the order, the
        time) is judged here as :meth:`check` judges it; ``signatures`` only says whether
        each signature verifies over its bytes with its device's enrolled key.

        Args:
            messages: ``(topic, payload)`` as they arrived.
            now: the host's clock.
            signatures: checks many signatures at once.

        Returns:
            One result per message, in order.
        """
        batch = self.prepare(messages)
        return self.judge(batch, signatures(batch.checks) if batch.checks else [], now)

    def prepare(self, messages: Sequence[tuple[str, bytes]]) -> PreparedBatch:
        """The first half of :meth:`check_many`: decode each message and list the signatures
        to check. Nothing is judged and no state changes but the count of malformed messages,
        so the signatures can be checked elsewhere while earlier batches are judged.
        """
        decoded = [self._decode(topic, payload) for topic, payload in messages]
        checks: list[SignatureCheck] = []
        keyed: list[tuple[int, PublicKey, tuple[bytes, bytes]]] = []
        with self._lock:
            for i, item in enumerate(decoded):
                if isinstance(item, Dropped) or not isinstance(item[1], SignedReport):
                    continue
                key = self._keys.get(item[0].device_id)
                signed = None if key is None else signature_input(item[1])
                if key is not None and signed is not None:
                    checks.append((key.raw, *signed))
                    keyed.append((i, key, signed))
        return PreparedBatch(decoded, checks, keyed)

    def judge(self, batch: PreparedBatch, answers: Sequence[bool], now: float) -> list[Verified | Dropped]:
        """The second half of :meth:`check_many`: judge each message of ``batch`` in order,
        given whether each of its ``checks`` verifies (``answers``, in the same order)."""
        keys: dict[int, PublicKey] = {
            i: _CheckedKey(key.raw, signed, ok) for (i, key, signed), ok in zip(batch.keyed, answers, strict=True)
        }
        return [
            item if isinstance(item, Dropped) else self._judge(*item, now, keys.get(i))
            for i, item in enumerate(batch.decoded)
        ]

    def _decode(self, topic: str, payload: bytes) -> tuple[ParsedTopic, object] | Dropped:
        try:
            parsed = parse_topic(topic)
            msg = decode(payload, self.limits)
        except MessageError as exc:
            with self._lock:
                self.drops[(UNKNOWN_DEVICE, "malformed")] += 1
            log.info("dropped a malformed message on %s: %s", topic, exc.message)
            return Dropped("malformed")
        return parsed, msg

    def _judge(
        self, parsed: ParsedTopic, msg: object, now: float, checked: PublicKey | None = None
    ) -> Verified | Dropped:
        device_id, channel = parsed.device_id, parsed.channel
        with self._lock:
            if not isinstance(msg, SignedReport):
                return self._unsigned(device_id, channel, msg)
            key = self._keys.get(device_id)
            if key is None:
                return self._request(msg, device_id, channel, now)
            if checked is not None and checked.raw == key.raw:
                key = checked  # its signature was checked with this very key
            where = (device_id, channel.value)
            known = self._last.get(where)
            last = None if channel in self.unordered else known
            try:
                inner = open_report(
                    msg,
                    key,
                    device_id,
                    channel,
                    last,
                    now,
                    will_seq=self._will.get(device_id),
                    policy=self.policy,
                    limits=self.limits,
                )
            except UntrustedInputError as exc:
                reason = str(exc.details.get("reason", "malformed"))
                if reason == "replayed" and last is not None and msg.seq == last:
                    return self._repeat(msg, key, device_id, channel, now)
                return self._drop(device_id, reason, exc.message)
            will = inner.will_seq if isinstance(inner, DeviceStatus) and inner.state == "online" else None
            if known is None or msg.seq > known:
                self._last[where] = msg.seq
            if will is not None:
                self._will[device_id] = will
            self._advanced[where] = (self._last[where], self._will.get(device_id))
            return Verified(inner, True, msg.seq)

    def _repeat(
        self, msg: SignedReport, key: PublicKey, device_id: str, channel: Channel, now: float
    ) -> Verified | Dropped:
        """The last message accepted, heard again (retained): verify it fully, mark it not fresh."""
        try:
            inner = open_report(msg, key, device_id, channel, msg.seq - 1, now, policy=self.policy, limits=self.limits)
        except UntrustedInputError as exc:
            return self._drop(device_id, str(exc.details.get("reason", "malformed")), exc.message)
        return Verified(inner, False, msg.seq)

    def _unsigned(self, device_id: str, channel: Channel, msg: object) -> Verified | Dropped:
        if not self.allow_unsigned:
            return self._drop(device_id, "unsigned", "unsigned device messages are refused")
        if not isinstance(msg, (DeviceStatus, Event, MetricsReport, Heartbeat)) or CHANNEL_OF[type(msg)] is not channel:
            return self._drop(device_id, "malformed", "not a device message for this channel")
        if msg.device_id != device_id:
            return self._drop(device_id, "device_mismatch", f"names device {msg.device_id!r}")
        return Verified(msg, True)

    def _request(self, msg: SignedReport, device_id: str, channel: Channel, now: float) -> Dropped:
        """An unenrolled (or revoked, or pending) device spoke: keep a valid status as an enrolment request."""
        if channel is not Channel.STATUS:
            return self._drop(device_id, "unenrolled", "no approved key")
        try:
            status = open_enrolment_request(msg, device_id, now, self.policy, self.limits)
        except UntrustedInputError as exc:
            return self._drop(device_id, str(exc.details.get("reason", "malformed")), exc.message)
        if device_id not in self.requests and len(self.requests) >= self.max_pending:
            return self._drop(device_id, "pending_full", "too many enrolment requests")
        self.requests[device_id] = status
        return Dropped("pending")

    def flush(self, registry: Registry, now: float) -> None:
        """Write drop counts, sequence numbers and enrolment requests to the registry, then forget them.

        Should a write fail, the gate keeps them (merged with what came meanwhile) for the
        next flush: call it inside the transaction that stores the messages, and again when
        that transaction is retried.

        Raises:
            StorageError: on a database failure.
        """
        with self._lock:
            drops, self.drops = self.drops, Counter()
            advanced, self._advanced = self._advanced, {}
            requests, self.requests = self.requests, {}
        try:
            self._store(registry, now, Counter(drops), advanced, requests)
        except BaseException:
            with self._lock:
                self.drops.update(drops)
                self._advanced = {**advanced, **self._advanced}  # what came meanwhile is newer
                self.requests = {**requests, **self.requests}
            raise

    def _store(
        self,
        registry: Registry,
        now: float,
        drops: Counter[tuple[str, str]],
        advanced: Mapping[tuple[str, str], tuple[int, int | None]],
        requests: Mapping[str, DeviceStatus],
    ) -> None:
        # Rows in one order (device, channel) in every collector: two collectors' transactions
        # that touch the same devices then wait for each other instead of deadlocking.
        registry.advance_sequences(
            [(device_id, channel, seq, will) for (device_id, channel), (seq, will) in sorted(advanced.items())]
        )
        full = 0
        for device_id, status in requests.items():
            if not registry.request_enrolment(device_id, status.public_key, now, self.max_pending):
                current = registry.get_enrolment(device_id)
                if current is None:
                    full += 1
                elif current.state == "revoked":
                    drops[(device_id, "unenrolled")] += 1
        if full:
            drops[(UNKNOWN_DEVICE, "pending_full")] += full
        registry.count_drops(dict(sorted(drops.items())), now)


# --- the operator's decisions: enroll, approve, revoke ----------------------------------


def read_public_key(path: Path) -> PublicKey:
    """A device's public key from a file: PEM (the agent's ``device.pub``) or 64 hex digits.

    Raises:
        ConfigError: the file cannot be read, or holds no Ed25519 public key.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}", file=str(path)) from exc
    text = data.strip()
    if len(text) == 64:
        try:
            return PublicKey(bytes.fromhex(text.decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            pass
    try:
        return PublicKey.from_pem(data)
    except EdgeError as exc:
        raise ConfigError(
            f"{path} is not an Ed25519 public key (PEM or 64 hex digits): {exc.message}", file=str(path)
        ) from exc


def enroll_device(
    registry: Registry, device_id: str, now: float, *, key_file: Path | None = None, fingerprint: str | None = None
) -> EnrolmentRecord:
    """Enroll ``device_id``: with its key file (pre-provisioning, or a new key), or by approving
    the key it announced when that key's fingerprint is ``fingerprint``.

    Raises:
        ConfigError: not exactly one of ``key_file`` and ``fingerprint``; a bad key file; no
            pending key; a pending key with another fingerprint (nothing is enrolled).
        MessageError: ``device_id`` is not a valid device id.
        StorageError: the registry cannot be written.
    """
    check_device_id(device_id)
    if (key_file is None) == (fingerprint is None):
        raise ConfigError("give exactly one of --key PUBKEYFILE or --fingerprint FP", key="key")
    if key_file is not None:
        return registry.enroll(device_id, read_public_key(key_file).raw.hex(), now)
    current = registry.get_enrolment(device_id)
    if current is None or current.state != "pending":
        raise ConfigError(f"device {device_id!r} has no pending key; enroll it with --key", device_id=device_id)
    actual = key_fingerprint(current)
    if actual.replace(":", "") != (fingerprint or "").replace(":", "").lower():
        raise ConfigError(
            f"device {device_id!r} waits with key {actual}, not {fingerprint}; nothing enrolled", device_id=device_id
        )
    return registry.decide_enrolment(device_id, "approved", now)


def pending_enrolment(registry: Registry, device_id: str) -> EnrolmentRecord:
    """The key ``device_id`` announced and waits to have approved.

    Raises:
        ConfigError: the device is unknown, or not waiting for approval.
    """
    current = registry.get_enrolment(device_id)
    if current is None or current.state != "pending":
        state = "unknown" if current is None else current.state
        raise ConfigError(f"device {device_id!r} is {state}, not waiting for approval", device_id=device_id)
    return current


def key_fingerprint(record: EnrolmentRecord) -> str:
    """The fingerprint an operator compares before approving ``record``'s key."""
    return fingerprint_of(PublicKey(bytes.fromhex(record.public_key)))
