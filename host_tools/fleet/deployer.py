"""Send one bundle to one device or many over MQTT and follow each until it runs, or is refused.

The conversation (see :mod:`device_agent.agent` for the device's side, and
:mod:`edge_sdk.protocol.transfer` for the transfer)::

    host: deploy (offer: size, sha256, chunk size,      device: accepted (missing ranges)
          chunk index hash), signed for each device
    host: index + chunks once on the transfer topic     device: progress (paces the host)
    host: transfer_end                                  device: need_chunks -> host sends them
                                                        device: received, installed, metrics
                                                     or device: refused / failed (error)

:func:`deploy_many` (``edgectl deploy --device A --device B ...``) sends one signed command
to each device and the bundle once (:class:`~host_tools.fleet.delivery.TransferRun`), over
one connection, and returns one outcome per device. :func:`deploy_bundle` is the same for
one device without the registry.

Deltas (``DeployOptions.deltas``): :func:`deploy_many` keeps every bundle it sends in the
host's bundle store, and offers a device that runs an older version whose bundle the host
has a delta from it besides the whole bundle (:mod:`host_tools.fleet.delta_offers` decides
who gets which; one delta is built per distinct base). The delta goes out first, in a run
of its own, to the devices offered it; then the bundle, to the others and to every device
that took the full transfer after all (its base did not match, or rebuilding failed: the
device decides, see :mod:`device_agent.deltas`). Each outcome says how the bundle
travelled (:class:`Delivery`)::

    devices offered a delta    delta run  ->  received (rebuilt)  -> install as always
                                          ->  accepted the full transfer instead --+
    the others                 full run   <------------------------------------------+

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

import dataclasses
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_sdk.bundle import Manifest, content_digest
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
from edge_sdk.mqtt import MqttClient
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
    encode,
    sign_command,
)
from edge_sdk.trust import SigningKey
from host_tools.fleet.collector import record_messages
from host_tools.fleet.conversation import TERMINAL_KINDS, Conversation, FleetConversation, end_state, error_of
from host_tools.fleet.delivery import Inbound, PreparedFile, TransferResult, TransferRun, prepare_file
from host_tools.fleet.delta_offers import (
    DeltaSettings,
    PreparedDelta,
    base_of,
    explicit_base,
    keep_bundle,
    offer_deltas,
)
from host_tools.fleet.registry import DeploymentState, DeviceRecord, Registry
from host_tools.fleet.router import Router, gated, routed

__all__ = [
    "CommandAuthority",
    "Delivery",
    "DeployOptions",
    "DeployOutcome",
    "already_runs",
    "bundle_facts",
    "check_known_device",
    "deploy_and_record",
    "deploy_bundle",
    "deploy_many",
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
        chunk_size: bytes per chunk message (doubled for files of more than 32,768 chunks).
        window: chunks in flight beyond what each receiving device has acknowledged (and
            publishes awaiting the broker's acknowledgement); keep it below the broker's
            per-client queue (Mosquitto's ``max_queued_messages``).
        accept_timeout_s: how long a device has to accept the offer.
        finish_timeout_s: how long a device may stay silent while receiving, and how long it
            has to install and report after the last chunk.
        max_resend_rounds: rounds of repairs a device may ask for before it is given up.
        stall_s: a device silent this long with chunks in flight stops pacing the others.
        reconnect_timeout_s: how long to wait for a lost broker connection to come back.
        rate_bytes_per_s: cap on the bytes of chunks one transfer sends per second
            (broadcast and repairs together), for metered links; None: as fast as the
            devices acknowledge.
        benchmark: what the device should measure after installing.
        authority: keys that sign the command, and the root chain to send first.
        rollback: the signed command explicitly allows this bundle's version even if the
            device accepted a newer one (an intentional downgrade).
        deltas: the bundle store, and deltas to devices that run an older version
            (:func:`deploy_many` only); None: neither.
    """

    chunk_size: int = 64 * 1024
    window: int = 64
    accept_timeout_s: float = 15.0
    finish_timeout_s: float = 180.0
    max_resend_rounds: int = 8
    stall_s: float = 10.0
    reconnect_timeout_s: float = 60.0
    rate_bytes_per_s: float | None = None
    benchmark: BenchmarkSpec = field(default_factory=BenchmarkSpec)
    authority: CommandAuthority | None = None
    rollback: bool = False
    deltas: DeltaSettings | None = None

    def __post_init__(self) -> None:
        if self.rate_bytes_per_s is not None and not self.rate_bytes_per_s > 0:
            raise ConfigError(f"a transfer rate must be more than 0 bytes/s, not {self.rate_bytes_per_s!r}")
        if self.window < 1 or self.stall_s <= 0 or self.max_resend_rounds < 0:
            raise ConfigError("window, stall time and repair rounds must be positive")


