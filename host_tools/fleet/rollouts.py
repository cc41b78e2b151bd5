"""Rollouts: the shell around :mod:`host_tools.fleet.rollout_plan` that talks to devices.

``edgectl rollout start`` plans a rollout (:func:`create_rollout`: the selector's devices from
the registry, what each runs now and measured on it) and runs it (:class:`RolloutRunner`);
``rollout resume`` runs a stored one again from where it stood. The runner turns what it hears
into the planner's events and carries out its decisions:

=========================================  ==================================================
heard                                      event
=========================================  ==================================================
an operator's request in the registry      Pause / Resume / Abort
a device's status (retained, or new)       it runs the new version: Installed and Confirmed (a
                                           deferred install that landed, or an install finished
                                           while no runner ran)
its liveness (status and heartbeats, as    Online / Offline (:func:`presence_events`): ``stale``,
the registry has them)                     not heard within its heartbeat interval x factor, is
                                           offline
a new device matches the selector          Joined
:func:`~host_tools.fleet.deployer.deploy_many`'s outcome: installed + metrics -> Installed,
Confirmed (p99, peak RSS); deferred -> Deferred; refused / failed -> Failed(code); the host
refused it as "already runs this version" -> Installed, Confirmed
the clock                                  Tick
=========================================  ==================================================

=====================  ==============================================================
decision               what the runner does
=====================  ==============================================================
Start                  stores the devices as in flight, *then* ``deploy_many`` to them
RollBack               a signed ``rollback`` command to the version the device ran
                       before, or ``remove`` when it ran none
Aborted / Completed    stops once no device owes an answer
=====================  ==============================================================

Every step is stored (:class:`~host_tools.fleet.rollout_store.RolloutStore`) before the
commands it decides go out, so a runner killed at any point is resumed without sending any
device the bundle twice: a device stored as in flight is asked for its status, and started
again only when the planner retries it (it timed out, or failed in a retryable way).

Selectors (:func:`select_devices`): device ids separated by commas, or the fleet's one
selector grammar (labels, ``@group``) over each device's labels and registry facts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.errors import ConfigError, EdgeError, StorageError
from edge_sdk.mqtt import MqttClient
from edge_sdk.protocol import (
    Channel,
    DeviceStatus,
    EventKind,
    MetricsReport,
    RemoveCommand,
    RollbackCommand,
    fleet_filter,
)
from host_tools.fleet.collector import active_bundles, record_message
from host_tools.fleet.conversation import error_of
from host_tools.fleet.deployer import (
    DeployOptions,
    DeployOutcome,
    already_runs,
    deploy_many,
    read_manifest,
    run_command,
)
from host_tools.fleet.inventory import DeviceView, list_devices
from host_tools.fleet.liveness import DEFAULT_STALE_FACTOR, LivenessState, liveness
from host_tools.fleet.registry import BundleRef, DeviceRecord, Registry
from host_tools.fleet.rollout_plan import (
    Abort,
    Aborted,
    Completed,
    Confirmed,
    Decision,
    Deferred,
    Event,
    Failed,
    Installed,
    Joined,
    Observed,
    Pause,
    Resume,
    RollBack,
    RolledBack,
    RolloutPlanner,
    RolloutPolicy,
    Start,
    Target,
    Tick,
    presence_events,
)
from host_tools.fleet.rollout_store import RolloutRecord, RolloutStore
from host_tools.fleet.router import Router
from host_tools.fleet.selectors import resolve_selector

__all__ = [
    "DeviceEnd",
    "RolloutAbortedError",
    "RolloutReport",
    "RolloutRunner",
    "RunSettings",
    "create_rollout",
    "operator_request",
    "rollout_ids",
    "rollout_report",
    "runner_is_live",
    "select_devices",
]

log = logging.getLogger(__name__)

#: Rollback commands in flight at once after an abort: each waits for its device's answer
#: (up to the command timeout), so one at a time took 26 s for 146 devices.
ROLLBACKS_AT_ONCE = 32


class RolloutAbortedError(EdgeError):
    """A rollout aborted (its threshold, or an operator); ``details`` say why."""

    code = "rollout_aborted"


# --- which devices ----------------------------------------------------------------------------


def select_devices(registry: Registry, selector: str) -> list[DeviceRecord]:
    """The devices a selector names, one row each (the one seen last), ordered by id.

    ``--to`` takes device ids separated by commas (when every term is a bare word and one
    of them is a device the registry knows), or the fleet's one selector grammar
    (:mod:`host_tools.fleet.selectors`: ``@group``, or comma = AND of ``key=value``,
    ``key!=value``, ``key`` present, ``id=DEVICE``) over each device's effective labels
    and its registry facts: ``status``, ``agent_version``, ``broker``, ``platform.<key>``,
    ``runtime.<name>`` (its version) and ``bundle.<name>`` (the version it runs). A label
    of the same name wins over a fact.

    Args:
        registry: where devices are known.
        selector: the ``--to`` text.

    Returns:
        The devices.

    Raises:
        ConfigError: an empty or malformed selector, an unknown group, an id the registry
            does not know, or no device matches.
    """
    terms = [t.strip() for t in selector.split(",") if t.strip()]
    if not terms:
        raise ConfigError("a rollout needs a selector: device ids, @group, or key=value terms")
    views: dict[str, DeviceView] = {}
    for view in list_devices(registry, time.time()):
        seen = views.get(view.record.device_id)
        if seen is None or view.record.last_seen > seen.record.last_seen:
            views[view.record.device_id] = view
    bare = not selector.strip().startswith("@") and all("=" not in t for t in terms)
    if bare and any(t in views for t in terms):
        unknown = [t for t in terms if t not in views]
        if unknown:
            raise ConfigError(f"selector names devices registry {registry.name} does not know: {', '.join(unknown)}")
        return [views[t].record for t in sorted(set(terms))]

    def saved(name: str) -> str | None:
        group = registry.get_group(name)
        return None if group is None else str(group.selector)

    chosen_selector = resolve_selector(selector.strip(), saved)
    chosen = [
        view.record
        for _, view in sorted(views.items())
        if chosen_selector.matches(view.record.device_id, {**_facts(view.record), **view.labels})
    ]
    if not chosen:
        raise ConfigError(f"no device in registry {registry.name} matches {selector!r}")
    return chosen


def _facts(record: DeviceRecord) -> dict[str, str]:
    """What the registry knows of a device, as selector keys (see :func:`select_devices`)."""
    facts = {"status": record.status, "agent_version": record.agent_version or "", "broker": record.broker}
    for key, value in (record.platform or {}).items():
        if isinstance(value, str | int | float | bool):
            facts[f"platform.{key}"] = str(value)
    for name, version in (record.runtimes or {}).items():
        facts[f"runtime.{name}"] = str(version)
    for ref in record.active_bundles or ():
        facts[f"bundle.{ref.name}"] = str(ref.version)
    return facts


def _target(
    registry: Registry,
    record: DeviceRecord,
    bundle_name: str,
    now: float,
    refs: Sequence[BundleRef] | None = None,
) -> Target:
    """What a device runs of ``bundle_name`` (by ``refs``, else its row), measured on it (the gate's
    baseline: the profile after its install, never a periodic report, which is measured with
    fewer runs), and whether it is online now (``stale`` is not: :func:`device_liveness`)."""
    running = next(
        (b.version for b in (record.active_bundles if refs is None else refs) or () if b.name == bundle_name), None
    )
    p99 = rss = None
    if running is not None:
        for m in registry.latest_metrics(record.device_id, bundle_name, periodic=False):
            if m.bundle_version == running:
                p99, rss = _measured(m.report)
    return Target(record.device_id, running, p99, rss, online=device_liveness(record, now) == "online")


def device_liveness(record: DeviceRecord, now: float, factor: float = DEFAULT_STALE_FACTOR) -> LivenessState:
    """A device's liveness from its registry row: ``online``, ``stale`` or ``offline`` (see :mod:`.liveness`)."""
    return liveness(record.status, record.last_seen, record.last_heard, record.heartbeat_s, now, factor)


