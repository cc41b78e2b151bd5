"""Wire messages: frozen dataclasses with a schema version, validated on construction.

Every JSON message carries ``schema`` (this module's :data:`SCHEMA_VERSION`) and
``type``. Fields this build does not know are kept in ``extra`` (so a newer peer's
message survives a round trip) and never acted on. A message with a newer *major*
schema is refused by the codec rather than half-understood.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from edge_sdk.errors import ConfigError, MessageError
from edge_sdk.metrics._cpu import CpuMeasurement
from edge_sdk.metrics._execution import ExecutionChoice
from edge_sdk.metrics._latency import LatencyStats
from edge_sdk.metrics._memory import ModelMemory
from edge_sdk.metrics._power import PowerMeasurement
from edge_sdk.metrics._thermal import ThermalReading
from edge_sdk.protocol.labels import check_labels
from edge_sdk.protocol.topics import check_device_id

__all__ = [
    "DEPLOY_ACTIONS",
    "MESSAGE_TYPES",
    "PERIODIC_MODE",
    "SCHEMA_VERSION",
    "BenchmarkSpec",
    "BundleFacts",
    "DeltaOffer",
    "DeployCommand",
    "DeviceStatus",
    "ErrorInfo",
    "Event",
    "EventKind",
    "Heartbeat",
    "Message",
    "MetricsReport",
    "RemoveCommand",
    "RollbackCommand",
    "RootUpdate",
    "SignedCommand",
    "SignedReport",
    "TransferEnd",
    "TransferOffer",
]

SCHEMA_VERSION = 1
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
#: Most chunks in one transfer (edge_sdk.protocol.transfer.MAX_CHUNKS: the chunk index fits one 1 MiB frame).
_MAX_CHUNKS = 1 << 15
_MAX_SEQ = (1 << 53) - 1


def _check_device_id(device_id: str, where: str) -> None:
    try:
        check_device_id(device_id)
    except ConfigError as exc:
        raise MessageError(f"{where}: {exc.message}") from exc


def _check_id(value: str, name: str) -> None:
    """Command and transfer ids are 32 lowercase hex digits."""
    if not _ID_RE.fullmatch(value):
        raise MessageError(f"{name} must be 32 lowercase hex digits")


Checker = Callable[[Any, str], Any]


def _check_str(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        raise MessageError(f"{where} must be a str")
    return value


def _check_float(value: Any, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MessageError(f"{where} must be a number")
    return float(value)


def _check_int(value: Any, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError(f"{where} must be an integer")
    return value


def _check_bool(value: Any, where: str) -> Any:
    if not isinstance(value, bool):
        raise MessageError(f"{where} must be a bool")
    return value


def _check_dict(value: Any, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise MessageError(f"{where} must be an object")
    return dict(value)


def _check_any(value: Any, where: str) -> Any:
    return value


_SIMPLE: dict[Any, Checker] = {
    str: _check_str,
    float: _check_float,
    int: _check_int,
    bool: _check_bool,
    dict: _check_dict,
    Any: _check_any,
}


def _checker(hint: Any) -> Checker:
    """A function that checks a value against a simple type hint (and converts nested dataclasses from dicts).

    Built once per field type: resolving a hint on every decode was most of the cost of
    decoding a device report.
    """
    simple = _SIMPLE.get(hint)
    if simple is not None:
        return simple
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        optional = type(None) in args
        inner = _checker(next(a for a in args if a is not type(None)))

        def check_union(value: Any, where: str) -> Any:
            if value is None and optional:
                return None
            return inner(value, where)

        return check_union
    if dataclasses.is_dataclass(hint):
        from_dict = typing.cast(Any, hint).from_dict  # every nested wire dataclass has from_dict

        def check_nested(value: Any, where: str) -> Any:
            if not isinstance(value, Mapping):
                raise MessageError(f"{where} must be an object")
            return from_dict(value)

        return check_nested
    if origin is tuple:
        item = _checker(typing.get_args(hint)[0])

        def check_tuple(value: Any, where: str) -> Any:
            if not isinstance(value, (list, tuple)):
                raise MessageError(f"{where} must be a list")
            return tuple(item(v, f"{where}[]") for v in value)

        return check_tuple
    if origin is dict:
        return _check_dict
    raise TypeError(f"unsupported field type {hint!r}")  # a bug in this module, not input


#: Per wire class: (name, checker, required) of each field but ``extra``, the names, and whether it has ``extra``.
_FIELDS: dict[type, tuple[tuple[tuple[str, Checker, bool], ...], frozenset[str], bool]] = {}


def _fields(cls: type) -> tuple[tuple[tuple[str, Checker, bool], ...], frozenset[str], bool]:
    """A wire class's fields with a checker for each, computed once per class."""
    known = _FIELDS.get(cls)
    if known is None:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        plain = tuple(
            (
                f.name,
                _checker(hints[f.name]),
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in fields
            if f.name != "extra"
        )
        names = frozenset(name for name, _check, _required in plain) | {"schema", "type"}
        known = _FIELDS[cls] = (plain, names, any(f.name == "extra" for f in fields))
    return known


#: Per wire class: the names of its fields but ``extra``, in order (for ``to_dict``).
_NAMES: dict[type, tuple[str, ...]] = {}


class _Wire:
    """Mixin: generic ``from_dict``/``to_dict`` driven by the dataclass fields."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        plain, names, has_extra = _fields(cls)
        kwargs: dict[str, Any] = {}
        for name, check, required in plain:
            if name in d:
                kwargs[name] = check(d[name], f"{cls.__name__}.{name}")
            elif required:
                raise MessageError(f"{cls.__name__}: missing field {name!r}")
        if has_extra:
            kwargs["extra"] = {k: v for k, v in d.items() if k not in names}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        names = _NAMES.get(type(self))
        if names is None:  # once per class
            fields = dataclasses.fields(self)  # type: ignore[arg-type]  # the mixin is used on dataclasses only
            names = _NAMES[type(self)] = tuple(f.name for f in fields if f.name != "extra")
        out: dict[str, Any] = {}
        for name in names:
            value = getattr(self, name)
            if hasattr(type(value), "__dataclass_fields__"):  # dataclasses.is_dataclass, for an instance
                value = value.to_dict()  # every nested wire dataclass has to_dict
            elif isinstance(value, tuple):
                value = [v.to_dict() if hasattr(type(v), "__dataclass_fields__") else v for v in value]
            out[name] = value
        extra = getattr(self, "extra", None)
        if extra:
            return {**extra, **out}
        return out


@dataclass(frozen=True)
class TransferOffer(_Wire):
    """What the host is about to send: the device enforces these numbers while receiving.

    ``transfer_id`` is derived from the content (:func:`edge_sdk.protocol.content_transfer_id`),
    so the same file is always the same transfer. ``chunks_sha256`` is the sha256 of the chunk
    index (the sha256 of every chunk, in order): signed with the command, it is what lets a
    device check each chunk as it arrives (:class:`edge_sdk.protocol.ChunkIndex`).

    ``encrypted_for`` lists the recipient key ids of an encrypted bundle (from its
    manifest), so that a device that is not one refuses before any chunk moves; empty
    (and absent from the wire) for a plain bundle.
    """

    transfer_id: str
    size: int
    sha256: str
    chunk_size: int
    chunks_sha256: str
    encrypted_for: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_id(self.transfer_id, "transfer_id")
        if self.size < 1:
            raise MessageError("transfer size must be positive")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise MessageError("transfer sha256 must be 64 lowercase hex digits")
        if not re.fullmatch(r"[0-9a-f]{64}", self.chunks_sha256):
            raise MessageError("transfer chunks_sha256 must be 64 lowercase hex digits")
        if not 1024 <= self.chunk_size <= 1 << 20:
            raise MessageError("chunk_size must be between 1 KiB and 1 MiB")
        if self.chunk_count > _MAX_CHUNKS:
            raise MessageError(f"transfer of {self.chunk_count} chunks exceeds {_MAX_CHUNKS}")
        if len(self.encrypted_for) > 256 or not all(re.fullmatch(r"[0-9a-f]{32}", k) for k in self.encrypted_for):
            raise MessageError("encrypted_for must list at most 256 key ids of 32 lowercase hex digits")

    def to_dict(self) -> dict[str, Any]:
        """The wire form; ``encrypted_for`` only for an encrypted bundle (plain offers are unchanged)."""
        out = super().to_dict()
        if not self.encrypted_for:
            del out["encrypted_for"]
        return out

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)


@dataclass(frozen=True)
class BenchmarkSpec(_Wire):
    """How the device should benchmark the model after installing it."""

    runs: int = 200
    warmup: int = 20
    threads: int = 1
    min_duration_s: float = 0.0

    def __post_init__(self) -> None:
        if not (1 <= self.runs <= 100_000 and 0 <= self.warmup <= 10_000 and 1 <= self.threads <= 256):
            raise MessageError("benchmark runs/warmup/threads out of range")
        if not 0 <= self.min_duration_s <= 600:
            raise MessageError("benchmark min_duration_s out of range")


@dataclass(frozen=True)
class ErrorInfo(_Wire):
    """An :class:`~edge_sdk.errors.EdgeError` as reported over the wire."""

    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


class Message(_Wire):
    """Base of every JSON message; ``TYPE`` is the wire ``type``."""

    TYPE: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        # schema and type last: an ``extra`` field may never override them.
        return {**self.to_dict(), "schema": SCHEMA_VERSION, "type": self.TYPE}


@dataclass(frozen=True)
class DeviceStatus(Message):
    """Birth (``online``, retained) and last will (``offline``, retained) of an agent.

    ``public_key`` is the device's own Ed25519 key (64 hex digits), so an operator sees a
    device waiting for enrolment and its fingerprint; ``will_seq`` is the sequence number
    this agent's last will was signed with (the host accepts that one number after later
    ones, see :mod:`edge_sdk.protocol.reports`).
    """

    TYPE: ClassVar[str] = "status"
    device_id: str
    state: str
    ts: float
    agent_version: str = ""
    platform: dict[str, Any] = field(default_factory=dict)
    runtimes: dict[str, Any] = field(default_factory=dict)
    active: dict[str, Any] | None = None
    public_key: str = ""
    will_seq: int = 0
    labels: dict[str, Any] | None = None
    heartbeat_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_device_id(self.device_id, "status")
        if self.state not in ("online", "offline"):
            raise MessageError(f"status state must be online or offline, got {self.state!r}")
        if self.public_key and not re.fullmatch(r"[0-9a-f]{64}", self.public_key):
            raise MessageError("status public_key must be 64 lowercase hex digits")
        if not 0 <= self.will_seq <= _MAX_SEQ:
            raise MessageError("status will_seq out of range")
        if self.labels is not None:
            try:
                object.__setattr__(self, "labels", check_labels(self.labels))
            except ConfigError as exc:
                raise MessageError(f"status labels: {exc.message}") from exc
        _check_heartbeat_s(self.heartbeat_s, "status", allow_none=True)

    def to_dict(self) -> dict[str, Any]:
        """The wire form; ``labels`` and ``heartbeat_s`` only when given (older statuses are unchanged)."""
        out = super().to_dict()
        if self.labels is None:
            del out["labels"]
        if not self.heartbeat_s:
            del out["heartbeat_s"]
        return out


#: Longest heartbeat interval a device may announce (a day).
MAX_HEARTBEAT_S = 86400.0


def _check_heartbeat_s(value: float, where: str, *, allow_none: bool = False) -> None:
    """A heartbeat interval: 1 s to a day; 0 means "sends none" where ``allow_none``."""
    if allow_none and value == 0:
        return
    if not 1.0 <= value <= MAX_HEARTBEAT_S:
        raise MessageError(f"{where} heartbeat_s must be between 1 and {MAX_HEARTBEAT_S:g} seconds, got {value!r}")


@dataclass(frozen=True)
class Heartbeat(Message):
    """Device -> host: "still here", every ``heartbeat_s`` seconds, never retained.

    Small on purpose (a device sends one a minute, forever). The host keeps when it last
    heard one and the interval it names, and lists a device it has not heard from within
    a few intervals as ``stale``.
    """

    TYPE: ClassVar[str] = "heartbeat"
    device_id: str
    ts: float
    heartbeat_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_device_id(self.device_id, "heartbeat")
        _check_heartbeat_s(self.heartbeat_s, "heartbeat")


_HEX64 = re.compile(r"[0-9a-f]{64}")
_TARGET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")


@dataclass(frozen=True)
class BundleFacts(_Wire):
    """What the host read from a bundle's manifest, offered in the signed deploy command.

    With these the device runs every check that needs no byte of the bundle (version
    against its floor and the content a version ran with, expiry, runtime, target,
    storage) before any chunk moves; see :mod:`edge_sdk.bundle.admission`. After receipt
    the device verifies the bundle's own signed manifest as always, and the manifest's
    content must be the one named here: a wrong fact can make a device refuse early,
    never accept. Every field is optional ("" / 0 / None: not said).

    Attributes:
        runtime: the manifest's runtime.
        expires_at: the manifest's expiry (unix seconds).
        content: :func:`edge_sdk.bundle.content_digest` of the manifest's file list.
        unpacked_bytes: the manifest's file sizes summed (what unpacking writes).
        arch, min_memory_bytes, accelerators: the manifest's target constraints.
    """

    runtime: str = ""
    expires_at: float = 0.0
    content: str = ""
    unpacked_bytes: int = 0
    arch: tuple[str, ...] = ()
    min_memory_bytes: int = 0
    accelerators: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.content and not _HEX64.fullmatch(self.content):
            raise MessageError("bundle content must be 64 lowercase hex digits")
        if self.unpacked_bytes < 0 or self.min_memory_bytes < 0 or self.expires_at < 0:
            raise MessageError("bundle sizes and expiry must not be negative")
        if len(self.runtime) > 32 or len(self.arch) > 16 or len(self.accelerators) > 16:
            raise MessageError("bundle facts too long")
        for name in (*self.arch, *self.accelerators):
            if not _TARGET_NAME.fullmatch(name):
                raise MessageError(f"bad architecture or accelerator name {name!r}")


@dataclass(frozen=True)
class DeltaOffer(_Wire):
    """A delta a device may take instead of the whole bundle, offered in the signed deploy command.

    A device that runs exactly the base named here (its active slot of the command's
    bundle has ``base_version`` and the content ``base_content``) receives the delta
    file (``transfer``: an offer of its own, content-named like any other) and rebuilds
    the bundle from its slot (:mod:`edge_sdk.bundle.delta`). The rebuilt file must be the
    one the command's own ``transfer`` names (size and sha256), and is then verified in
    full as always: a delta adds no trust. Any other device, or one whose rebuild fails,
    takes the command's full transfer instead; so does an agent that does not know this
    field (it keeps it in ``extra``).

    Attributes:
        transfer: the delta file's offer (never encrypted: no delta is built for an
            encrypted bundle).
        base_version: the installed version the delta starts from.
        base_content: :func:`edge_sdk.bundle.content_digest` of that version's manifest files.
    """

    transfer: TransferOffer
    base_version: int
    base_content: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.base_version < 1:
            raise MessageError("delta base_version must be a positive integer")
        if not _HEX64.fullmatch(self.base_content):
            raise MessageError("delta base_content must be 64 lowercase hex digits")
        if self.transfer.encrypted_for:
            raise MessageError("a delta is never offered for an encrypted bundle")


#: What a device does with a received bundle: install it (the default), or only
#: benchmark it in a scratch directory without activating it.
DEPLOY_ACTIONS = ("install", "profile")


@dataclass(frozen=True)
class DeployCommand(Message):
    """Host -> device: receive this bundle, then install it and benchmark it.

    With ``action="profile"`` the device verifies the bundle, benchmarks it from a
    scratch directory, reports, and removes it: what is active does not change.

    ``bundle`` (optional; absent from older hosts' commands, and from the
    wire when None) carries the manifest's facts so that the device checks before any
    chunk moves (:class:`BundleFacts`); without it the device checks after receipt.

    ``delta`` (optional, absent from the wire when None) offers a delta from an installed
    version instead of the whole bundle (:class:`DeltaOffer`); the device chooses. Its
    transfer is another file than ``transfer``, so it has another transfer id.
    """

    TYPE: ClassVar[str] = "deploy"
    command_id: str
    bundle_name: str
    bundle_version: int
    transfer: TransferOffer
    ts: float
    benchmark: BenchmarkSpec = field(default_factory=BenchmarkSpec)
    action: str = "install"
    device_id: str = ""
    expires_at: float = 0.0
    rollback: bool = False
    bundle: BundleFacts | None = None
    delta: DeltaOffer | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id(self.command_id, "command_id")
        if self.action not in DEPLOY_ACTIONS:
            raise MessageError(f"deploy action must be one of {', '.join(DEPLOY_ACTIONS)}, got {self.action!r}")
        if self.delta is not None and self.delta.transfer.transfer_id == self.transfer.transfer_id:
            raise MessageError("a delta's transfer must be another transfer than the bundle's")

    def offer_named(self, transfer_id: str) -> TransferOffer | None:
        """The offer ``transfer_id`` names: the bundle's, or the delta's; None if neither."""
        if self.transfer.transfer_id == transfer_id:
            return self.transfer
        if self.delta is not None and self.delta.transfer.transfer_id == transfer_id:
            return self.delta.transfer
        return None

    def to_dict(self) -> dict[str, Any]:
        """The wire form; ``bundle`` and ``delta`` only when there is one (older agents' commands are unchanged)."""
        out = super().to_dict()
        for name in ("bundle", "delta"):
            if out[name] is None:
                del out[name]
        return out


@dataclass(frozen=True)
class RollbackCommand(Message):
    """Host -> device: make the version kept on the device active again.

    The device goes back only to the version it kept as ``previous`` and only when the
    command names it; this is the explicit, signed exception to rollback protection.
    (To go back to an older version the device no longer has, deploy its bundle with
    ``rollback=True``.) Fields as in :class:`DeployCommand`: ``command_id`` is the nonce,
    ``ts`` the issue time.
    """

    TYPE: ClassVar[str] = "rollback"
    command_id: str
    bundle_name: str
    bundle_version: int
    ts: float
    device_id: str = ""
    expires_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id(self.command_id, "command_id")
        if self.bundle_version < 1:
            raise MessageError("bundle_version must be positive")


@dataclass(frozen=True)
class RemoveCommand(Message):
    """Host -> device: stop running a bundle and delete its slots (rollback protection stays)."""

    TYPE: ClassVar[str] = "remove"
    command_id: str
    bundle_name: str
    ts: float
    device_id: str = ""
    expires_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id(self.command_id, "command_id")


@dataclass(frozen=True)
class SignedCommand(Message):
    """A command that changes what runs on a device, with signatures over its exact bytes.

    ``command`` is the JSON text of a :class:`DeployCommand`, :class:`RollbackCommand` or
    :class:`RemoveCommand` exactly as signed; ``signatures`` is the envelope of
    :mod:`edge_sdk.trust` (``{"keyid", "sig"}`` objects). Verification lives in
    :mod:`edge_sdk.protocol.commands`.
    """

    TYPE: ClassVar[str] = "signed_command"
    command: str
    signatures: tuple[dict[str, Any], ...]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SignedReport(Message):
    """Device -> host: a status, event or metrics report signed by the device's own key.

    ``message`` is the inner message's exact JSON text; ``seq`` its place in the device's
    sequence, ``ts`` the device's time, ``keyid`` and ``sig`` (base64) the signature of
    :func:`edge_sdk.trust.device.signed_device_bytes`. Sealing and opening live in
    :mod:`edge_sdk.protocol.reports`.
    """

    TYPE: ClassVar[str] = "signed_report"
    device_id: str
    seq: int
    ts: float
    message: str
    keyid: str
    sig: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_device_id(self.device_id, "signed report")
        if not 0 <= self.seq <= _MAX_SEQ:
            raise MessageError("signed report seq out of range")
        if not _ID_RE.fullmatch(self.keyid):
            raise MessageError("signed report keyid must be 32 lowercase hex digits")
        if len(self.sig) > 128:
            raise MessageError("signed report signature too long")


@dataclass(frozen=True)
class RootUpdate(Message):
    """Host -> device: the next root of trust (a signed root document as a JSON object).

    Needs no command signature: the root carries its own threshold signatures by the
    current and the new root keys, and its version must be exactly the next one, so a
    replayed or forged update changes nothing.
    """

    TYPE: ClassVar[str] = "root_update"
    root: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TransferEnd(Message):
    """Host -> device: every chunk has been sent once; tell me what is missing."""

    TYPE: ClassVar[str] = "transfer_end"
    command_id: str
    transfer_id: str
    extra: dict[str, Any] = field(default_factory=dict)


class EventKind:
    ACCEPTED = "accepted"  # offer accepted; `missing_ranges` lists chunks still needed (resume)
    NEED_CHUNKS = "need_chunks"  # after transfer_end, or after a restart: these chunks are still missing
    PROGRESS = "progress"  # detail.have: chunks held now (paces the host's sending)
    RECEIVED = "received"  # whole file received, every chunk matching the signed index
    INSTALLED = "installed"  # verified, installed, health-checked, active
    REFUSED = "refused"  # bad input: nothing installed (error says why)
    FAILED = "failed"  # local failure on the device (error says why)
    ERROR = "error"  # a message the agent could not act on
    DEFERRED = "deferred"  # received, but the update gate says "not now"; retried later
    PROFILED = "profiled"  # profile-only: benchmarked and removed, nothing activated
    DROPPED = "dropped"  # the offline buffer was full; detail.count messages were lost
    DONE = "done"  # a rollback, remove or root update was carried out (detail says what)
    ALL = (
        ACCEPTED, NEED_CHUNKS, PROGRESS, RECEIVED, INSTALLED, REFUSED, FAILED, ERROR, DEFERRED, PROFILED, DROPPED, DONE,
    )  # fmt: skip


@dataclass(frozen=True)
class Event(Message):
    """Device -> host: what happened to a command."""

    TYPE: ClassVar[str] = "event"
    device_id: str
    kind: str
    ts: float
    command_id: str = ""
    transfer_id: str = ""
    missing_ranges: str = ""
    error: ErrorInfo | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_device_id(self.device_id, "event")
        if self.kind not in EventKind.ALL:
            raise MessageError(f"unknown event kind {self.kind!r}")
        if len(self.missing_ranges) > 8192:
            raise MessageError("event missing_ranges longer than 8192 characters")


#: The measurements of a report that are JSON objects; ``{}`` on the wire means "not measured".
_MEASUREMENTS = ("latency", "memory", "cpu", "power")

#: ``MetricsReport.extra["mode"]`` of a report a device measured on its own schedule
#: (``metrics_every_s``), not after an install.
PERIODIC_MODE = "periodic"


@dataclass(frozen=True)
class MetricsReport(Message):
    """Device -> host: how a bundle ran on the device.

    The measurements are typed (:mod:`edge_sdk.metrics`); one that was not measured is
    ``None`` here and ``{}`` on the wire, as it always was. ``power`` always says whether
    it is ``estimated``. ``execution`` is the choice made for a sparse bundle, on the wire
    only when there is one. ``arch`` is the machine the measurements were taken on
    (``aarch64``...) and ``emulated`` says that they were taken under a user-mode
    emulator (qemu-user), so latency and throughput are the emulator's, not the
    device's; both are on the wire only when set. ``schema`` is the message schema the report was written in
    (:data:`SCHEMA_VERSION` for reports built here); :meth:`to_dict` leaves it out and
    :meth:`~Message.to_wire` writes it, as for every message.

    Raises:
        MessageError: a bad device id, or a schema this build does not know.
    """

    TYPE: ClassVar[str] = "metrics"
    device_id: str
    bundle_name: str
    bundle_version: int
    runtime: str
    precision: str
    ts: float
    command_id: str = ""
    threads: int = 1
    providers: tuple[str, ...] = ()
    latency: LatencyStats | None = None
    memory: ModelMemory | None = None
    cpu: CpuMeasurement | None = None
    power: PowerMeasurement | None = None
    temperature: tuple[ThermalReading, ...] = ()
    execution: ExecutionChoice | None = None
    arch: str = ""
    emulated: bool = False
    schema: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_device_id(self.device_id, "metrics")
        if not 1 <= self.schema <= SCHEMA_VERSION:
            raise MessageError(
                f"metrics report schema {self.schema} is not supported (this build speaks {SCHEMA_VERSION})"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetricsReport:
        """Read a report as devices send it, today's and older agents' alike.

        Args:
            d: the JSON object (``schema`` and ``type`` may be in it).

        Returns:
            The report; unknown fields are kept in ``extra``.

        Raises:
            MessageError: a field is missing or malformed; the message names it.
        """
        body = dict(d)
        for name in _MEASUREMENTS:
            if isinstance(body.get(name), Mapping) and not body[name]:
                body[name] = None
        report: MetricsReport = super().from_dict(body)
        return report

    @property
    def periodic(self) -> bool:
        """Measured on the device's own schedule (``extra["mode"]`` is :data:`PERIODIC_MODE`),
        not as the profile after an install."""
        return self.extra.get("mode") == PERIODIC_MODE

    def to_dict(self) -> dict[str, Any]:
        """The JSON form devices have always sent: ``{}`` for a measurement not taken, no ``schema``."""
        out = super().to_dict()
        for name in _MEASUREMENTS:
            if out[name] is None:
                out[name] = {}
        if out["execution"] is None:
            del out["execution"]
        for name, unset in (("arch", ""), ("emulated", False)):  # on the wire only when known
            if out[name] == unset:
                del out[name]
        del out["schema"]
        return out


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        DeviceStatus,
        DeployCommand,
        RollbackCommand,
        RemoveCommand,
        SignedCommand,
        RootUpdate,
        TransferEnd,
        Event,
        MetricsReport,
        SignedReport,
        Heartbeat,
    )
}
