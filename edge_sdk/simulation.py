"""A simulated fleet's faults and stand-in measurements, as pure values.

``edgectl sim`` runs many real agents on one machine and injects faults into them. What
goes wrong where and when is decided here, from values only, so that a test or a rollout
benchmark can say beforehand exactly which devices will fail:

- a :class:`Fault` names a kind (:data:`FAULT_KINDS`), which devices (a share of the fleet
  or of the devices it lists in ``among``, picked with a seed, or a list of ids) and when
  (``after_s`` .. ``until_s``, seconds since the fleet started; for install failures and
  regressions also which bundle version), and its parameters;
- :meth:`FaultPlan.resolve` turns a plan and the fleet's device ids into one
  :class:`DeviceFaults` per device: the faults that apply to it, nothing to pick any more;
- :class:`DeviceFaults` answers, for a time (and a bundle version), whether an install
  fails, whether the device is offline, its link is down or slow, its update gate closed,
  and by what factor its latency or memory regresses.

The agent's shell acts on those answers in its real code paths (the installer raises what a
full disk raises, the gate file exists, the link proxy drops the connection); nothing here
does I/O. :class:`LatencyModel` is the stand-in runtime's latency distribution.

Kinds and their parameters::

    install-fail   rate (share of this device's installs that fail, default 1), version (only installs of it)
    slow-link      rate (bytes/s from the broker to the device)
    drop-link      every_s, for_s (the link is cut for for_s every every_s)
    offline        every_s, for_s (the device is switched off for for_s every every_s)
    gate-closed    (the update gate is closed: installs are deferred)
    latency        factor, version (p50..p99 multiplied for that bundle version)
    rss            factor, version (the model's memory multiplied for that bundle version)

Text form (``edgectl sim --fault``): ``KIND:key=value,key=value``; devices as
``devices=id1+id2``, the pool a share is picked from as ``among=id1+id2``; e.g.
``install-fail:share=0.05,after=120``, ``latency:share=0.1,factor=2,version=2`` or
``install-fail:share=0.05,among=sim-00070+sim-00071+...,version=3`` (5% of those devices,
exactly, fail installing v3: how a rollout benchmark makes one wave fail and no other).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from edge_sdk.errors import ConfigError

__all__ = ["FAULT_KINDS", "DeviceFaults", "Fault", "FaultPlan", "LatencyModel", "parse_fault"]

FAULT_KINDS = ("install-fail", "slow-link", "drop-link", "offline", "gate-closed", "latency", "rss")
_PERIODIC = ("drop-link", "offline")
_FACTORS = ("latency", "rss")
_NUMBERS = ("share", "after", "until", "rate", "every", "for", "factor")


@dataclass(frozen=True)
class Fault:
    """One injected fault: what, on which devices, when.

    Attributes:
        kind: one of :data:`FAULT_KINDS`.
        share: the share of the fleet (or of ``among``) it hits (0..1), picked with the plan's
            seed; or None.
        devices: the device ids it hits (with ``share``: those and a share of the rest).
        among: the devices ``share`` is a share of (empty: the whole fleet).
        after_s: from this many seconds after the fleet started.
        until_s: until then (None: for ever).
        rate: install-fail: the share of installs that fail; slow-link: bytes per second.
        every_s, for_s: drop-link and offline: the period and how long each outage lasts.
        factor: latency and rss: the multiplier.
        version: install-fail, latency, rss: only for this bundle version (None: every one).

    Raises:
        ConfigError: a parameter is missing, out of range, or does not belong to the kind.
    """

    kind: str
    share: float | None = None
    devices: tuple[str, ...] = ()
    among: tuple[str, ...] = ()
    after_s: float = 0.0
    until_s: float | None = None
    rate: float | None = None
    every_s: float | None = None
    for_s: float | None = None
    factor: float | None = None
    version: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "among", tuple(self.among))
        k = self.kind
        if k not in FAULT_KINDS:
            raise ConfigError(f"unknown fault {k!r}; expected one of {', '.join(FAULT_KINDS)}", key="fault")
        if self.share is None and not self.devices:
            raise ConfigError(f"fault {k}: say which devices (share=0..1 or devices=id+id)", key="fault")
        if self.share is not None and not 0 <= self.share <= 1:
            raise ConfigError(f"fault {k}: share must be within 0..1, got {self.share!r}", key="fault")
        if self.among and self.share is None:
            raise ConfigError(f"fault {k}: among=... names the devices a share is picked from; give share", key="fault")
        if self.after_s < 0 or (self.until_s is not None and self.until_s <= self.after_s):
            raise ConfigError(f"fault {k}: after must be >= 0 and until later than after", key="fault")
        if k == "install-fail" and self.rate is not None and not 0 < self.rate <= 1:
            raise ConfigError(f"fault {k}: rate is the share of installs that fail, within (0, 1]", key="fault")
        if k == "slow-link" and not (self.rate is not None and self.rate > 0):
            raise ConfigError("fault slow-link: give rate=BYTES_PER_S (more than 0)", key="fault")
        if k in _PERIODIC and not (
            self.every_s is not None and self.for_s is not None and 0 < self.for_s < self.every_s
        ):
            raise ConfigError(f"fault {k}: give every=S and for=S with 0 < for < every", key="fault")
        if k in _FACTORS and not (self.factor is not None and self.factor > 0):
            raise ConfigError(f"fault {k}: give factor=X (more than 0)", key="fault")
        unused = [
            name
            for name, value, kinds in (
                ("rate", self.rate, ("install-fail", "slow-link")),
                ("every", self.every_s, _PERIODIC),
                ("for", self.for_s, _PERIODIC),
                ("factor", self.factor, _FACTORS),
                ("version", self.version, ("install-fail", *_FACTORS)),
            )
            if value is not None and k not in kinds
        ]
        if unused:
            raise ConfigError(f"fault {k} takes no {', '.join(unused)}", key="fault")

    def active(self, t: float) -> bool:
        """Whether the fault's time window holds ``t`` (seconds since the fleet started)."""
        return t >= self.after_s and (self.until_s is None or t < self.until_s)

    def in_outage(self, t: float) -> bool:
        """drop-link and offline: whether ``t`` falls in one of the outages."""
        if not self.active(t) or self.every_s is None or self.for_s is None:
            return False
        return (t - self.after_s) % self.every_s < self.for_s

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for name in ("share", "after_s", "until_s", "rate", "every_s", "for_s", "factor", "version"):
            value = getattr(self, name)
            if value is not None and not (name == "after_s" and value == 0):
                out[name] = value
        if self.devices:
            out["devices"] = list(self.devices)
        if self.among:
            out["among"] = list(self.among)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fault:
        """Read :meth:`to_dict`'s form.

        Raises:
            ConfigError: a field is unknown or has the wrong type.
        """
        known = {"kind", "share", "devices", "among", "after_s", "until_s", "rate", "every_s", "for_s", "factor",
                 "version"}  # fmt: skip
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown fault field(s): {', '.join(sorted(unknown))}", key="fault")
        try:
            return cls(**{**d, "devices": tuple(d.get("devices", ())), "among": tuple(d.get("among", ()))})
        except TypeError as exc:
            raise ConfigError(f"bad fault {dict(d)!r}: {exc}", key="fault") from exc