def _measured(report: MetricsReport | None) -> tuple[float | None, int | None]:
    if report is None:
        return None, None
    p99 = report.latency.p99_ms if report.latency is not None else None
    rss = report.memory.peak_bytes if report.memory is not None else None
    return p99, rss


def create_rollout(
    registry: Registry, bundle_path: Path, selector: str, policy: RolloutPolicy, now: float
) -> RolloutRecord:
    """Plan a rollout of a bundle to the selector's devices and store it (nothing is sent yet).

    Raises:
        ConfigError: a selector naming no device; a policy out of range.
        BundleFormatError, ManifestError: the bundle cannot be read.
        StorageError: the registry cannot be written.
    """
    manifest = read_manifest(bundle_path)
    devices = select_devices(registry, selector)
    planner = RolloutPlanner.plan(policy, [_target(registry, d, manifest.name, now) for d in devices], now)
    digest = hashlib.sha256(bundle_path.read_bytes()).hexdigest()
    bundle = (manifest.name, manifest.version, digest, str(bundle_path.resolve()))
    record = RolloutStore(registry).create(planner, bundle=bundle, selector=selector, now=now)
    log.info("rollout %s of %s v%d to %d devices in %d waves", record.id, *bundle[:2], len(devices), record.waves)
    return record


# --- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceEnd:
    """Where one device of a rollout ended.

    Attributes:
        device_id, wave, state, attempts, error_code, p99_ms, rss_bytes: as the rollout stored them.
        runs: the version of the bundle the device reports running (its status); None: none,
            or not heard.
        heard: whether ``runs`` comes from the device's status read by this command.
    """

    device_id: str
    wave: int
    state: str
    attempts: int
    error_code: str | None
    p99_ms: float | None
    rss_bytes: int | None
    runs: int | None
    heard: bool

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class RolloutReport:
    """A rollout's state, per wave and per device.

    Attributes:
        record: the stored rollout.
        devices: every device, in plan order.
        waves: per wave, how many devices are in each state.
    """

    record: RolloutRecord
    devices: tuple[DeviceEnd, ...]
    waves: tuple[dict[str, int], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.record.to_dict(),
            "waves_progress": [dict(w) for w in self.waves],
            "devices": [d.to_dict() for d in self.devices],
        }