@dataclass(frozen=True)
class Delivery:
    """How the bundle travelled to one device.

    Attributes:
        method: ``delta`` (the device received the delta and rebuilt the bundle from its
            installed version) or ``full`` (the bundle file itself).
        full_bytes: the bundle file's size.
        delta_bytes: the size of the delta offered to the device; None when none was.
        base_version: the version that delta starts from; None when none was offered.
        why_full: offered a delta, the device took the bundle whole: its reason.
    """

    method: Literal["delta", "full"]
    full_bytes: int
    delta_bytes: int | None = None
    base_version: int | None = None
    why_full: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        delivery: how the bundle travelled (None when nothing was sent).
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
    delivery: Delivery | None = None


def already_runs(outcome: DeployOutcome) -> bool:
    """The device runs this very version already: skipped by the host, or the offer refused by the device saying so.

    The host skips a device whose status says it runs the version; a device whose status
    the host had not heard yet refuses the offer itself (``not_newer``, with ``installed``
    equal to ``offered``: the content check passed, so it is the same content). Neither is
    a failure of a fleet deploy or a rollout.
    """
    if outcome.error is None:
        return False
    details = outcome.error.details
    if details.get("installed") != outcome.bundle_version:
        return False
    return outcome.detail.get("refused_by") == "host" or details.get("reason") == "not_newer"


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
    prepared = prepare_file(bundle_path, options.chunk_size)
    cmd = transfer_command(
        device_id, bundle_path, options, clock, rollback=options.rollback, claim=claim, prepared=prepared
    )
    with routed(client, router) as live, FleetConversation.open(live, _ids({device_id: cmd})) as fleet:
        outcome = _deploy(client, fleet, {device_id: cmd}, prepared, options, progress, started)[device_id]
    return _raise_host_error(outcome)


def _ids(commands: dict[str, DeployCommand]) -> dict[str, tuple[str, str]]:
    return {d: (c.command_id, c.transfer.transfer_id) for d, c in commands.items()}


def _raise_host_error(outcome: DeployOutcome) -> DeployOutcome:
    """A one-device deploy raises what ended it on the host's side (a timeout), as it always did."""
    if outcome.detail.get("ended_by") == "host" and outcome.error is not None:
        raise outcome.error
    return outcome


#: How long a deploy listens for the devices' retained statuses before its host-side checks.
STATUS_WAIT_S = 1.0


