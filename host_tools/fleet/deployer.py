"""Send one bundle to one device over MQTT and follow it until it runs, or is refused.

The conversation (see :mod:`device_agent.agent` for the device's side)::

    host: deploy (offer: size, sha256, chunk size)      device: accepted (missing chunks)
    host: chunks (QoS 1, a bounded window in flight)
    host: transfer_end                                  device: need_chunks -> host resends
                                                        device: received, installed, metrics
                                                     or device: refused / failed (error)

The host hears the device's side through a :class:`~host_tools.fleet.conversation.Conversation`,
which the connection's :class:`~host_tools.fleet.router.Router` feeds. Every function here
takes an optional ``router``: threads that share one connection pass the same running
router and each run their own deploy; a call without one gets a router of its own.

Every command goes out signed (:class:`CommandAuthority`): the device obeys only commands
signed by keys its root authorises, addressed to it, unexpired and never seen before.
Ahead of each command the host sends its chain of signed roots; a device applies the
versions it lacks, so a key rotation reaches it before the first command that needs it.

The signed deploy command carries the manifest's facts (:class:`~edge_sdk.protocol.BundleFacts`:
runtime, expiry, content digest, unpacked size, target), so the device refuses a bundle it
cannot take before any chunk moves. :func:`deploy_and_record` checks first what the host
already knows (:func:`check_known_device`, on the registry brought up to date by the
device's retained status): a device that lacks the runtime, or already runs this version
or a newer one, is refused before anything is sent.

Timeouts are on by default: a device that never answers raises
:class:`~edge_sdk.errors.DeviceTimeoutError`; a refusal is returned as the device's own
error type rebuilt from its code.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from edge_sdk.bundle import Manifest, content_digest, file_sha256
from edge_sdk.bundle.admission import runtime_available
from edge_sdk.bundle.archive import BundleLimits, BundleReader
from edge_sdk.errors import (
    ConfigError,
    DeviceTimeoutError,
    EdgeError,
    RollbackError,
    TargetMismatchError,
    UntrustedInputError,
)
from edge_sdk.mqtt import MqttClient, PublishHandle
from edge_sdk.protocol import (
    BenchmarkSpec,
    BundleFacts,
    DeployCommand,
    DeviceStatus,
    DeviceTopics,
    Event,
    EventKind,
    Message,
    MetricsReport,
    RootUpdate,
    TransferEnd,
    TransferOffer,
    chunk_spans,
    encode,
    encode_chunk,
    sign_command,
)
from edge_sdk.trust import SigningKey
from host_tools.fleet.collector import record_message
from host_tools.fleet.conversation import TERMINAL_KINDS, Conversation, end_state, error_of
from host_tools.fleet.registry import DeploymentState, DeviceRecord, Registry
from host_tools.fleet.router import Router, gated, routed

__all__ = [
    "CommandAuthority",
    "DeployOptions",
    "DeployOutcome",
    "bundle_facts",
    "check_known_device",
    "deploy_and_record",
    "deploy_bundle",
    "publish_command",
    "read_manifest",
    "run_command",
    "send_bundle",
    "signed_fields",
    "transfer_command",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommandAuthority:
    """What the host signs commands with, and the roots it brings devices up to date with.

    Attributes:
        keys: private keys of the root's ``commands`` role (at least its threshold).
        root_chain: every signed root, version 1 first (see :class:`host_tools.keys.KeyRing`).
        ttl_s: lifetime of each command; devices refuse it after that and keep its nonce
            until then.
    """

    keys: tuple[SigningKey, ...]
    root_chain: tuple[bytes, ...] = ()
    ttl_s: float = 900.0

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigError("signing commands needs at least one command key")
        if not 0 < self.ttl_s <= 24 * 3600:
            raise ConfigError("command lifetime must be between 0 and 24 hours")


def publish_command(
    client: MqttClient, topics: DeviceTopics, command: Message, authority: CommandAuthority | None
) -> None:
    """Send the root chain, then ``command`` signed, to one device (in order, QoS 1).

    ``command`` must carry this device's id and an ``expires_at`` (see :func:`signed_fields`).

    Raises:
        ConfigError: no authority (commands cannot go out unsigned).
        TransportError: the broker connection failed.
    """
    if authority is None:
        raise ConfigError("commands must be signed: no command keys given (run `edgectl keys init`)")
    for doc in authority.root_chain:
        client.publish_wait(topics.cmd, encode(RootUpdate(json.loads(doc))))
    client.publish_wait(topics.cmd, encode(sign_command(command, authority.keys)))  # type: ignore[arg-type]


def signed_fields(device_id: str, authority: CommandAuthority | None, now: float) -> dict[str, object]:
    """The fields every signed command carries: addressee and expiry."""
    ttl = authority.ttl_s if authority is not None else 900.0
    return {"device_id": device_id, "expires_at": now + ttl}


@dataclass(frozen=True)
class DeployOptions:
    """How to send a bundle.

    Attributes:
        chunk_size: bytes per chunk message.
        window: chunks in flight before waiting for the broker's acknowledgements.
        accept_timeout_s: how long the device has to accept the offer.
        finish_timeout_s: how long it has to install and report after the last chunk.
        max_resend_rounds: rounds of resending missing chunks before giving up.
        benchmark: what the device should measure after installing.
        authority: keys that sign the command, and the root chain to send first.
        rollback: the signed command explicitly allows this bundle's version even if the
            device accepted a newer one (an intentional downgrade).
    """

    chunk_size: int = 64 * 1024
    window: int = 16
    accept_timeout_s: float = 15.0
    finish_timeout_s: float = 180.0
    max_resend_rounds: int = 5
    benchmark: BenchmarkSpec = field(default_factory=BenchmarkSpec)
    authority: CommandAuthority | None = None
    rollback: bool = False


@dataclass(frozen=True)
class DeployOutcome:
    """How a deploy ended.

    Attributes:
        device_id, bundle_name, bundle_version, sha256, transfer_id: what was sent where.
        state: ``installed``, ``deferred`` (the device's update gate said "not now"; it
            keeps the bundle and installs it later by itself), ``refused`` or ``failed``.
        error: the device's error when refused or failed (or the host's, when it refused
            before sending: ``detail`` then says ``{"refused_by": "host", "sent": False}``).
        detail: what the device said with its last event (e.g. the gate's reason).
        metrics: the device's report after installing.
        checks: the device's list of verification checks that passed.
        seconds: wall time of the whole deploy.
    """

    device_id: str
    bundle_name: str
    bundle_version: int
    sha256: str
    transfer_id: str
    state: DeploymentState
    error: EdgeError | None = None
    metrics: MetricsReport | None = None
    checks: tuple[str, ...] = ()
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


def read_manifest(bundle_path: Path) -> Manifest:
    """The manifest of a local bundle, parsed but not verified (the device verifies)."""
    with BundleReader(bundle_path, BundleLimits()) as reader:
        return Manifest.from_bytes(reader.manifest_bytes, BundleLimits().max_manifest_bytes)


def deploy_bundle(
    client: MqttClient,
    device_id: str,
    bundle_path: Path,
    options: DeployOptions = DeployOptions(),
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.time,
    *,
    claim: tuple[str, int] | None = None,
    router: Router | None = None,
) -> DeployOutcome:
    """Deploy a bundle file to a device and wait for the result.

    Args:
        client: a connected client.
        device_id: target device.
        bundle_path: the signed bundle.
        options: chunking, timeouts, benchmark.
        progress: called with (bytes sent, total bytes) as chunks are acknowledged.
        clock: wall clock for message timestamps.
        claim: the bundle name and version the signed command names, instead of reading
            them from the bundle (tests and the tamper benchmark send bundles whose
            manifest cannot be read, to see the device refuse them).
        router: the running router of ``client``, when other threads share the connection.

    Returns:
        The outcome; refusals are outcomes, not exceptions.

    Raises:
        DeviceTimeoutError: the device did not accept, receive or finish in time.
        TransportError: the broker connection failed while sending.
        BundleFormatError, ManifestError, StorageError: the local bundle is unusable.
    """
    started = time.monotonic()
    cmd = transfer_command(device_id, bundle_path, options, clock, rollback=options.rollback, claim=claim)
    return _deliver(client, device_id, cmd, bundle_path, options, progress, started, router)


def _deliver(
    client: MqttClient,
    device_id: str,
    cmd: DeployCommand,
    bundle_path: Path,
    options: DeployOptions,
    progress: Callable[[int, int], None] | None,
    started: float,
    router: Router | None,
    before_send: Callable[[DeviceStatus | None], None] | None = None,
) -> DeployOutcome:
    """Send a built deploy command and its bundle, and wait for the device's outcome.

    :func:`deploy_bundle` without reading the bundle's manifest and hash, which ``cmd``
    already carries (so :func:`deploy_and_record` reads them once for both uses).
    ``started`` is the :func:`time.monotonic` time the deploy began. ``before_send``, if
    given, is called once the conversation listens and before anything is published,
    with the device's status if the broker had one retained (heard within
    :data:`STATUS_WAIT_S`); it may raise to stop the deploy there.
    """
    with (
        routed(client, router) as live,
        Conversation.open(
            live, DeviceTopics(device_id), cmd.command_id, metrics=True, transfer_id=cmd.transfer.transfer_id
        ) as convo,
    ):
        if before_send is not None:
            before_send(_status_heard(convo, min(STATUS_WAIT_S, options.accept_timeout_s)))
        return _follow_deploy(client, convo, cmd, bundle_path, options, progress, started)


#: How long a deploy listens for the device's retained status before its host-side checks.
STATUS_WAIT_S = 1.0


def _status_heard(convo: Conversation, wait_s: float) -> DeviceStatus | None:
    """The device's status as the broker retained it, if it arrives within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while convo.last_status is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return convo.last_status