def rollout_report(registry: Registry, rollout_id: str, heard: dict[str, DeviceStatus] | None = None) -> RolloutReport:
    """The rollout as stored; each device's running version from ``heard`` statuses, else the registry's row.

    Raises:
        ConfigError: no such rollout.
        StorageError: the registry cannot be read.
    """
    record, planner = RolloutStore(registry).load(rollout_id)
    return _report(record, planner, registry, heard)


def _report(
    record: RolloutRecord,
    planner: RolloutPlanner,
    registry: Registry | None,
    heard: dict[str, DeviceStatus] | None = None,
) -> RolloutReport:
    """A report of ``planner``'s state; versions from ``heard``, else from ``registry`` (None: not looked up)."""
    ends = []
    for d in planner.devices.values():
        status = (heard or {}).get(d.device_id)
        refs: Sequence[BundleRef] = ()
        if status is not None:
            refs = active_bundles(status) or ()
        elif registry is not None:
            row = registry.get_device(d.device_id)
            refs = (row.active_bundles or ()) if row is not None else ()
        runs = next((b.version for b in refs if b.name == record.bundle_name), None)
        ends.append(
            DeviceEnd(d.device_id, d.wave, d.state, d.attempts, d.error_code, d.p99_ms, d.rss_bytes, runs,
                      status is not None)
        )  # fmt: skip
    p = planner.progress
    fresh = dataclasses.replace(record, status=p.status, wave=p.wave, waves=p.waves, reason=p.reason)
    waves = tuple(planner.counts(w) for w in range(p.waves))
    return RolloutReport(fresh, tuple(ends), waves)


