"""A rollout of one bundle to many devices in waves: the pure plan (events in, decisions out).

The shell (:mod:`host_tools.fleet.rollouts`) tells a :class:`RolloutPlanner` what happened
(:meth:`RolloutPlanner.accept`) and does what it answers: start these devices, roll those back,
the rollout aborted or completed. Nothing here touches a socket, a disk or a clock: ``now`` is
passed in, and the whole state is plain data (:class:`DeviceProgress`, :class:`RolloutProgress`)
that the registry stores after every step, so a host restarted mid-rollout carries on from it.

The waves::

    wave 0     the canary: ``canary_count`` devices, or ``canary_share`` of them (at least 1)
    wave 1..   ``wave_size`` devices each, or the canary's size times ``wave_factor`` ** k
               (k = 1, 2, ...); neither: one wave with every other device

The rules:

- **Success** counts only once the device activated the bundle (``installed``: its own health
  check passed) *and* confirmed it with a metrics report (:class:`Confirmed`) that passes the
  host's **health gate**: p99 latency and RSS at most ``max_p99_ratio`` / ``max_rss_ratio``
  times what the device measured on the version it ran before. A device over a bound counts as
  failed (code ``health_gate``) and is rolled back at once to the version it ran before.
- **Failures** are retryable (:data:`RETRYABLE_CODES`: timeout, transport) or permanent
  (refused, the device's health check, the health gate...). A retryable failure is tried again,
  up to ``retries`` times; then, and for a permanent one at once, the device has failed.
  A device that gives no outcome within ``device_timeout_s`` of its start has timed out.
- **Deferred** (the device's update gate said "not now"; it keeps the bundle and installs it
  later by itself) is neither success nor failure; a later confirmation makes it a success.
- **Advance**: wave k+1 starts once the devices of wave k that succeeded reach
  ``success_threshold`` of the wave's devices not deferred and not waiting offline (the others
  may still be in flight). A wave in which every device has settled below that aborts.
- **Abort** the moment the devices failed in one wave exceed ``abort_threshold`` of the wave's
  size, or when the operator says so: queued devices are never started, and every device that
  installed (or installs later, from a transfer still under way) is rolled back to the version
  it ran before (:class:`RollBack`; ``to_version`` None: it ran none, the bundle is removed).
  A device that activated after the abort is still judged by the health gate when its report
  comes (it ends ``rolled_back`` with ``error_code`` ``health_gate``), so the report names
  every device that regressed, not only those judged before the abort.
- **Offline** devices are not started with their wave; they are started when they come back
  online while the rollout runs, within ``lifetime_s`` of its creation (then they are ``missed``).
  A device that is ``stale`` (its last word was online, but it has not been heard within its
  heartbeat interval times a factor: :mod:`host_tools.fleet.liveness`) counts as offline: it
  is not started into silence, and is started once heard again (:func:`presence_events`).
- **Devices joining the selector** mid-rollout (:class:`Joined`) are added to the last wave:
  they start when it starts, or at once if it has started; they never skip the canary's gate.
- **Pause** stops new starts (in-flight devices finish and count); **resume** goes on.
- **Maintenance window** (``window``, UTC minutes of the day): devices start only inside it.
- **Never started twice**: a device is started only from ``queued`` or ``retry``, so it gets
  the bundle again only as a counted retry of a retryable failure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from edge_sdk.errors import ConfigError

__all__ = [
    "DEVICE_STATES",
    "RETRYABLE_CODES",
    "Abort",
    "Aborted",
    "AdvanceWave",
    "Completed",
    "Confirmed",
    "Decision",
    "Deferred",
    "DeviceEvent",
    "DeviceProgress",
    "Event",
    "Failed",
    "Installed",
    "Joined",
    "MaintenanceWindow",
    "Observed",
    "Offline",
    "Online",
    "Pause",
    "Resume",
    "RollBack",
    "RolledBack",
    "RolloutPlanner",
    "RolloutPolicy",
    "RolloutProgress",
    "Start",
    "Target",
    "Tick",
    "TimedOut",
    "presence_events",
    "run_events",
    "wave_sizes",
]

#: Error codes of failures worth trying again: the device or the link did not answer.
RETRYABLE_CODES: frozenset[str] = frozenset(
    {"device_timeout", "transport", "broker_unreachable", "transfer_incomplete"}
)

DeviceState = Literal[
    "queued",  # not started yet
    "in_flight",  # started; no outcome yet
    "installed",  # activated (its own health check passed); waiting for its metrics report
    "succeeded",  # confirmed and through the health gate
    "deferred",  # its update gate deferred the install
    "retry",  # a retryable failure; to be started again
    "failed",  # failed for good (counts against the abort threshold)
    "skipped",  # never started: the rollout aborted first
    "missed",  # offline until the rollout's lifetime ended
    "rolling_back",  # a rollback command is due or under way
    "rolled_back",  # back on the version it ran before
    "rollback_failed",  # the rollback did not succeed
]
#: Every state a device of a rollout may be in.
DEVICE_STATES: frozenset[str] = frozenset(DeviceState.__args__)  # type: ignore[attr-defined]

RolloutStatus = Literal["running", "paused", "aborted", "completed"]

_OPEN = frozenset({"queued", "in_flight", "installed", "retry"})  # not settled yet
_ACTIVATED = frozenset({"installed", "succeeded"})  # runs the new version now


@dataclass(frozen=True)
class MaintenanceWindow:
    """Minutes of the day (UTC) in which devices may be started; ``end < start`` wraps past midnight."""

    start_minute: int
    end_minute: int

    def __post_init__(self) -> None:
        if not (0 <= self.start_minute < 1440 and 0 <= self.end_minute < 1440) or self.start_minute == self.end_minute:
            raise ConfigError("a maintenance window is two different times of day, HH:MM-HH:MM")

    @classmethod
    def parse(cls, text: str) -> MaintenanceWindow:
        """``HH:MM-HH:MM`` (UTC).

        Raises:
            ConfigError: not that form, or an impossible time.
        """
        try:
            start, end = text.split("-")
            minutes = []
            for part in (start, end):
                hh, mm = part.strip().split(":")
                if not (hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60):
                    raise ValueError(part)
                minutes.append(int(hh) * 60 + int(mm))
        except ValueError as exc:
            raise ConfigError(f"maintenance window {text!r} is not HH:MM-HH:MM") from exc
        return cls(minutes[0], minutes[1])

    def contains(self, now: float) -> bool:
        """Whether unix time ``now`` falls inside the window."""
        minute = int(now // 60) % 1440
        if self.start_minute < self.end_minute:
            return self.start_minute <= minute < self.end_minute
        return minute >= self.start_minute or minute < self.end_minute

    def __str__(self) -> str:
        return "-".join(f"{m // 60:02d}:{m % 60:02d}" for m in (self.start_minute, self.end_minute))


@dataclass(frozen=True)
class RolloutPolicy:
    """How a rollout proceeds. Shares are fractions (0.03 is 3%).

    Attributes:
        canary_count: devices in the canary wave; or
        canary_share: the canary's share of the devices (at least one device).
        wave_size: devices per later wave; or
        wave_factor: each later wave is the canary's size times this factor to the power k.
        success_threshold: share of a wave's devices (not deferred, not offline) that must
            succeed before the next wave starts.
        abort_threshold: share of a wave's devices whose failure aborts the rollout.
        device_timeout_s: how long a started device has to report its outcome.
        window: when devices may be started; None: at any time.
        max_p99_ratio: health gate: most p99 latency against the previous version's; None: none.
        max_rss_ratio: health gate: most peak RSS against the previous version's; None: none.
        retries: how many times a retryable failure is tried again.
        lifetime_s: how long after its creation offline devices are still waited for.
    """

    canary_count: int | None = None
    canary_share: float | None = 0.01
    wave_size: int | None = None
    wave_factor: float | None = 2.0
    success_threshold: float = 0.95
    abort_threshold: float = 0.05
    device_timeout_s: float = 900.0
    window: MaintenanceWindow | None = None
    max_p99_ratio: float | None = 1.5
    max_rss_ratio: float | None = 1.5
    retries: int = 2
    lifetime_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if (self.canary_count is None) == (self.canary_share is None):
            raise ConfigError("a rollout's canary is a count or a share, not both and not neither")
        if self.canary_count is not None and self.canary_count < 1:
            raise ConfigError(f"a canary of {self.canary_count} devices: it needs at least 1")
        if self.canary_share is not None and not 0 < self.canary_share <= 1:
            raise ConfigError(f"a canary share of {self.canary_share:.4g}: it must be more than 0% and at most 100%")
        if self.wave_size is not None and self.wave_factor is not None:
            raise ConfigError("waves are of a fixed size or grow by a factor, not both")
        if self.wave_size is not None and self.wave_size < 1:
            raise ConfigError(f"a wave of {self.wave_size} devices: it needs at least 1")
        if self.wave_factor is not None and not self.wave_factor >= 1:
            raise ConfigError(f"a wave factor of {self.wave_factor:.4g}: waves must not shrink (at least 1)")
        for name in ("success_threshold", "abort_threshold"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"{name.replace('_', ' ')} {value:.4g} is not a share between 0% and 100%")
        for name in ("max_p99_ratio", "max_rss_ratio"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name.replace('_', ' ')} {value:.4g} must be more than 0")
        if not self.device_timeout_s > 0 or not self.lifetime_s > 0:
            raise ConfigError("the device timeout and the rollout's lifetime must be more than 0 seconds")
        if self.retries < 0:
            raise ConfigError(f"retries {self.retries}: it must not be negative")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; the window as ``HH:MM-HH:MM``."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["window"] = None if self.window is None else str(self.window)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutPolicy:
        """Build from :meth:`to_dict`'s form.

        Raises:
            ConfigError: a value out of range.
        """
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("window") is not None:
            known["window"] = MaintenanceWindow.parse(known["window"])
        return cls(**known)


def wave_sizes(total: int, policy: RolloutPolicy) -> list[int]:
    """The size of each wave for ``total`` devices: the canary first; they add up to ``total``.

    Args:
        total: how many devices the rollout targets.
        policy: canary and wave settings.
    """
    if total <= 0:
        return []
    canary = policy.canary_count if policy.canary_count is not None else math.ceil(total * (policy.canary_share or 0))
    sizes = [min(total, max(1, canary))]
    left, k = total - sizes[0], 1
    while left > 0:
        if policy.wave_size is not None:
            size = policy.wave_size
        elif policy.wave_factor is not None:
            size = max(1, math.ceil(sizes[0] * policy.wave_factor**k))
        else:
            size = left
        sizes.append(min(left, size))
        left -= sizes[-1]
        k += 1
    return sizes


@dataclass(frozen=True)
class Target:
    """A device a rollout targets, and what it ran before (for the health gate and rollbacks).

    Attributes:
        device_id: the device.
        previous_version: the version of the bundle it runs now; None: it runs none.
        base_p99_ms: its p99 latency on that version; None: not known (the gate is not applied).
        base_rss_bytes: its peak RSS on that version; None: not known.
        online: whether it is online as far as the host knows.
    """

    device_id: str
    previous_version: int | None = None
    base_p99_ms: float | None = None
    base_rss_bytes: int | None = None
    online: bool = True


@dataclass
class DeviceProgress:
    """Where one device of a rollout stands; stored per device in the registry.

    Attributes:
        device_id, previous_version, base_p99_ms, base_rss_bytes, online: as in :class:`Target`.
        wave: its wave (0 is the canary).
        state: one of :data:`DEVICE_STATES`.
        attempts: how many times it was started.
        started_at: when its last attempt started.
        finished_at: when it settled.
        error_code: why it failed, or why it is retried.
        p99_ms, rss_bytes: what it measured on the new version.
    """

    device_id: str
    wave: int
    state: str = "queued"
    attempts: int = 0
    previous_version: int | None = None
    base_p99_ms: float | None = None
    base_rss_bytes: int | None = None
    online: bool = True
    started_at: float | None = None
    finished_at: float | None = None
    error_code: str | None = None
    p99_ms: float | None = None
    rss_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.state not in DEVICE_STATES:
            raise ValueError(f"unknown rollout device state {self.state!r}; expected one of {sorted(DEVICE_STATES)}")


@dataclass
class RolloutProgress:
    """Where the rollout as a whole stands; stored in the registry.

    Attributes:
        status: ``running``, ``paused``, ``aborted`` or ``completed``.
        wave: the highest wave started (-1: none yet).
        waves: how many waves the plan has.
        created_at: when the rollout was created (its lifetime counts from here).
        reason: why it aborted.
    """

    status: str = "running"
    wave: int = -1
    waves: int = 0
    created_at: float = 0.0
    reason: str = ""


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceEvent:
    """Something one device did or said."""

    device_id: str


@dataclass(frozen=True)
class Installed(DeviceEvent):
    """The device activated the bundle (its own health check passed)."""


@dataclass(frozen=True)
class Confirmed(DeviceEvent):
    """The device's metrics report on the new version: p99 latency and peak RSS (None: not measured)."""

    p99_ms: float | None = None
    rss_bytes: int | None = None