def _follow_deploy(
    client: MqttClient,
    convo: Conversation,
    cmd: DeployCommand,
    bundle_path: Path,
    options: DeployOptions,
    progress: Callable[[int, int], None] | None,
    started: float,
) -> DeployOutcome:
    """:func:`_deliver`'s work, once ``convo`` listens: send, then wait for the outcome and the report."""
    device_id = convo.topics.device_id

    def outcome(state: DeploymentState, **kw: object) -> DeployOutcome:
        return DeployOutcome(
            device_id,
            cmd.bundle_name,
            cmd.bundle_version,
            cmd.transfer.sha256,
            cmd.transfer.transfer_id,
            state,
            seconds=time.monotonic() - started,
            **kw,  # type: ignore[arg-type]
        )

    event = send_bundle(client, convo, cmd, bundle_path, options, progress, "deploy")
    checks: tuple[str, ...] = ()
    deadline = time.monotonic() + options.finish_timeout_s
    while event.kind != EventKind.INSTALLED:
        if event.kind in TERMINAL_KINDS:
            return outcome(end_state(event), error=error_of(event))
        if event.kind == EventKind.DEFERRED:
            return outcome("deferred", detail=dict(event.detail))
        nxt = convo.next(deadline)
        if nxt is None:
            raise DeviceTimeoutError(
                f"device {device_id} did not finish installing within {options.finish_timeout_s:g} s"
            )
        if isinstance(nxt, Event):
            event = nxt
    checks = tuple(event.detail.get("checks", ()))
    metrics = None
    while metrics is None:
        nxt = convo.next(deadline)
        if nxt is None:
            raise DeviceTimeoutError(f"device {device_id} installed the bundle but sent no metrics in time")
        if isinstance(nxt, MetricsReport):
            metrics = nxt
    return outcome("installed", metrics=metrics, checks=checks)