# --- the runner -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    """How a runner works.

    Attributes:
        poll_s: how often it looks at requests, statuses and the clock while it waits.
        command_timeout_s: how long a device has to answer a rollback command.
        lease_stale_s: a runner not heard from for this long may be replaced (at once, when it
            was a process on this host that is gone); longer than a wave's deploy may block.
        wait_offline: keep running while only offline devices remain (until they return or
            the rollout's lifetime ends); otherwise the run returns and ``resume`` goes on later.
        settle_s: after the end, how long to wait for the devices' statuses to say where they are.
        liveness_check_s: how often every device not yet started is checked for going stale
            (a device whose status changed is checked at once).
        stale_factor: heartbeat intervals a device may go unheard before it is stale (offline
            for the rollout).
    """

    poll_s: float = 0.5
    command_timeout_s: float = 30.0
    lease_stale_s: float = 900.0
    wait_offline: bool = False
    settle_s: float = 5.0
    liveness_check_s: float = 5.0
    stale_factor: float = DEFAULT_STALE_FACTOR


class RolloutRunner:
    """Runs one stored rollout over one connection until it ends, pauses, or waits for offline devices.

    Args:
        client: a connected client.
        registry: where the rollout is stored.
        router: the running router of ``client``.
        rollout_id: which rollout.
        options: how to send the bundle (the authority signs deploys and rollbacks).
        settings: polling, timeouts.
        clock: wall clock.
        progress: called with the report after each step (a live view).
    """

    def __init__(
        self,
        client: MqttClient,
        registry: Registry,
        router: Router,
        rollout_id: str,
        options: DeployOptions,
        settings: RunSettings = RunSettings(),
        clock: Callable[[], float] = time.time,
        progress: Callable[[RolloutReport], None] | None = None,
    ) -> None:
        if options.authority is None:
            raise ConfigError("commands must be signed: no command keys given (run `edgectl keys init`)")
        self.client = client
        self.registry = registry
        self.router = router
        self.store = RolloutStore(registry)
        self.options = options
        self.settings = settings
        self.clock = clock
        self.progress = progress
        self.runner_id = f"{socket.gethostname()}:{os.getpid()}"
        self.record, self.planner = self.store.load(rollout_id)
        self._heard: dict[str, DeviceStatus] = {}
        self._status_changed: set[str] = set()  # devices whose liveness to check at once
        self._liveness_checked = float("-inf")
        self._stale: dict[str, float] = {}  # device -> its heartbeat interval, while judged stale
        self._listening_since = time.monotonic()
        self._broker = str(client.address)

    def run(self) -> RolloutReport:
        """Run until the rollout ends (no device owing an answer), pauses, or waits only for offline devices.

        Returns:
            The report, each device's version read from its status (``record.status`` says
            whether it completed, aborted, paused or still runs).

        Raises:
            ConfigError: another runner holds the rollout; the bundle file is gone.
            TransportError: the broker connection failed for good.
            StorageError: the registry cannot be written.
        """
        rid = self.record.id
        stale_s = 0.0 if _runner_gone(self.record.runner) else self.settings.lease_stale_s
        if not self.store.claim(rid, self.runner_id, self.clock(), stale_s):
            current = self.store.get(rid)
            raise ConfigError(
                f"rollout {rid} is being run by {current.runner}; `edgectl rollout pause/abort {rid}` reaches it",
                rollout_id=rid,
            )
        if not Path(self.record.bundle_path).is_file() and not self.planner.finished:
            raise ConfigError(f"rollout {rid}: its bundle {self.record.bundle_path} is gone", rollout_id=rid)
        self.client.subscribe(fleet_filter(Channel.STATUS), qos=1)
        self.client.subscribe(fleet_filter(Channel.HEARTBEAT), qos=0)
        self._listening_since = time.monotonic()
        try:
            self._loop()
        finally:
            self.store.release(rid, self.runner_id)
        return self._final_report()

    # -- the loop --

    def _loop(self) -> None:
        deadline_status = time.monotonic() + 2.0  # the retained statuses, before the first decisions
        while time.monotonic() < deadline_status and len(self._statuses()) < len(self.planner.devices):
            time.sleep(0.05)
        selector_checked = 0.0
        while True:
            events = self._requests()
            events.extend(self._status_events())
            events.extend(self._presence_events())
            if not self.planner.finished and time.monotonic() - selector_checked > 10.0:
                events.extend(self._joined())
                selector_checked = time.monotonic()
            events.append(Tick())
            self._act(events)
            self.store.claim(self.record.id, self.runner_id, self.clock(), self.settings.lease_stale_s)
            if self._done():
                return
            time.sleep(self.settings.poll_s)

    def _done(self) -> bool:
        p = self.planner
        if p.busy:
            return False
        if p.finished or p.progress.status == "paused":
            return True
        due = [d for d in p.devices.values() if d.state in ("queued", "retry") and d.wave <= p.progress.wave]
        if any(d.online for d in due):
            return False
        # A device stale by the registry may only have gone unrecorded (no collector ran): it
        # is waited for until this runner itself has listened as long as makes one stale.
        listened = time.monotonic() - self._listening_since
        if any(listened < self._stale.get(d.device_id, 0.0) * self.settings.stale_factor for d in due):
            return False
        return not self.settings.wait_offline

    def _act(self, events: list[Event]) -> None:
        """Feed the events; carry out the decisions (and those their results bring), storing each step first."""
        todo: list[Decision] = []
        for event in events:
            todo.extend(self.planner.accept(event, self.clock()))
        while todo:
            self._save()
            batch = [todo.pop(0)]
            while isinstance(batch[0], RollBack) and todo and isinstance(todo[0], RollBack):
                batch.append(todo.pop(0))  # an abort's rollbacks go out together (stored first, above)
            said = self._carry_out_all(batch)
            # An operator's request made while devices were being sent goes in first: a pause or
            # abort must hold the next wave back, which these outcomes would otherwise start.
            for event in [*self._requests(), *said]:
                todo.extend(self.planner.accept(event, self.clock()))
        self._save()

    def _requests(self) -> list[Event]:
        request = self.store.take_request(self.record.id)
        return [] if request is None else [_OPERATOR_EVENTS[request]]

    def _save(self) -> None:
        self.store.save(self.record.id, self.planner, self.clock())
        if self.progress is not None:
            self.progress(_report(self.record, self.planner, None))

    def _carry_out_all(self, decisions: list[Decision]) -> list[Event]:
        """Carry the decisions out; several rollbacks at once, each waiting for its own device."""
        if len(decisions) == 1:
            return self._carry_out(decisions[0])
        with ThreadPoolExecutor(max_workers=min(len(decisions), ROLLBACKS_AT_ONCE)) as pool:
            return [event for said in pool.map(self._carry_out, decisions) for event in said]

    def _carry_out(self, decision: Decision) -> list[Event]:
        if isinstance(decision, Start):
            log.info(
                "rollout %s: wave %d: starting %d device(s)", self.record.id, decision.wave, len(decision.device_ids)
            )
            outcomes = deploy_many(
                self.client,
                self.registry,
                list(decision.device_ids),
                Path(self.record.bundle_path),
                self.options,
                clock=self.clock,
                router=self.router,
            )
            return [e for o in outcomes for e in self._outcome_events(o)]
        if isinstance(decision, RollBack):
            return [self._roll_back(decision)]
        if isinstance(decision, Aborted):
            log.warning("rollout %s aborted: %s", self.record.id, decision.reason)
        elif isinstance(decision, Completed):
            log.info("rollout %s completed", self.record.id)
        return []

    def _outcome_events(self, outcome: DeployOutcome) -> list[Event]:
        d = outcome.device_id
        if outcome.state == "installed":
            return [Installed(d), Confirmed(d, *_measured(outcome.metrics))]
        if outcome.state == "deferred":
            return [Deferred(d)]
        error = outcome.error
        if already_runs(outcome):
            # It runs this very version already (it installed while no runner listened): it is done.
            return [Installed(d), Confirmed(d, *self._stored_measurement(d))]
        return [Failed(d, error.code if error is not None else "failed", error.message if error is not None else "")]

    def _stored_measurement(self, device_id: str) -> tuple[float | None, int | None]:
        for m in self.registry.latest_metrics(device_id, self.record.bundle_name, periodic=False):
            if m.bundle_version == self.record.bundle_version:
                return _measured(m.report)
        return None, None

    def _roll_back(self, decision: RollBack) -> RolledBack:
        name, to = self.record.bundle_name, decision.to_version
        if to is None:
            make: Callable[[str, dict[str, object]], Any] = lambda cid, f: RemoveCommand(cid, name, **f)  # type: ignore[arg-type]  # noqa: E731
        else:
            make = lambda cid, f: RollbackCommand(cid, name, to, **f)  # type: ignore[arg-type]  # noqa: E731
        assert self.options.authority is not None  # checked in __init__
        try:
            event = run_command(
                self.client,
                decision.device_id,
                make,
                self.options.authority,
                self.settings.command_timeout_s,
                router=self.router,
            )
        except EdgeError as exc:
            log.warning("rollout %s: rolling %s back failed: %s", self.record.id, decision.device_id, exc)
            return RolledBack(decision.device_id, False, exc.code)
        if event.kind == EventKind.DONE:
            return RolledBack(decision.device_id, True)
        return RolledBack(decision.device_id, False, error_of(event).code)

    # -- what devices say --

    def _statuses(self) -> dict[str, DeviceStatus]:
        out = {}
        for device_id in self.planner.devices:
            status = self.router.last_status(device_id)
            if status is not None:
                out[device_id] = status
        return out

    def _status_events(self) -> list[Event]:
        events: list[Event] = []
        for device_id, status in self._statuses().items():
            if self._heard.get(device_id) is status:
                continue
            self._heard[device_id] = status
            try:
                record_message(self.registry, status, self.clock(), self._broker)
            except StorageError as exc:
                log.warning("status of %s not recorded: %s", device_id, exc)
            self._status_changed.add(device_id)
            dev = self.planner.devices[device_id]
            refs = active_bundles(status)
            runs = next((b.version for b in refs or () if b.name == self.record.bundle_name), None)
            if refs is not None and dev.state == "queued" and dev.attempts == 0:
                row = self.registry.get_device(device_id, self._broker) or self.registry.get_device(device_id)
                if row is not None:
                    events.append(Observed(_target(self.registry, row, self.record.bundle_name, self.clock(), refs)))
            if runs == self.record.bundle_version and dev.state in ("in_flight", "deferred", "retry"):
                # It installed while nobody listened (a deferred install, or a runner killed mid-wave).
                events += [Installed(device_id), Confirmed(device_id, *self._stored_measurement(device_id))]
        return events

    def _presence_events(self) -> list[Event]:
        """Online / Offline from each device's liveness in the registry (its statuses and the heartbeats heard).

        Heartbeats this runner hears are recorded first. Devices whose status changed are
        judged at once; every device not yet started (or to be retried) every
        ``liveness_check_s``, so one that fell silent is held back as offline.
        """
        for heartbeat, heard_at in self.router.take_heartbeats():
            if heartbeat.device_id in self.planner.devices:
                try:
                    record_message(self.registry, heartbeat, heard_at, self._broker)
                except StorageError as exc:
                    log.warning("heartbeat of %s not recorded: %s", heartbeat.device_id, exc)
        now = self.clock()
        ids = set(self._status_changed)
        self._status_changed.clear()
        if time.monotonic() - self._liveness_checked >= self.settings.liveness_check_s:
            self._liveness_checked = time.monotonic()
            ids.update(d.device_id for d in self.planner.devices.values() if d.state in ("queued", "retry"))
        states: dict[str, str] = {}
        for device_id in ids:
            row = self.registry.get_device(device_id, self._broker) or self.registry.get_device(device_id)
            if row is not None:
                states[device_id] = device_liveness(row, now, self.settings.stale_factor)
                if states[device_id] == "stale":
                    self._stale[device_id] = row.heartbeat_s or 0.0
                else:
                    self._stale.pop(device_id, None)
        return presence_events((self.planner.devices[d] for d in sorted(ids) if d in self.planner.devices), states)

    def _joined(self) -> list[Event]:
        try:
            devices = select_devices(self.registry, self.record.selector)
        except ConfigError:
            return []
        return [
            Joined(_target(self.registry, d, self.record.bundle_name, self.clock()))
            for d in devices
            if d.device_id not in self.planner.devices
        ]

    def _final_report(self) -> RolloutReport:
        """The report once the devices' statuses agree with where the rollout left them (or ``settle_s`` passed)."""
        expect = {
            d.device_id: (self.record.bundle_version if d.state == "succeeded" else d.previous_version)
            for d in self.planner.devices.values()
            if d.state in ("succeeded", "rolled_back")
        }
        deadline = time.monotonic() + self.settings.settle_s
        while True:
            heard = self._statuses()
            report = rollout_report(self.registry, self.record.id, heard)
            agree = all(e.runs == expect[e.device_id] for e in report.devices if e.device_id in expect and e.heard)
            if agree or time.monotonic() > deadline:
                for status in heard.values():
                    record_message(self.registry, status, self.clock(), self._broker)
                return report
            time.sleep(0.1)