@dataclass(frozen=True)
class Failed(DeviceEvent):
    """The device (or the link to it) failed: ``code`` is an ``EdgeError.code``."""

    code: str = "failed"
    message: str = ""


@dataclass(frozen=True)
class Deferred(DeviceEvent):
    """The device's update gate deferred the install; it will install later by itself."""


@dataclass(frozen=True)
class TimedOut(DeviceEvent):
    """The shell gave up waiting for the device's outcome."""


@dataclass(frozen=True)
class Online(DeviceEvent):
    """The device came online."""


@dataclass(frozen=True)
class Offline(DeviceEvent):
    """The device went offline."""


@dataclass(frozen=True)
class Joined:
    """A device joined the rollout's selector."""

    target: Target


@dataclass(frozen=True)
class Observed:
    """What a device runs now, as its status says (fresher than the registry the plan was made from).

    Taken only for a device not started yet: its ``previous_version`` and baseline become these.
    """

    target: Target


@dataclass(frozen=True)
class RolledBack:
    """A rollback command's result."""

    device_id: str
    ok: bool
    code: str | None = None


@dataclass(frozen=True)
class Tick:
    """Time passed (timeouts, the window, the lifetime are checked)."""


@dataclass(frozen=True)
class Pause:
    """The operator paused the rollout."""