def transfer_command(
    device_id: str,
    bundle_path: Path,
    options: DeployOptions,
    clock: Callable[[], float],
    *,
    action: str = "install",
    rollback: bool = False,
    claim: tuple[str, int] | None = None,
) -> DeployCommand:
    """The transfer command for a bundle, not yet signed or sent.

    Shared by deploy and profile: reads the bundle's name and version (unless
    ``claim`` gives them) and its hash and size, and builds the offer and the command
    with its signed fields. :func:`send_bundle` signs and sends it, once a
    :class:`~host_tools.fleet.conversation.Conversation` listens for the answers.

    Args:
        device_id: target device.
        bundle_path: the signed bundle.
        options: chunk size, benchmark and the authority whose lifetime the command gets.
        clock: wall clock for the command's timestamp and expiry.
        action: ``install`` (deploy) or ``profile``.
        rollback: the command allows a version older than one the device accepted.
        claim: the bundle name and version to name instead of the manifest's.

    Returns:
        The command; its ``transfer`` holds the bundle's hash and size.

    Raises:
        BundleFormatError, ManifestError, StorageError: the local bundle is unusable.
    """
    manifest = None if claim else read_manifest(bundle_path)
    name, version = claim or _name_version(manifest)  # type: ignore[arg-type]  # read when there is no claim
    # An encrypted bundle's offer names its recipients: a device that is not one refuses before any chunk.
    recipients = manifest.encryption.keyids if manifest is not None and manifest.encryption is not None else ()
    digest, size = file_sha256(bundle_path)
    offer = TransferOffer(uuid.uuid4().hex, size, digest, options.chunk_size, encrypted_for=recipients)
    now = clock()
    return DeployCommand(
        uuid.uuid4().hex,
        name,
        version,
        offer,
        now,
        options.benchmark,
        action=action,
        rollback=rollback,
        bundle=None if manifest is None else bundle_facts(manifest),
        **signed_fields(device_id, options.authority, now),  # type: ignore[arg-type]
    )