def parse_fault(text: str) -> Fault:
    """A fault from its text form, ``KIND:key=value,...`` (see the module's docstring).

    Raises:
        ConfigError: the text does not name a valid fault.
    """
    kind, _, rest = text.partition(":")
    values: dict[str, Any] = {"kind": kind.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"fault {text!r}: {part!r} is not key=value", key="fault")
        if key in ("devices", "among"):
            values[key] = tuple(v for v in value.split("+") if v)
        elif key == "version":
            try:
                values["version"] = int(value)
            except ValueError as exc:
                raise ConfigError(f"fault {text!r}: version must be an integer", key="fault") from exc
        elif key in _NUMBERS:
            try:
                number = float(value)
            except ValueError as exc:
                raise ConfigError(f"fault {text!r}: {key} must be a number, got {value!r}", key="fault") from exc
            if not math.isfinite(number):
                raise ConfigError(f"fault {text!r}: {key} must be finite", key="fault")
            name = key if key in ("share", "rate", "factor") else f"{key}_s"
            values[name] = number
        else:
            raise ConfigError(f"fault {text!r}: unknown key {key!r}", key="fault")
    return Fault(**values)


def _unit(*parts: object) -> float:
    """A number in [0, 1) that depends only on ``parts`` (a seeded draw without state)."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class DeviceFaults:
    """The faults that apply to one device, and the answers for a time and a bundle version.

    Attributes:
        device_id: the device.
        faults: its faults (their selections already applied).
        seed: the plan's seed (install-fail at a rate draws with it).
    """

    device_id: str
    faults: tuple[Fault, ...] = ()
    seed: int = 0

    def _of(self, kind: str) -> list[Fault]:
        return [f for f in self.faults if f.kind == kind]

    def install_fails(self, t: float, attempt: int = 1, version: int | None = None) -> bool:
        """Whether this device's install number ``attempt`` (from 1), at ``t``, of bundle ``version``, fails.

        The same question always gets the same answer: a rate is drawn from the seed, the
        device and the attempt. A fault for one version fails only installs of that version
        (``version`` None: not known, so such a fault does not apply).
        """
        for i, f in enumerate(self.faults):
            if f.kind != "install-fail" or not f.active(t) or f.version not in (None, version):
                continue
            if f.rate is None or _unit(self.seed, i, self.device_id, attempt) < f.rate:
                return True
        return False

    def offline(self, t: float) -> bool:
        """Whether the device is switched off at ``t``."""
        return any(f.in_outage(t) for f in self._of("offline"))

    def link_down(self, t: float) -> bool:
        """Whether the device's link to the broker is cut at ``t``."""
        return any(f.in_outage(t) for f in self._of("drop-link"))

    def link_rate(self, t: float) -> float | None:
        """Bytes per second the link carries to the device at ``t`` (the slowest fault's), or None: no limit."""
        rates = [f.rate for f in self._of("slow-link") if f.active(t) and f.rate is not None]
        return min(rates) if rates else None

    def gate_closed(self, t: float) -> bool:
        """Whether the device's update gate is closed at ``t``."""
        return any(f.active(t) for f in self._of("gate-closed"))

    def factor(self, kind: str, version: int, t: float = math.inf) -> float:
        """The regression factor of ``kind`` (``latency`` or ``rss``) for ``version`` (1.0: none)."""
        out = 1.0
        for f in self._of(kind):
            if f.factor is not None and f.version in (None, version) and t >= f.after_s:
                out *= f.factor
        return out

    @property
    def needs_link_proxy(self) -> bool:
        """Whether the device's connection must pass a proxy that can slow or cut it."""
        return any(f.kind in ("slow-link", "drop-link") for f in self.faults)

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "seed": self.seed, "faults": [f.to_dict() for f in self.faults]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceFaults:
        return cls(str(d["device_id"]), tuple(Fault.from_dict(f) for f in d.get("faults", ())), int(d.get("seed", 0)))