def _statuses_heard(fleet: FleetConversation, devices: list[str], wait_s: float) -> dict[str, DeviceStatus]:
    """The devices' statuses as the broker retained them, those that arrive within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while len(fleet.last_status) < len(devices) and time.monotonic() < deadline:
        time.sleep(0.01)
    return dict(fleet.last_status)


def _deploy(
    client: MqttClient,
    fleet: FleetConversation,
    commands: dict[str, DeployCommand],
    prepared: PreparedFile,
    options: DeployOptions,
    progress: Callable[[int, int], None] | None,
    started: float,
    deltas: Mapping[str, PreparedDelta] | None = None,
) -> dict[str, DeployOutcome]:
    """Send the commands, each delta and the bundle once; follow each device until it installed, deferred or refused.

    ``fleet`` listens to every device already. Each delta (by transfer id) goes first to the
    devices whose command offers it; then the bundle to the others, and to those that took
    the full transfer instead. A device that times out, or is given up after its repair
    rounds, gets a ``failed`` outcome whose ``detail`` says ``ended_by: host``.

    Raises:
        TransportError: the broker connection failed and did not come back.
    """

    def publish(topics: DeviceTopics, cmd: DeployCommand) -> None:
        publish_command(client, topics, cmd, options.authority)

    def last_status(device_id: str) -> str:
        status = fleet.last_status.get(device_id)
        return "never seen" if status is None else status.state

    results: dict[str, TransferResult] = {}
    joined: dict[str, list[Event | MetricsReport]] = {}  # left a delta run for the full one: what each said
    why_full: dict[str, str] = {}
    stash: dict[str, list[Event | MetricsReport]] = {}  # heard during a run the device is not in
    for tid, delta in (deltas or {}).items():
        group = {d: c for d, c in commands.items() if c.delta is not None and c.delta.transfer.transfer_id == tid}
        if not group:
            continue
        run = TransferRun(client, delta.prepared, options, publish, last_status=last_status)
        for device_id, result in run.run(group, _divert(fleet.next, group, stash)).items():
            if result.left is None:
                results[device_id] = result
            else:
                joined[device_id] = [result.left, *result.later]
                why_full[device_id] = str(result.left.detail.get("why", "it did not say why"))
        _log_run(run, delta.prepared, group, f"the delta from v{delta.stats.base_version}")
    full = {d: c for d, c in commands.items() if d not in results}
    if full:
        for device_id, said in joined.items():
            said.extend(stash.pop(device_id, []))
        run = TransferRun(client, prepared, options, publish, progress, last_status=last_status)
        results.update(run.run(full, _divert(fleet.next, full, stash), joined))
        _log_run(run, prepared, full, "the bundle")
    for device_id, heard in stash.items():
        if device_id in results:
            results[device_id].later.extend(heard)
    outcomes = _follow_installs(fleet, commands, results, options, started)
    for device_id, cmd in commands.items():
        delivery = _delivery(cmd, prepared, deltas or {}, by_delta=device_id not in full, why=why_full.get(device_id))
        outcomes[device_id] = dataclasses.replace(outcomes[device_id], delivery=delivery)
        if cmd.delta is not None:
            log.info(
                "%s: %s v%d %s (delta %d bytes, bundle %d bytes)",
                device_id,
                cmd.bundle_name,
                cmd.bundle_version,
                f"by delta from v{delivery.base_version}"
                if delivery.method == "delta"
                else f"whole: {delivery.why_full}",
                delivery.delta_bytes,
                delivery.full_bytes,
            )
    return outcomes


def _divert(inbound: Inbound, wanted: Collection[str], stash: dict[str, list[Event | MetricsReport]]) -> Inbound:
    """``inbound`` for one run of ``wanted`` devices: what the others say is kept in ``stash``, in order."""

    def heard(deadline: float) -> tuple[str, Event | MetricsReport] | None:
        while (msg := inbound(deadline)) is not None:
            if msg[0] in wanted:
                return msg
            stash.setdefault(msg[0], []).append(msg[1])
        return None

    return heard


def _log_run(run: TransferRun, prepared: PreparedFile, devices: Collection[str], what: str) -> None:
    log.info(
        "sent %s (%s) to %d device(s): %d frames, %d bytes (file %d bytes)",
        what,
        prepared.path.name,
        len(devices),
        run.frames_sent,
        run.bytes_sent,
        prepared.size,
    )


def _delivery(
    cmd: DeployCommand,
    prepared: PreparedFile,
    deltas: Mapping[str, PreparedDelta],
    *,
    by_delta: bool,
    why: str | None,
) -> Delivery:
    """How the bundle travelled to the device of ``cmd``: by the delta it was offered, or whole."""
    delta = deltas.get(cmd.delta.transfer.transfer_id) if cmd.delta is not None else None
    if delta is None:
        return Delivery("full", prepared.size)
    return Delivery(
        "delta" if by_delta else "full",
        prepared.size,
        delta_bytes=delta.prepared.size,
        base_version=delta.stats.base_version,
        why_full=why or "",
    )


class _Follow:
    """What one device said after its transfer, until its outcome is known."""

    def __init__(self, result: TransferResult) -> None:
        self.pending: list[Event | MetricsReport] = list(result.later)
        self.event = result.event
        self.metrics: MetricsReport | None = None
        self.checks: tuple[str, ...] = ()
        self.installed = False


def _follow_installs(
    fleet: FleetConversation,
    commands: dict[str, DeployCommand],
    results: dict[str, TransferResult],
    options: DeployOptions,
    started: float,
) -> dict[str, DeployOutcome]:
    """Each device's outcome: wait for ``installed`` and its metrics report (or a refusal, or ``deferred``)."""
    outcomes: dict[str, DeployOutcome] = {}

    def outcome(device_id: str, state: DeploymentState, **kw: object) -> None:
        cmd = commands[device_id]
        outcomes[device_id] = DeployOutcome(
            device_id,
            cmd.bundle_name,
            cmd.bundle_version,
            cmd.transfer.sha256,
            cmd.transfer.transfer_id,
            state,
            seconds=time.monotonic() - started,
            **kw,  # type: ignore[arg-type]
        )

    following: dict[str, _Follow] = {}
    for device_id, result in results.items():
        if result.error is not None:
            outcome(device_id, "failed", error=result.error, detail={"ended_by": "host"})
        else:
            following[device_id] = _Follow(result)
    deadline = time.monotonic() + options.finish_timeout_s
    while True:
        for device_id, f in list(following.items()):
            while f.pending and not _settled(f):
                _take(f, f.pending.pop(0))
            end = _settled(f)
            if end is not None:
                state, kw = end
                outcome(device_id, state, **kw)
                del following[device_id]
        if not following:
            return outcomes
        msg = fleet.next(deadline)
        if msg is None:
            for device_id, f in following.items():
                what = "sent no metrics" if f.installed else "did not finish installing"
                error = DeviceTimeoutError(
                    f"device {device_id} {what} within {options.finish_timeout_s:g} s", device_id=device_id
                )
                outcome(device_id, "failed", error=error, detail={"ended_by": "host"})
            return outcomes
        if msg[0] in following:
            following[msg[0]].pending.append(msg[1])