def bundle_facts(manifest: Manifest) -> BundleFacts:
    """What the signed deploy command tells the device about the bundle, so it can check before the transfer.

    Args:
        manifest: the bundle's manifest (read, not verified: the device verifies it after
            receipt and refuses a bundle whose content is not the one named here).

    Returns:
        Runtime, expiry, content digest, unpacked size and target constraints.
    """
    target = manifest.target
    return BundleFacts(
        runtime=manifest.runtime,
        expires_at=manifest.expires_at,
        content=content_digest(manifest.files),
        unpacked_bytes=sum(f.size for f in manifest.files),
        arch=target.arch if target else (),
        min_memory_bytes=target.min_memory_bytes if target else 0,
        accelerators=target.accelerators if target else (),
    )


class _HostRefusal(Exception):
    """Carries a :func:`check_known_device` refusal out of the conversation, to become an outcome."""

    def __init__(self, error: UntrustedInputError) -> None:
        super().__init__(error.message)
        self.error = error


def check_known_device(device: DeviceRecord | None, cmd: DeployCommand, *, versions: bool = True) -> None:
    """Refuse a deploy the registry already shows the device would refuse, before anything is sent.

    Only what the device itself reported is used: the runtimes of its status, and the
    bundle it runs. A device the registry does not know, or a fact it did not report,
    is left to the device's own checks.

    Args:
        device: the registry's record of the target device, or None.
        cmd: the deploy command about to be signed and sent.
        versions: also check the version against the bundle the device runs (only with a
            record as fresh as the device's retained status: a rollback or remove since
            changes it).

    Raises:
        TargetMismatchError: the device reported its runtimes, and none runs the bundle's.
        RollbackError: the device runs this bundle at this version or a newer one, and the
            command is not an explicit ``rollback``.
    """
    if device is None:
        return
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(device.last_seen))
    seen = f"as device {device.device_id} last reported at {when}"
    facts = cmd.bundle
    if facts is not None and facts.runtime and device.runtimes is not None:
        have = sorted(device.runtimes)
        if not runtime_available(facts.runtime, have):
            raise TargetMismatchError(
                f"{cmd.bundle_name} v{cmd.bundle_version} needs runtime {facts.runtime}, which device "
                f"{device.device_id} lacks (it has {', '.join(have) or 'none'}, {seen}); nothing was sent",
                constraint="runtime",
                required=facts.runtime,
                actual=have,
            )
    active = next((b for b in device.active_bundles or () if b.name == cmd.bundle_name), None)
    if versions and active is not None and active.version >= cmd.bundle_version and not cmd.rollback:
        raise RollbackError(
            f"{cmd.bundle_name} v{cmd.bundle_version} is not newer than v{active.version}, which device "
            f"{device.device_id} runs ({seen}): the device would refuse it; nothing was sent "
            f"(deploy --rollback to go back on purpose)",
            offered=cmd.bundle_version,
            installed=active.version,
        )