@dataclass(frozen=True)
class FaultPlan:
    """Faults for a fleet, and the seed that picks their devices.

    Attributes:
        faults: in the order given.
        seed: picks shares of the fleet and draws install failures at a rate.
    """

    faults: tuple[Fault, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "faults", tuple(self.faults))

    def devices_of(self, index: int, device_ids: Sequence[str]) -> frozenset[str]:
        """The devices fault number ``index`` hits: its listed ones, and its share of the fleet.

        A share picks ``round(share * N)`` devices of the ``N`` given, or of the ``N`` the
        fault names in ``among`` (sorted, then sampled with the seed and the fault's index),
        so the same plan hits the same devices.

        Raises:
            ConfigError: the fault lists (in ``devices`` or ``among``) a device the fleet does not have.
        """
        fault = self.faults[index]
        fleet = sorted(set(device_ids))
        unknown = (set(fault.devices) | set(fault.among)) - set(fleet)
        if unknown:
            raise ConfigError(f"fault {fault.kind} names devices not in the fleet: {', '.join(sorted(unknown))}")
        chosen = set(fault.devices)
        if fault.share is not None:
            pool = sorted(set(fault.among)) if fault.among else fleet
            count = round(fault.share * len(pool))
            chosen |= set(random.Random(f"{self.seed}:{index}:{fault.kind}").sample(pool, count))
        return frozenset(chosen)

    def resolve(self, device_ids: Sequence[str]) -> dict[str, DeviceFaults]:
        """One :class:`DeviceFaults` per device (those without faults too).

        Raises:
            ConfigError: a fault lists a device the fleet does not have.
        """
        hit: dict[str, list[Fault]] = {d: [] for d in device_ids}
        for i, fault in enumerate(self.faults):
            # resolved: it applies to the device it sits on
            plain = replace(fault, share=None, devices=("*",), among=())
            for d in self.devices_of(i, device_ids):
                hit[d].append(plain)
        return {d: DeviceFaults(d, tuple(fs), self.seed) for d, fs in hit.items()}

    @classmethod
    def of(cls, texts: Iterable[str], seed: int = 0) -> FaultPlan:
        """A plan from faults' text forms (:func:`parse_fault`)."""
        return cls(tuple(parse_fault(t) for t in texts), seed)


@dataclass(frozen=True)
class LatencyModel:
    """The stand-in runtime's latency: log-normal around a median, and the model's memory.

    Attributes:
        median_ms: the median latency of one inference.
        sigma: the log-normal's shape (0: every run takes ``median_ms``).
        model_bytes: the memory the stand-in says the loaded model takes.
    """

    median_ms: float = 5.0
    sigma: float = 0.25
    model_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if not (self.median_ms > 0 and self.sigma >= 0 and self.model_bytes >= 0):
            raise ConfigError("stand-in latency needs median_ms > 0, sigma >= 0 and model_bytes >= 0")

    def draw_s(self, rng: random.Random, factor: float = 1.0) -> float:
        """One inference's latency in seconds, multiplied by ``factor``."""
        return self.median_ms * factor * math.exp(rng.gauss(0.0, self.sigma) if self.sigma else 0.0) / 1000.0

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "sigma": self.sigma, "model_bytes": self.model_bytes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyModel:
        return cls(float(d["median_ms"]), float(d["sigma"]), int(d["model_bytes"]))