@dataclass(frozen=True)
class Resume:
    """The operator resumed the rollout."""


@dataclass(frozen=True)
class Abort:
    """The operator aborted the rollout."""

    reason: str = "aborted by the operator"


Event = DeviceEvent | Joined | Observed | RolledBack | Tick | Pause | Resume | Abort


# --- decisions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Send the bundle to these devices (their state is ``in_flight`` already: store it first)."""

    wave: int
    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class RollBack:
    """Send the device a signed rollback to ``to_version`` (None: remove the bundle; it ran none)."""

    device_id: str
    to_version: int | None


@dataclass(frozen=True)
class AdvanceWave:
    """Wave ``wave`` begins."""

    wave: int


@dataclass(frozen=True)
class Aborted:
    """The rollout aborted."""

    reason: str


@dataclass(frozen=True)
class Completed:
    """Every device settled; the rollout is over."""


Decision = Start | RollBack | AdvanceWave | Aborted | Completed


# --- the planner ----------------------------------------------------------------------------


@dataclass
class RolloutPlanner:
    """The state machine of one rollout. Build it with :meth:`plan` or from stored state.

    Attributes:
        policy: how it proceeds.
        progress: the rollout's status and wave.
        devices: every device, by id, in plan order.
        changed: ids of devices whose progress changed since the shell last cleared it
            (what to store).
    """

    policy: RolloutPolicy
    progress: RolloutProgress
    devices: dict[str, DeviceProgress]
    changed: set[str] = field(default_factory=set)

    @classmethod
    def plan(cls, policy: RolloutPolicy, targets: Sequence[Target], now: float) -> RolloutPlanner:
        """A new rollout of ``targets`` (in this order) cut into waves.

        Raises:
            ConfigError: no targets, or a device named twice.
        """
        ids = [t.device_id for t in targets]
        if not ids:
            raise ConfigError("a rollout needs at least one device")
        if len(set(ids)) != len(ids):
            raise ConfigError("a device is named more than once")
        devices: dict[str, DeviceProgress] = {}
        it = iter(targets)
        sizes = wave_sizes(len(ids), policy)
        for wave, size in enumerate(sizes):
            for _ in range(size):
                t = next(it)
                devices[t.device_id] = _progress_of(t, wave)
        planner = cls(policy, RolloutProgress(waves=len(sizes), created_at=now), devices)
        planner.changed = set(devices)
        return planner

    # -- counts --

    def wave_devices(self, wave: int) -> list[DeviceProgress]:
        """The devices of one wave, in plan order."""
        return [d for d in self.devices.values() if d.wave == wave]

    def counts(self, wave: int | None = None) -> dict[str, int]:
        """How many devices are in each state (of one wave, or all)."""
        out: dict[str, int] = {}
        for d in self.devices.values():
            if wave is None or d.wave == wave:
                out[d.state] = out.get(d.state, 0) + 1
        return out

    @property
    def finished(self) -> bool:
        """Whether the rollout is over (aborted or completed); rollbacks may still be under way."""
        return self.progress.status in ("aborted", "completed")

    @property
    def busy(self) -> bool:
        """Whether a device still owes an outcome: in flight, installed unconfirmed, or rolling back."""
        return any(d.state in ("in_flight", "installed", "rolling_back") for d in self.devices.values())

    @property
    def waiting_offline(self) -> list[str]:
        """Devices of a started wave that wait for coming online."""
        return [
            d.device_id
            for d in self.devices.values()
            if d.state in ("queued", "retry") and not d.online and d.wave <= self.progress.wave
        ]

    # -- the one entry point --

    def accept(self, event: Event, now: float) -> list[Decision]:
        """Take one event; return what the shell must do, in order.

        Args:
            event: what happened.
            now: unix time now.

        Returns:
            The decisions; a :class:`Start` lists devices already marked ``in_flight``.
        """
        out: list[Decision] = []
        if isinstance(event, Joined):
            self._join(event.target)
        elif isinstance(event, Observed):
            self._observed(event.target)
        elif isinstance(event, (Pause, Resume, Abort)):
            self._operator(event, out)
        elif isinstance(event, Tick):
            self._tick(now, out)
        elif isinstance(event, RolledBack):
            self._rolled_back(event, now)
        else:
            dev = self.devices.get(event.device_id)
            if dev is not None:
                self._device_event(dev, event, now, out)
        self._step(now, out)
        return out

    # -- device events --

    def _device_event(self, dev: DeviceProgress, event: Event, now: float, out: list[Decision]) -> None:
        if isinstance(event, Online):
            self._set(dev, online=True)
        elif isinstance(event, Offline):
            self._set(dev, online=False)
        elif isinstance(event, Installed):
            if dev.state in ("in_flight", "deferred", "retry"):
                self._set(dev, state="installed")
                if self.progress.status == "aborted":
                    self._roll_back(dev, out)
        elif isinstance(event, Confirmed):
            self._confirmed(dev, event, now, out)
        elif isinstance(event, Deferred):
            if dev.state == "in_flight":
                self._set(dev, state="deferred", finished_at=now)
        elif isinstance(event, (Failed, TimedOut)):
            code = event.code if isinstance(event, Failed) else "device_timeout"
            self._failed(dev, code, now, out)

    def _confirmed(self, dev: DeviceProgress, event: Confirmed, now: float, out: list[Decision]) -> None:
        if dev.state == "rolling_back" and dev.p99_ms is None and dev.rss_bytes is None:
            # It activated after the abort and is on its way back; what it measured still says
            # whether it regressed (the report names it), though it no longer counts.
            self._set(dev, p99_ms=event.p99_ms, rss_bytes=event.rss_bytes)
            if self._regressed(dev):
                self._set(dev, error_code="health_gate")
            return
        if dev.state not in ("installed", "deferred"):
            return  # success needs the activation first
        if dev.state == "deferred":  # a deferred install that landed later, reported by its status
            self._set(dev, state="installed")
        self._set(dev, p99_ms=event.p99_ms, rss_bytes=event.rss_bytes)
        if self.progress.status == "aborted":
            self._roll_back(dev, out)
            return
        if self._regressed(dev):
            self._set(dev, state="failed", error_code="health_gate", finished_at=now)
            out.append(RollBack(dev.device_id, dev.previous_version))
            return
        self._set(dev, state="succeeded", finished_at=now, error_code=None)

    def _regressed(self, dev: DeviceProgress) -> bool:
        return _over(dev.p99_ms, dev.base_p99_ms, self.policy.max_p99_ratio) or _over(
            dev.rss_bytes, dev.base_rss_bytes, self.policy.max_rss_ratio
        )

    def _failed(self, dev: DeviceProgress, code: str, now: float, out: list[Decision]) -> None:
        if dev.state not in ("in_flight", "installed"):
            return
        activated = dev.state == "installed"  # it runs the new version, unconfirmed: it goes back
        retryable = code in RETRYABLE_CODES and not activated
        if retryable and dev.attempts <= self.policy.retries and self.progress.status != "aborted":
            self._set(dev, state="retry", error_code=code)
            return
        self._set(dev, state="failed", error_code=code, finished_at=now)
        if activated:
            out.append(RollBack(dev.device_id, dev.previous_version))

    def _rolled_back(self, event: RolledBack, now: float) -> None:
        dev = self.devices.get(event.device_id)
        if dev is None:
            return
        if dev.state == "rolling_back":
            self._set(dev, state="rolled_back" if event.ok else "rollback_failed", finished_at=now)
            if not event.ok:
                self._set(dev, error_code=event.code)
        elif dev.state == "failed" and dev.error_code == "health_gate" and not event.ok:
            self._set(dev, error_code=f"health_gate; rollback failed: {event.code}")

    def _observed(self, t: Target) -> None:
        dev = self.devices.get(t.device_id)
        if dev is not None and dev.state == "queued" and dev.attempts == 0:
            before = (t.previous_version, t.base_p99_ms, t.base_rss_bytes)
            if (dev.previous_version, dev.base_p99_ms, dev.base_rss_bytes) != before:
                self._set(dev, previous_version=before[0], base_p99_ms=before[1], base_rss_bytes=before[2])

    def _join(self, target: Target) -> None:
        if target.device_id in self.devices or self.finished:
            return
        last = max(self.progress.waves - 1, 0)
        self.devices[target.device_id] = _progress_of(target, last)
        self.changed.add(target.device_id)

    # -- operator --

    def _operator(self, event: Pause | Resume | Abort, out: list[Decision]) -> None:
        if self.finished:
            return
        if isinstance(event, Pause):
            self.progress.status = "paused"
        elif isinstance(event, Resume):
            self.progress.status = "running"
        else:
            self._abort(event.reason, out)

    def _abort(self, reason: str, out: list[Decision]) -> None:
        self.progress.status, self.progress.reason = "aborted", reason
        out.append(Aborted(reason))
        for dev in self.devices.values():
            if dev.state in ("queued", "retry"):
                self._set(dev, state="skipped")
            elif dev.state in _ACTIVATED:
                self._roll_back(dev, out)

    def _roll_back(self, dev: DeviceProgress, out: list[Decision]) -> None:
        self._set(dev, state="rolling_back")
        out.append(RollBack(dev.device_id, dev.previous_version))

    # -- time --

    def _tick(self, now: float, out: list[Decision]) -> None:
        for dev in self.devices.values():
            started = dev.started_at
            if (
                dev.state in ("in_flight", "installed")
                and started is not None
                and now - started >= self.policy.device_timeout_s
            ):
                self._failed(dev, "device_timeout", now, out)
        if now - self.progress.created_at >= self.policy.lifetime_s and not self.finished:
            for dev in self.devices.values():
                if dev.state in ("queued", "retry"):
                    self._set(dev, state="missed", finished_at=now)

    # -- what follows --

    def _step(self, now: float, out: list[Decision]) -> None:
        """Check the thresholds, then start what may start, advance, or complete."""
        if self.finished:
            return
        for wave in range(self.progress.wave + 1):
            devs = self.wave_devices(wave)
            failed = sum(1 for d in devs if d.state == "failed")
            if failed and failed > self.policy.abort_threshold * len(devs):
                share = failed / len(devs)
                self._abort(
                    f"wave {wave}: {failed} of {len(devs)} devices failed ({share:.1%}), "
                    f"more than the abort threshold of {self.policy.abort_threshold:.1%}",
                    out,
                )
                return
        if self.progress.status != "running":
            return
        if self.progress.wave < 0:
            self._advance(out)
        while self.progress.wave + 1 < self.progress.waves:
            verdict = self._wave_verdict(self.progress.wave)
            if verdict == "abort":
                self._abort_short(out)
                return
            if verdict != "advance":
                break
            self._advance(out)
        self._start_due(now, out)
        if self.progress.wave + 1 >= self.progress.waves and not any(d.state in _OPEN for d in self.devices.values()):
            if self.progress.wave == self.progress.waves - 1 and self._wave_verdict(self.progress.wave) == "abort":
                self._abort_short(out)
                return
            self.progress.status = "completed"
            out.append(Completed())

    def _abort_short(self, out: list[Decision]) -> None:
        """Abort because the current wave settled with too few successes."""
        devs = self.wave_devices(self.progress.wave)
        ok = sum(1 for d in devs if d.state == "succeeded")
        self._abort(
            f"wave {self.progress.wave}: {ok} of {len(devs)} devices succeeded, "
            f"below the success threshold of {self.policy.success_threshold:.1%}",
            out,
        )

    def _wave_verdict(self, wave: int) -> str:
        """``advance``, ``wait`` or ``abort`` (every device settled, too few succeeded)."""
        devs = self.wave_devices(wave)
        waiting_offline = [d for d in devs if d.state in ("queued", "retry") and not d.online]
        counted = [d for d in devs if d.state != "deferred" and d not in waiting_offline and d.state != "missed"]
        ok = sum(1 for d in counted if d.state == "succeeded")
        need = math.ceil(self.policy.success_threshold * len(counted) - 1e-9)
        if ok >= need:
            return "advance"
        if any(d.state in _OPEN for d in counted):
            return "wait"
        return "abort"

    def _advance(self, out: list[Decision]) -> None:
        self.progress.wave += 1
        out.append(AdvanceWave(self.progress.wave))

    def _start_due(self, now: float, out: list[Decision]) -> None:
        window = self.policy.window
        if window is not None and not window.contains(now):
            return
        if now - self.progress.created_at >= self.policy.lifetime_s:
            return
        by_wave: dict[int, list[str]] = {}
        for dev in self.devices.values():
            if dev.state in ("queued", "retry") and dev.online and dev.wave <= self.progress.wave:
                self._set(dev, state="in_flight", attempts=dev.attempts + 1, started_at=now, finished_at=None)
                by_wave.setdefault(dev.wave, []).append(dev.device_id)
        for wave in sorted(by_wave):
            out.append(Start(wave, tuple(by_wave[wave])))

    def _set(self, dev: DeviceProgress, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(dev, k, v)
        self.changed.add(dev.device_id)

    def take_changed(self) -> list[DeviceProgress]:
        """The devices changed since the last call (to store), and forget them."""
        out = [self.devices[d] for d in self.devices if d in self.changed]
        self.changed.clear()
        return out


def _over(measured: float | None, before: float | None, bound: float | None) -> bool:
    """Whether ``measured`` is more than ``bound`` times ``before`` (False when any is unknown)."""
    return bound is not None and measured is not None and bool(before) and measured > bound * before  # type: ignore[operator]


def _progress_of(target: Target, wave: int) -> DeviceProgress:
    return DeviceProgress(
        device_id=target.device_id,
        wave=wave,
        previous_version=target.previous_version,
        base_p99_ms=target.base_p99_ms,
        base_rss_bytes=target.base_rss_bytes,
        online=target.online,
    )


def presence_events(devices: Iterable[DeviceProgress], states: Mapping[str, str]) -> list[Event]:
    """:class:`Online` / :class:`Offline` for each device whose liveness differs from what the plan holds.

    Only ``online`` counts as online: a device ``stale`` (not heard within its heartbeat
    interval times a factor) is treated as ``offline``, so its wave does not start it into
    silence; it is started when it is heard again (within the rollout's lifetime).

    Args:
        devices: the rollout's devices.
        states: liveness by device id (:data:`~host_tools.fleet.liveness.LIVENESS_STATES`);
            a device not in it is left as it is.

    Returns:
        The events, in the order of ``devices``.
    """
    out: list[Event] = []
    for dev in devices:
        state = states.get(dev.device_id)
        if state is None:
            continue
        online = state == "online"
        if online != dev.online:
            out.append(Online(dev.device_id) if online else Offline(dev.device_id))
    return out


def run_events(planner: RolloutPlanner, events: Iterable[tuple[Event, float]]) -> list[Decision]:
    """Feed many events in order; all the decisions (for tests and replays)."""
    out: list[Decision] = []
    for event, now in events:
        out.extend(planner.accept(event, now))
    return out