def _known_device(registry: Registry, device_id: str, broker: str) -> DeviceRecord | None:
    """The registry's row of ``device_id`` as seen on ``broker``, else its row from before brokers were recorded."""
    return registry.get_device(device_id, broker) or registry.get_device(device_id, "")


def send_bundle(
    client: MqttClient,
    convo: Conversation,
    cmd: DeployCommand,
    bundle_path: Path,
    options: DeployOptions,
    progress: Callable[[int, int], None] | None,
    what: str,
) -> Event:
    """Publish a signed transfer command, then send the chunks the device asks for.

    Shared by deploy and profile, whose commands differ only in ``action``.

    Returns:
        The device's first event after the transfer that is not ``need_chunks``
        (``received``, ``installed``, ``deferred``...), or its refusal of the offer.

    Raises:
        DeviceTimeoutError: no answer in time, or chunks still missing after
            ``options.max_resend_rounds`` rounds.
    """
    device_id, topics, offer = convo.topics.device_id, convo.topics, cmd.transfer
    publish_command(client, topics, cmd, options.authority)
    accepted = convo.wait_for({EventKind.ACCEPTED}, options.accept_timeout_s, f"accept the {what}")
    if accepted.kind != EventKind.ACCEPTED:
        return accepted
    spans = chunk_spans(offer.size, offer.chunk_size)
    to_send = list(accepted.missing) if accepted.missing else list(range(len(spans)))
    sent_bytes = offer.size - sum(spans[i][1] for i in to_send)
    with open(bundle_path, "rb") as fh:
        for round_no in range(options.max_resend_rounds + 1):
            sent_bytes = _send_chunks(
                client, topics, offer, fh, spans, to_send, options.window, sent_bytes, offer.size, progress
            )
            client.publish_wait(topics.cmd, encode(TransferEnd(cmd.command_id, offer.transfer_id)))
            event = convo.wait_for(
                {EventKind.NEED_CHUNKS, EventKind.RECEIVED, EventKind.INSTALLED, EventKind.DEFERRED},
                options.finish_timeout_s,
                "receive the bundle",
            )
            if event.kind != EventKind.NEED_CHUNKS:
                return event
            to_send = list(event.missing)
            sent_bytes -= sum(spans[i][1] for i in to_send)
            log.info("device %s lacks %d chunk(s); resend round %d", device_id, len(to_send), round_no + 1)
    raise DeviceTimeoutError(
        f"device {device_id} still lacks chunks after {options.max_resend_rounds} resend rounds",
        device_id=device_id,
    )


def _name_version(manifest: Manifest) -> tuple[str, int]:
    return manifest.name, manifest.version