_OPERATOR_EVENTS: dict[str, Event] = {"pause": Pause(), "resume": Resume(), "abort": Abort()}


def _runner_gone(runner: str | None) -> bool:
    """Whether ``runner`` (``host:pid``) was a process on this host that no longer runs (it was killed)."""
    if runner is None:
        return True
    host, _, pid = runner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def operator_request(registry: Registry, rollout_id: str, what: str, now: float) -> RolloutRecord:
    """Leave pause, resume or abort for the rollout's runner; a rollout that has ended takes none.

    Raises:
        ConfigError: no such rollout, an unknown request, or the rollout has ended.
    """
    store = RolloutStore(registry)
    record = store.get(rollout_id)
    if record.status in ("aborted", "completed"):
        raise ConfigError(f"rollout {rollout_id} has {record.status}; it takes no {what}", rollout_id=rollout_id)
    return store.request(rollout_id, what, now)


def runner_is_live(record: RolloutRecord, now: float, settings: RunSettings = RunSettings()) -> bool:
    """Whether a runner holds a fresh lease on the rollout (it will act on requests itself)."""
    if record.runner is None or record.runner_seen is None or _runner_gone(record.runner):
        return False
    return now - record.runner_seen < settings.lease_stale_s


def rollout_ids(registry: Registry, limit: int = 50) -> Sequence[RolloutRecord]:
    """The latest rollouts, newest first."""
    return RolloutStore(registry).list(limit)