def _take(f: _Follow, msg: Event | MetricsReport) -> None:
    if isinstance(msg, MetricsReport):
        if f.installed or (f.event is not None and f.event.kind == EventKind.INSTALLED):
            f.metrics = msg
        return
    if msg.kind == EventKind.INSTALLED or msg.kind in TERMINAL_KINDS or msg.kind == EventKind.DEFERRED:
        f.event = msg


def _settled(f: _Follow) -> tuple[DeploymentState, dict[str, object]] | None:
    """The outcome, once the events heard so far decide it."""
    event = f.event
    if event is None:
        return None
    if event.kind in TERMINAL_KINDS:
        return end_state(event), {"error": error_of(event)}
    if event.kind == EventKind.DEFERRED:
        return "deferred", {"detail": dict(event.detail)}
    if event.kind == EventKind.INSTALLED:
        f.installed = True
        f.checks = tuple(event.detail.get("checks", ()))
        if f.metrics is not None:
            return "installed", {"metrics": f.metrics, "checks": f.checks}
    return None


def transfer_command(
    device_id: str,
    bundle_path: Path,
    options: DeployOptions,
    clock: Callable[[], float],
    *,
    action: str = "install",
    rollback: bool = False,
    claim: tuple[str, int] | None = None,
    prepared: PreparedFile | None = None,
    manifest: Manifest | None = None,
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
        prepared: the bundle's hash and chunk index, if read already (:func:`prepare_file`).
        manifest: its manifest, if read already.

    Returns:
        The command; its ``transfer`` holds the bundle's hash and size.

    Raises:
        BundleFormatError, ManifestError, StorageError: the local bundle is unusable.
    """
    if manifest is None and claim is None:
        manifest = read_manifest(bundle_path)
    name, version = claim or _name_version(manifest)  # type: ignore[arg-type]  # read when there is no claim
    # An encrypted bundle's offer names its recipients: a device that is not one refuses before any chunk.
    recipients = manifest.encryption.keyids if manifest is not None and manifest.encryption is not None else ()
    offer = (prepared or prepare_file(bundle_path, options.chunk_size)).offer(recipients)
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
    """Publish a signed transfer command to one device, then send it the bundle.

    The profile command's path (a deploy goes through :func:`deploy_bundle`).

    Returns:
        The device's first event after the transfer (``received``...), or its refusal of the offer.

    Raises:
        DeviceTimeoutError: no answer in time, or chunks still missing after
            ``options.max_resend_rounds`` repair rounds.
    """
    device_id = convo.topics.device_id
    prepared = prepare_file(bundle_path, options.chunk_size)

    def publish(topics: DeviceTopics, command: DeployCommand) -> None:
        publish_command(client, topics, command, options.authority)

    def inbound(deadline: float) -> tuple[str, Event | MetricsReport] | None:
        msg = convo.next(deadline)
        return None if msg is None else (device_id, msg)

    result = TransferRun(client, prepared, options, publish, progress).run({device_id: cmd}, inbound)[device_id]
    if result.error is not None:
        raise result.error
    if result.event is None:  # a result has one or the other
        raise DeviceTimeoutError(f"device {device_id} did not {what}", device_id=device_id)
    return result.event


def _name_version(manifest: Manifest) -> tuple[str, int]:
    return manifest.name, manifest.version


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
    """:func:`deploy_many` to one device; what ended it on the host's side (a timeout) is raised.

    Raises:
        DeviceTimeoutError, TransportError, BundleFormatError, ManifestError, StorageError:
            as for :func:`deploy_bundle`.
    """
    outcome = deploy_many(client, registry, [device_id], bundle_path, options, progress, clock, router=router)[0]
    return _raise_host_error(outcome)


def deploy_many(
    client: MqttClient,
    registry: Registry,
    device_ids: list[str],
    bundle_path: Path,
    options: DeployOptions = DeployOptions(),
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.time,
    *,
    router: Router | None = None,
) -> list[DeployOutcome]:
    """Deploy one bundle to many devices over one connection, the bundle sent once; record each deployment.

    First :func:`check_known_device` refuses, before anything is sent, what the registry
    shows a device would refuse: a runtime it lacks at once, and a version not newer than
    the one it runs once its retained status (if the broker has one) has brought the registry
    up to date. Such a refusal is an outcome like the device's own (``refused``, recorded,
    ``detail`` ``{"refused_by": "host", "sent": False}``). The other devices each get their
    own signed command and share one transfer. A device that times out is ``failed`` with
    ``detail["ended_by"] == "host"``.

    With ``options.deltas``, the bundle is kept in the bundle store, and devices that run an
    older version whose bundle the host has are offered a delta from it (see the module's
    docstring); each outcome's ``delivery`` says how the bundle travelled.

    Args:
        client: a connected client.
        registry: where deployments are recorded.
        device_ids: the target devices (each once).
        bundle_path: the signed bundle.
        options: chunking, timeouts, benchmark, authority.
        progress: called with (bytes sent, total bytes).
        clock: wall clock for message timestamps.
        router: the running router of ``client``, when other threads share the connection.

    Returns:
        One outcome per device, in the order given.

    Raises:
        TransportError: the broker connection failed and did not come back.
        BundleFormatError, ManifestError, StorageError: the local bundle (or the explicit
            delta base) is unusable.
        ConfigError: a device named twice; an explicit delta base of another bundle, or of
            the same version.
    """
    if len(set(device_ids)) != len(device_ids):
        raise ConfigError("a device is named more than once")
    started = time.monotonic()
    manifest = read_manifest(bundle_path)
    explicit = explicit_base(options.deltas, manifest)
    prepared = prepare_file(bundle_path, options.chunk_size)
    commands = {
        d: transfer_command(
            d, bundle_path, options, clock, rollback=options.rollback, prepared=prepared, manifest=manifest
        )
        for d in device_ids
    }
    broker = str(client.address)
    outcomes: dict[str, DeployOutcome] = {}

    def refuse(device_id: str, refusal: UntrustedInputError) -> None:
        cmd = commands.pop(device_id)
        dep = registry.record_deployment(
            device_id, cmd.bundle_name, cmd.bundle_version, cmd.transfer.sha256, started_at=clock()
        )
        registry.update_deployment(dep, "refused", refusal.code, refusal.message, finished_at=clock())
        log.info("refused %s v%s for %s before sending: %s", cmd.bundle_name, cmd.bundle_version, device_id, refusal)
        outcomes[device_id] = DeployOutcome(
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

    for device_id, cmd in list(commands.items()):
        try:  # before touching the broker: what the registry knows of this device on this broker
            check_known_device(_known_device(registry, device_id, broker), cmd, versions=False)
        except UntrustedInputError as exc:
            refuse(device_id, exc)
    if commands:
        with (
            gated(client, registry, router) as live,
            FleetConversation.open(live, _ids(commands)) as fleet,
            tempfile.TemporaryDirectory(prefix="edge-delta-") as work_dir,
        ):
            # The retained statuses are fresher than the registry (a rollback or remove since changed what runs).
            heard = _statuses_heard(fleet, list(commands), min(STATUS_WAIT_S, options.accept_timeout_s))
            with registry.batch():  # one commit for the fleet: a deploy writes a few rows per device
                record_messages(registry, list(heard.values()), clock(), broker)
            for device_id, cmd in list(commands.items()):
                try:
                    check_known_device(_known_device(registry, device_id, broker), cmd)
                except UntrustedInputError as exc:
                    refuse(device_id, exc)
            deltas: dict[str, PreparedDelta] = {}
            settings = options.deltas
            if commands and settings is not None:
                keep_bundle(settings.store, bundle_path, manifest.name, prepared.sha256)
                if settings.offer:
                    bases = {
                        d: base
                        for d, c in commands.items()
                        if (base := base_of(registry, _known_device(registry, d, broker), c, settings, explicit))
                    }
                    commands, deltas = offer_deltas(
                        commands, bases, bundle_path, settings.build, options.chunk_size, Path(work_dir)
                    )
            with registry.batch():
                deployments = {
                    d: registry.record_deployment(
                        d,
                        c.bundle_name,
                        c.bundle_version,
                        c.transfer.sha256,
                        started_at=clock(),
                        transfer_id=c.transfer.transfer_id,
                    )
                    for d, c in commands.items()
                }
            try:
                sent = (
                    _deploy(client, fleet, commands, prepared, options, progress, started, deltas) if commands else {}
                )
            except EdgeError as exc:
                with registry.batch():
                    for dep in deployments.values():
                        registry.update_deployment(dep, "failed", exc.code, exc.message, finished_at=clock())
                raise
        with registry.batch():
            for device_id, outcome in sent.items():
                err = outcome.error
                registry.update_deployment(
                    deployments[device_id],
                    outcome.state,
                    err.code if err else None,
                    err.message if err else None,
                    finished_at=clock(),
                )
                outcomes[device_id] = outcome
            reports = [o.metrics for o in sent.values() if o.metrics is not None]
            record_messages(registry, reports, clock())
    return [outcomes[d] for d in device_ids]


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