def _send_chunks(
    client: MqttClient,
    topics: DeviceTopics,
    offer: TransferOffer,
    fh: BinaryIO,
    spans: list[tuple[int, int]],
    indices: list[int],
    window: int,
    sent_bytes: int,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> int:
    in_flight: deque[tuple[PublishHandle, int]] = deque()

    def settle_one() -> int:
        handle, n = in_flight.popleft()
        handle.wait()
        return n

    for index in indices:
        offset, length = spans[index]
        fh.seek(offset)
        in_flight.append((client.publish(topics.data, encode_chunk(offer.transfer_id, index, fh.read(length))), length))
        if len(in_flight) >= window:
            sent_bytes += settle_one()
            if progress:
                progress(sent_bytes, total)
    while in_flight:
        sent_bytes += settle_one()
        if progress:
            progress(sent_bytes, total)
    return sent_bytes


def deploy_and_record(
    client: MqttClient,
    registry: Registry,
    device_id: str,
    bundle_path: Path,
    options: DeployOptions = DeployOptions(),
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.time,
    *,
    router: Router | None = None,
) -> DeployOutcome:
    """:func:`deploy_bundle`, with the deployment and its metrics recorded in the registry.

    First :func:`check_known_device` refuses, before anything is sent, a deploy the
    registry shows the device would refuse: a runtime it lacks at once, and a version not
    newer than the one it runs once its retained status (if the broker has one) has
    brought the registry up to date. Such a refusal is an outcome like the device's own
    (``refused``, recorded, ``detail`` ``{"refused_by": "host", "sent": False}``). A deploy
    that raises (timeout, broker lost) is recorded as ``failed`` before the error
    propagates. ``router`` is as for :func:`deploy_bundle`.

    Raises:
        DeviceTimeoutError, TransportError, BundleFormatError, ManifestError, StorageError:
            as for :func:`deploy_bundle`.
    """
    started = time.monotonic()
    cmd = transfer_command(device_id, bundle_path, options, clock, rollback=options.rollback)
    recorded: list[int] = []

    def record() -> int:
        recorded.append(
            registry.record_deployment(
                device_id, cmd.bundle_name, cmd.bundle_version, cmd.transfer.sha256, started_at=clock()
            )
        )
        return recorded[-1]

    broker = str(client.address)

    def before_send(heard: DeviceStatus | None) -> None:
        # The retained status is fresher than the registry (a rollback or remove since
        # changed what runs): record it, then check against the registry's fresh record.
        if heard is not None:
            record_message(registry, heard, clock(), broker)
        try:
            check_known_device(_known_device(registry, device_id, broker), cmd)
        except UntrustedInputError as exc:
            raise _HostRefusal(exc) from exc
        record()

    try:
        try:
            # before touching the broker: what the registry knows of this device on this broker
            check_known_device(_known_device(registry, device_id, broker), cmd, versions=False)
        except UntrustedInputError as exc:
            raise _HostRefusal(exc) from exc
        with gated(client, registry, router) as live:  # only enrolled devices' signed answers count
            outcome = _deliver(client, device_id, cmd, bundle_path, options, progress, started, live, before_send)
    except _HostRefusal as stop:
        refusal = stop.error
        registry.update_deployment(record(), "refused", refusal.code, refusal.message, finished_at=clock())
        log.info("refused %s v%s for %s before sending: %s", cmd.bundle_name, cmd.bundle_version, device_id, refusal)
        return DeployOutcome(
            device_id,
            cmd.bundle_name,
            cmd.bundle_version,
            cmd.transfer.sha256,
            cmd.transfer.transfer_id,
            "refused",
            error=refusal,
            seconds=time.monotonic() - started,
            detail={"refused_by": "host", "sent": False},
        )
    except EdgeError as exc:
        if recorded:
            registry.update_deployment(recorded[0], "failed", exc.code, exc.message, finished_at=clock())
        raise
    dep_id = recorded[0]
    err = outcome.error
    registry.update_deployment(
        dep_id, outcome.state, err.code if err else None, err.message if err else None, finished_at=clock()
    )
    if outcome.metrics is not None:
        record_message(registry, outcome.metrics, clock())
    return outcome


def run_command(
    client: MqttClient,
    device_id: str,
    make_command: Callable[[str, dict[str, object]], Message],
    authority: CommandAuthority,
    timeout_s: float = 30.0,
    *,
    router: Router | None = None,
) -> Event:
    """Send a rollback or remove command and wait for the device's answer.

    Args:
        client: a connected client.
        device_id: target device.
        make_command: builds the command from a fresh command id and the signed fields
            (``device_id``, ``expires_at``) plus ``ts``.
        authority: signs it.
        timeout_s: how long the device has to answer.
        router: the running router of ``client``, when other threads share the connection.

    Returns:
        The device's ``done``, ``refused`` or ``error`` event.

    Raises:
        DeviceTimeoutError: no answer in time.
    """
    topics = DeviceTopics(device_id)
    command_id = uuid.uuid4().hex
    now = time.time()
    cmd = make_command(command_id, {"ts": now, **signed_fields(device_id, authority, now)})
    with routed(client, router) as live, Conversation.open(live, topics, command_id, metrics=False) as convo:
        publish_command(client, topics, cmd, authority)
        return convo.wait_for({EventKind.DONE}, timeout_s, f"answer the {cmd.TYPE} command")
