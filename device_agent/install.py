"""The install sequence: what happens to a received bundle, read top to bottom.

::

    deploy offer    precheck   every check the signed offer allows, before any chunk moves:
                               version vs floor and content, expiry, runtime, target, storage
                               (edge_sdk.bundle.admission) -> REFUSED at once, nothing reserved
    received        RECEIVED event                      (whole file, each chunk checked: device_agent.receiving)
    action profile  -> verify into scratch, benchmark, metrics (not retained), PROFILED, scratch removed
    gate closed     -> DEFERRED (reason); bundle kept under deferred/, the gate asked again every
                       update_gate_retry_s (retry_deferred), then installed as below
    install         stage      verify against root, device and command; unpack into a slot
                               (an encrypted bundle: its ciphertext hashes checked, then decrypted
                               chunk by chunk into the slot's scratch; nothing is left on failure)
                    activate   state.json: active, pending its health check
                    health     load, run the sample, benchmark (sparse bundles: choose the execution)
                    confirm    state.json: pending mark cleared    | roll back on a failed health check
                    report     INSTALLED, new status, metrics report (retained)

An error on the way becomes an event: ``refused`` for bad input (nothing changed), ``failed``
for everything else (a failed health check has already rolled back). The disk work of each
step is :class:`device_agent.installer.Installer`'s; the decisions and their order are here.
Rollback and remove commands, which also change what runs, are here too.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent.config import AgentConfig
from device_agent.decryption_key import check_recipient
from device_agent.gate import UpdateGate
from device_agent.installer import ActiveBundle, BundleChecks, Installer, PendingRollback
from device_agent.platform import PlatformInfo
from device_agent.receiving import ReceivedBundle
from device_agent.reporter import Reporter
from device_agent.trust_store import TrustStore
from edge_sdk.bundle import DeviceFacts, Expected, Manifest, Target
from edge_sdk.bundle.admission import OfferedBundle, check_offer
from edge_sdk.errors import (
    EdgeError,
    HealthCheckError,
    ModelError,
    NotRecipientError,
    RollbackError,
    StorageError,
    UntrustedInputError,
)
from edge_sdk.metrics import PowerSource
from edge_sdk.protocol import (
    BenchmarkSpec,
    CodecLimits,
    DeployCommand,
    EventKind,
    MetricsReport,
    RemoveCommand,
    RollbackCommand,
    decode,
    encode,
)
from edge_sdk.runtime import available_runtimes
from edge_sdk.trust import RecipientKey

if TYPE_CHECKING:  # numpy and the runtimes are imported only when a model is profiled
    from device_agent.profiler import Profile
    from device_agent.selection import ExecutionChoice

__all__ = ["InstallSequence", "ProfileHook"]

#: Health-checks and benchmarks an installed bundle in place of the real runtime (simulated
#: devices): (manifest, unpacked payload directory, how to benchmark) -> the profile.
ProfileHook = Callable[[Manifest, Path, BenchmarkSpec], "Profile"]

log = logging.getLogger(__name__)


class InstallSequence:
    """Installs, profiles, defers, rolls back and removes bundles on one device.

    Args:
        config: the agent's configuration (device facts, gate timing, execution pin).
        installer: the slots on disk.
        trust: the current root of trust (bundles are verified against it).
        reporter: where events, status and metrics go.
        platform: what this device is (for bundles' target constraints).
        power: where power figures come from (for the benchmark).
        gate: may an install happen now.
        clock: wall-clock seconds (expiry checks, timestamps).
        monotonic: monotonic seconds (when to ask the gate again).
        checkpoint: called with ``received``, ``profiled`` and ``reported`` as they are reached
            (the ``debug_crash_at`` option).
        free_bytes: free bytes on the file system of a directory (the storage pre-check);
            injectable for tests.
        decryption_key: this device's X25519 key; encrypted bundles addressed to it are
            decrypted while they are staged (:mod:`device_agent.decryption_key`).
        profile: replaces the real runtime's health check and benchmark (simulated devices).
        activating: called with the manifest of each verified bundle just before it is
            activated; an ``EdgeError`` it raises fails the install there (simulated devices'
            injected install failures).
    """

    def __init__(
        self,
        config: AgentConfig,
        installer: Installer,
        trust: TrustStore,
        reporter: Reporter,
        platform: PlatformInfo,
        power: PowerSource,
        gate: UpdateGate,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        checkpoint: Callable[[str], None] = lambda _point: None,
        free_bytes: Callable[[Path], int] = lambda path: shutil.disk_usage(path).free,
        decryption_key: RecipientKey | None = None,
        profile: ProfileHook | None = None,
        activating: Callable[[Manifest], None] | None = None,
    ) -> None:
        self.config = config
        self.profile_hook = profile
        self.activating_hook = activating
        self.free_bytes = free_bytes
        self.decryption_key = decryption_key
        self.installer = installer
        self.trust = trust
        self.reporter = reporter
        self.platform = platform
        self.power = power
        self.gate = gate
        self.clock = clock
        self.monotonic = monotonic
        self.checkpoint = checkpoint
        self.codec_limits = CodecLimits()
        self.next_gate_check = 0.0

    # --- an offered bundle, before any chunk ---------------------------------------------

    def precheck(self, cmd: DeployCommand) -> tuple[str, ...]:
        """Every check the signed deploy command lets this device run before any chunk moves.

        Always: the root of trust is current, and (for an install) the version is above the
        floor. With the offer's manifest facts (``cmd.bundle``, from hosts that send them):
        the content a version ran with, expiry, runtime, target, and storage for the
        download plus its unpacked payload. Without them the rest is checked after receipt,
        as before. Nothing is written.

        Returns:
            One line per check that passed.

        Raises:
            UntrustedInputError: a check failed (RollbackError, ExpiredError, TargetMismatchError...).
            StorageError: the download and its unpacked payload would not fit.
        """
        self.trust.root.check_not_expired(self.clock())
        facts = cmd.bundle
        offer = OfferedBundle(cmd.bundle_name, cmd.bundle_version, cmd.transfer.size, rollback=cmd.rollback)
        free = None
        if facts is not None:
            target = None
            if facts.arch or facts.min_memory_bytes or facts.accelerators:
                target = Target(facts.arch, facts.min_memory_bytes, facts.accelerators)
            offer = OfferedBundle(
                cmd.bundle_name,
                cmd.bundle_version,
                cmd.transfer.size,
                runtime=facts.runtime,
                expires_at=facts.expires_at,
                content=facts.content,
                unpacked_bytes=facts.unpacked_bytes,
                target=target,
                rollback=cmd.rollback,
            )
            data_dir = self.installer.data_dir
            try:
                free = (self.free_bytes(data_dir), str(data_dir))
            except OSError as exc:
                raise StorageError(f"cannot read the free space of {data_dir}: {exc.strerror}") from exc
        history = self.installer.history(cmd.bundle_name) if cmd.action == "install" else None
        return check_offer(offer, history, self._device_facts(), set(available_runtimes()), self.clock(), free)

    def check_recipient(self, cmd: DeployCommand) -> None:
        """Refuse the offer of an encrypted bundle that is not encrypted to this device.

        Runs when the deploy command arrives, before the staging file is reserved or any
        chunk is sent; the signed manifest is checked again after receipt.

        Raises:
            NotRecipientError: the offer lists recipient keys and this device's is not one.
        """
        if self.decryption_key is None:
            if cmd.transfer.encrypted_for:
                raise NotRecipientError(
                    f"{cmd.bundle_name} v{cmd.bundle_version} is encrypted, and this device has no decryption key",
                    recipients=list(cmd.transfer.encrypted_for),
                )
            return
        check_recipient(cmd, self.decryption_key)

    # --- a received bundle ------------------------------------------------------------

    def received(self, bundle: ReceivedBundle) -> None:
        """Take a received bundle through the sequence; every outcome is reported, none raised."""
        cmd = bundle.command
        try:
            self.reporter.event(EventKind.RECEIVED, cmd=cmd, detail={"discarded": bundle.discarded})
            self.checkpoint("received")
            if cmd.action == "profile":
                self._profile_only(cmd, bundle.path)
                return
            decision = self.gate.check()
            if not decision.open:
                self.installer.defer(cmd.transfer.transfer_id, bundle.path, encode(cmd))
                self.next_gate_check = self.monotonic() + self.config.update_gate_retry_s
                log.info("install of %s v%s deferred: %s", cmd.bundle_name, cmd.bundle_version, decision.reason)
                self.reporter.event(
                    EventKind.DEFERRED,
                    cmd=cmd,
                    detail={"reason": decision.reason, "retry_s": self.config.update_gate_retry_s},
                )
                return
            self.install(cmd, bundle.path)
        except UntrustedInputError as exc:
            log.warning("refused %s v%s: %s", cmd.bundle_name, cmd.bundle_version, exc.message)
            self.reporter.event(EventKind.REFUSED, cmd=cmd, error=exc)
        except EdgeError as exc:
            log.warning("install of %s v%s failed: %s", cmd.bundle_name, cmd.bundle_version, exc.message)
            self.reporter.event(EventKind.FAILED, cmd=cmd, error=exc)
        finally:
            bundle.discard()

    def install(self, cmd: DeployCommand, bundle_path: Path) -> None:
        """Stage, activate, health-check, then confirm or roll back; report.

        Raises:
            UntrustedInputError: the bundle failed a check (nothing changed).
            ModelError: the health check failed (already rolled back, status published).
            StorageError: the disk refused a step.
        """
        staged = self.installer.stage(bundle_path, self.clock(), self._checks(cmd))
        manifest = staged.verified.manifest
        self.trust.observe(manifest.created_at, self.clock())  # a signed time: raises the device's time floor
        if self.activating_hook is not None:
            self.activating_hook(manifest)
        self.installer.activate(staged, cmd.command_id)
        active = self.installer.active(manifest.name)
        if active is None:
            raise StorageError(f"{manifest.name} v{manifest.version} is not active right after its activation")
        try:
            profile, choice = self._profile(manifest, active.slot / "payload", cmd.benchmark)
            if choice is not None:
                self.installer.record_execution(active, choice.to_dict())
        except ModelError as exc:
            restored = self.installer.rollback(manifest.name)
            exc.details["rolled_back_to"] = restored.version if restored else None
            log.warning(
                "%s v%s failed its health check (%s); rolled back to %s",
                manifest.name,
                manifest.version,
                exc.message,
                restored.version if restored else "nothing",
            )
            self.reporter.publish_status()
            raise
        self.checkpoint("profiled")
        self.installer.confirm(manifest.name)
        self.reporter.event(
            EventKind.INSTALLED,
            cmd=cmd,
            detail={"name": manifest.name, "version": manifest.version, "checks": list(staged.verified.checks)},
        )
        self.checkpoint("reported")
        self.reporter.publish_status()
        report = self.metrics_report(cmd.command_id, manifest.name, manifest.version, profile, choice)
        self.reporter.metrics(report, retain=True)
        log.info(
            "installed %s v%s: p50 %.3f ms, p99 %.3f ms",
            manifest.name,
            manifest.version,
            profile.latency.p50_ms,
            profile.latency.p99_ms,
        )

    def _profile_only(self, cmd: DeployCommand, bundle_path: Path) -> None:
        """Verify, benchmark from a scratch directory, report, remove. Nothing is activated."""
        scratch = self.installer.stage_scratch(bundle_path, self.clock(), self._checks(cmd))
        manifest = scratch.verified.manifest
        try:
            profile, choice = self._profile(manifest, scratch.slot / "payload", cmd.benchmark)
        finally:
            self.installer.discard(scratch)
        report = self.metrics_report(cmd.command_id, manifest.name, manifest.version, profile, choice, mode="profile")
        self.reporter.metrics(report)
        self.reporter.event(EventKind.PROFILED, cmd=cmd, detail={"name": manifest.name, "version": manifest.version})
        log.info(
            "profiled %s v%s without installing: p50 %.3f ms",
            manifest.name,
            manifest.version,
            profile.latency.p50_ms,
        )

    def _checks(self, cmd: DeployCommand) -> BundleChecks:
        """What a bundle is verified against: the current root, this device, the signed command."""
        self.trust.root.check_not_expired(self.clock())
        content = cmd.bundle.content if cmd.bundle is not None and cmd.bundle.content else None
        return BundleChecks(
            trusted=self.trust.root.trusted("bundles"),
            device=self._device_facts(),
            expect=Expected(cmd.bundle_name, cmd.bundle_version, rollback=cmd.rollback, content=content),
            decrypt_with=self.decryption_key,
        )

    def _device_facts(self) -> DeviceFacts:
        return DeviceFacts(self.platform.arch, self.platform.memory_bytes, frozenset(self.config.accelerators))

    def measure(self, active: ActiveBundle, spec: BenchmarkSpec) -> tuple[Profile, ExecutionChoice | None]:
        """Health-check and benchmark an active bundle again, as installed (periodic reports).

        A sparse bundle runs the execution chosen at its install (kept in its slot), so
        nothing is chosen again; one without a kept choice is chosen as at install.

        Returns:
            The profile, and the execution run (``None`` for other bundles).

        Raises:
            ModelError: the model no longer loads or fails its health check.
            EdgeError: the bundle's files are unusable.
        """
        kept = active.execution
        chosen = kept.get("chosen") if kept is not None else None
        pin = chosen if isinstance(chosen, str) else None
        return self._profile(active.manifest, active.slot / "payload", spec, pin)

    def _profile(
        self, manifest: Manifest, payload: Path, spec: BenchmarkSpec, execution: str | None = None
    ) -> tuple[Profile, ExecutionChoice | None]:
        """Health-check and benchmark the bundle unpacked in ``payload``.

        A bundle with sparse layers first gets its execution chosen (by pin, ``execution``
        or the agent's setting, or by measurement, :mod:`device_agent.selection`), and the
        profile runs that one.

        Returns:
            The profile, and the execution choice (``None`` for other bundles).

        Raises:
            ModelError: the model does not load or fails its health check, the sparse
                files are unusable, or no execution can run.
        """
        if self.profile_hook is not None:
            return self.profile_hook(manifest, payload, spec), None
        from device_agent.profiler import profile_model  # numpy and the runtimes only when needed

        sample = payload / manifest.sample_input if manifest.sample_input else None
        choice, opener = None, None
        if manifest.sparse is not None:
            from device_agent.selection import select_execution  # sparse bundles only

            try:
                choice, opener = select_execution(payload, manifest, spec, execution or self.config.execution, sample)
            except ModelError:
                raise
            except EdgeError as exc:
                raise HealthCheckError(f"{exc.code}: {exc.message}", check="execution") from exc
        profile = profile_model(
            payload / manifest.model,
            manifest.runtime,
            manifest.precision,
            sample,
            spec,
            self.power,
            self.config.sysfs_root,
            max_latency_ms=manifest.health.max_latency_ms if manifest.health else None,
            opener=opener,
        )
        return profile, choice

    def metrics_report(
        self,
        command_id: str,
        name: str,
        version: int,
        profile: Profile,
        choice: ExecutionChoice | None,
        **extra: object,
    ) -> MetricsReport:
        """The signed-to-be report of one measurement, dated by :meth:`Reporter.metrics_time`.

        Args:
            command_id: the command it answers ("" for a periodic report).
            name, version: the bundle measured.
            profile: what was measured.
            choice: the execution run (sparse bundles).
            extra: marks for readers (``mode``: ``profile``, ``periodic``; none after an install).
        """
        return MetricsReport(
            device_id=self.config.device_id,
            bundle_name=name,
            bundle_version=version,
            runtime=profile.runtime,
            precision=profile.precision,
            ts=self.reporter.metrics_time(),
            command_id=command_id,
            threads=profile.threads,
            providers=profile.providers,
            latency=profile.latency,
            memory=profile.memory,
            cpu=profile.cpu,
            power=profile.power,
            temperature=profile.temperature,
            execution=choice,
            arch=self.platform.arch,
            emulated=self.platform.emulated,
            extra=dict(extra),
        )

    # --- deferred installs --------------------------------------------------------------

    def retry_deferred(self) -> None:
        """Ask the gate again for installs it held back, when due; install them oldest first once it opens."""
        if self.monotonic() < self.next_gate_check:
            return
        self.next_gate_check = self.monotonic() + self.config.update_gate_retry_s
        waiting = self.installer.deferred()
        if not waiting:
            return
        decision = self.gate.check()
        if not decision.open:
            log.debug("update gate still closed (%s); %d install(s) wait", decision.reason, len(waiting))
            return
        for tid, path, raw in waiting:
            try:
                cmd = decode(raw, self.codec_limits)
                if not isinstance(cmd, DeployCommand):
                    raise StorageError(f"deferred command {tid} is not a deploy command")
            except EdgeError as exc:
                log.warning("dropping unreadable deferred install %s: %s", tid, exc.message)
                self.installer.drop_deferred(tid)
                continue
            active = self.installer.active(cmd.bundle_name)
            if active is not None and active.version == cmd.bundle_version:
                # Installed and confirmed before a crash or restart kept us from dropping
                # it; installing it again would only be refused as "not newer".
                log.info("deferred %s v%s is already active; dropping it", cmd.bundle_name, cmd.bundle_version)
                self.installer.drop_deferred(tid)
                continue
            log.info("update gate open: installing deferred %s v%s", cmd.bundle_name, cmd.bundle_version)
            try:
                self.install(cmd, path)
            except UntrustedInputError as exc:
                self.reporter.event(EventKind.REFUSED, cmd=cmd, error=exc)
            except EdgeError as exc:
                self.reporter.event(EventKind.FAILED, cmd=cmd, error=exc)
            finally:
                self.installer.drop_deferred(tid)

    # --- other changes of what runs --------------------------------------------------------

    def roll_back(self, cmd: RollbackCommand) -> None:
        """Re-activate the kept previous version, only if it is the one the command names."""
        previous = self.installer.previous(cmd.bundle_name)
        if previous is None or previous.version != cmd.bundle_version:
            kept = f"v{previous.version}" if previous else "no previous version"
            err = RollbackError(
                f"cannot roll {cmd.bundle_name} back to v{cmd.bundle_version}: this device keeps {kept}; "
                f"deploy that version's bundle as a rollback instead",
                offered=cmd.bundle_version,
                installed=previous.version if previous else None,
            )
            self.reporter.event(EventKind.REFUSED, cmd=cmd, error=err)
            return
        restored = self.installer.rollback(cmd.bundle_name, signed=True)
        self.reporter.publish_status()
        self.reporter.event(
            EventKind.DONE,
            cmd=cmd,
            detail={"action": "rollback", "name": cmd.bundle_name, "version": restored.version if restored else None},
        )

    def remove(self, cmd: RemoveCommand) -> None:
        """Stop running a bundle and delete its slots."""
        removed = self.installer.remove(cmd.bundle_name)
        self.reporter.publish_status()
        self.reporter.event(
            EventKind.DONE, cmd=cmd, detail={"action": "remove", "name": cmd.bundle_name, "removed": removed}
        )

    def report_interrupted(self, rb: PendingRollback) -> None:
        """Report an install found pending at start, and rolled back then (see :meth:`Installer.roll_back_pending`)."""
        err = HealthCheckError(
            f"install of {rb.name} v{rb.version} was interrupted before it passed its health check "
            f"(agent restarted); rolled back to {f'v{rb.restored}' if rb.restored else 'nothing'}",
            check="interrupted",
            rolled_back_to=rb.restored,
        )
        log.warning("%s", err.message)
        self.reporter.event(
            EventKind.FAILED, error=err, command_id=rb.command_id, detail={"name": rb.name, "version": rb.version}
        )
