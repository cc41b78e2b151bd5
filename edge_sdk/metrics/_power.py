"""Power and energy: real sensors where the hardware has them, a labelled estimate where not.

Every source measures energy over a window: ``token = source.start()`` ...
``source.stop(token)`` gives an :class:`EnergyMeasurement` (or use
:class:`EnergyWindow` as a context manager). Every reading says where it came from
(``source``) and whether it is a real measurement (``estimated``), so a report can
never pass an estimate off as a measurement.

Sources, in the order :func:`detect_power_source` tries them:

- :class:`RaplSource`: Intel/AMD RAPL package energy counters
  (``/sys/class/powercap/intel-rapl:N/energy_uj``), counter wrap handled. Since
  2020 most kernels make these root-only; unreadable means absent.
- :class:`Ina3221Source`: the INA3221 rail monitors of NVIDIA Jetson boards, read
  through hwmon (JetPack 5 and later).
- :class:`Pi5PmicSource`: the Raspberry Pi 5's PMIC rail monitors, read with
  ``vcgencmd pmic_read_adc`` through an injected command runner (probed only when the
  platform is a Pi 5).
- :class:`BatterySource`: a discharging battery (Android phones, laptops) through
  ``/sys/class/power_supply``.
- :class:`EstimatedSource`: ``idle + (max - idle) * CPU utilisation`` from a table
  of rough per-device figures; ``estimated=True``.

Sensors that give instantaneous power (battery, INA3221) are sampled by a background
thread every ``interval_s`` plus once at start and once at stop; the window's power
is the mean of those samples and its energy is that mean times the window length.

A window too short for its source has no figure: a sampled sensor's window shorter
than its sampling interval, or an estimate whose CPU share could not be measured (see
:mod:`edge_sdk.metrics._cpu`). Its :class:`EnergyMeasurement` says why in
``insufficient_data``, and the :class:`PowerMeasurement` built from it carries ``None``
for joules and watts instead of the idle or full-load figure of the model.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from edge_sdk.errors import ConfigError, MessageError
from edge_sdk.metrics._cpu import CpuSampler
from edge_sdk.metrics._fields import (
    as_mapping,
    optional_number,
    optional_str,
    plain_dict,
    read_bool,
    read_number,
    read_str,
    unknown,
)
from edge_sdk.metrics._window import MeasurementWindow, SamplingThread

__all__ = [
    "POWER_MODELS",
    "BatterySource",
    "EnergyMeasurement",
    "EnergyWindow",
    "EstimatedSource",
    "Ina3221Source",
    "Pi5PmicSource",
    "PowerMeasurement",
    "PowerModel",
    "PowerReading",
    "PowerSource",
    "RaplSource",
    "detect_power_source",
    "parse_pmic_adc",
    "power_model_for",
    "rapl_delta_uj",
]

logger = logging.getLogger(__name__)

# Files that exist but cannot be read (root-only RAPL, odd drivers) mean "not present".
_UNREADABLE = (OSError, ValueError)


@dataclass(frozen=True)
class PowerReading:
    """Instantaneous power draw.

    Attributes:
        watts: power in watts.
        source: where it came from: ``"rapl"``, ``"ina3221"``, ``"battery"`` or
            ``"estimate:<model>"``.
        estimated: ``True`` when computed from a model rather than measured.
    """

    watts: float
    source: str
    estimated: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, always including ``estimated``."""
        return asdict(self)


@dataclass(frozen=True)
class EnergyMeasurement:
    """Energy used over a window.

    Attributes:
        joules: energy in joules.
        seconds: window length.
        watts: mean power, ``joules / seconds`` (0 for an empty window).
        source: as in :class:`PowerReading`.
        estimated: ``True`` when computed from a model rather than measured.
        insufficient_data: why ``joules`` and ``watts`` mean nothing (the window was too
            short for the source), or ``None``.
    """

    joules: float
    seconds: float
    watts: float
    source: str
    estimated: bool
    insufficient_data: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, always including ``estimated``; ``insufficient_data`` only when set."""
        out = asdict(self)
        if self.insufficient_data is None:
            del out["insufficient_data"]
        return out


@dataclass(frozen=True)
class PowerMeasurement:
    """Power and energy over a benchmark window, per inference too: the ``power`` of a metrics report.

    Attributes:
        joules, seconds, watts, source, estimated: as in :class:`EnergyMeasurement`.
        joules_per_inference: ``joules`` over every run in the window (warm-up included).
        insufficient_data: why there are no figures (``joules``, ``watts`` and
            ``joules_per_inference`` are ``None``), or ``None``.
        extra: fields from a newer peer, kept and written back, never read.

    Raises:
        MessageError: a negative quantity.
    """

    joules: float | None
    seconds: float
    watts: float | None
    source: str
    estimated: bool
    joules_per_inference: float | None
    insufficient_data: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        figures = [v for v in (self.joules, self.watts, self.joules_per_inference) if v is not None]
        if min([self.seconds, *figures]) < 0:
            raise MessageError("power and energy must not be negative", field="power")
        if self.watts is None and not self.insufficient_data:
            raise MessageError("a power measurement without watts must say why (insufficient_data)", field="watts")

    @classmethod
    def from_energy(cls, energy: EnergyMeasurement, inferences: int) -> PowerMeasurement:
        """The window's energy, and its share per inference; no figures when the window had too little data.

        Args:
            energy: what the power source measured over the window.
            inferences: runs in the window (warm-up and timed); at least 1 is assumed.

        Returns:
            The measurement.
        """
        if energy.insufficient_data:
            return cls(
                joules=None,
                seconds=energy.seconds,
                watts=None,
                source=energy.source,
                estimated=energy.estimated,
                joules_per_inference=None,
                insufficient_data=energy.insufficient_data,
            )
        return cls(
            joules=energy.joules,
            seconds=energy.seconds,
            watts=energy.watts,
            source=energy.source,
            estimated=energy.estimated,
            joules_per_inference=energy.joules / max(1, inferences),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, always including ``estimated``, with the kept unknown fields;
        ``insufficient_data`` only when set, so a report with figures reads as it always did."""
        return plain_dict(self, omit_none=("insufficient_data",))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PowerMeasurement:
        """Rebuild from :meth:`to_dict` output, e.g. a device's metrics report.

        A report that does not say whether its power was estimated is read as
        estimated: an estimate is never passed off as a measurement.

        Args:
            data: the mapping to read; unknown keys are kept in ``extra``.

        Returns:
            The measurement.

        Raises:
            MessageError: a field is missing, of the wrong type or negative.
        """
        where = "power"
        data = as_mapping(data, where)
        return cls(
            joules=optional_number(data, "joules", where),
            seconds=read_number(data, "seconds", where),
            watts=optional_number(data, "watts", where),
            source=read_str(data, "source", where),
            estimated=read_bool(data, "estimated", where, default=True),
            joules_per_inference=optional_number(data, "joules_per_inference", where),
            insufficient_data=optional_str(data, "insufficient_data", where),
            extra=unknown(data, cls),
        )


@runtime_checkable
class PowerSource(Protocol):
    """Something that can measure energy over a window.

    Attributes:
        name: the ``source`` label its measurements carry.
        estimated: whether its measurements are estimates.
    """

    name: str
    estimated: bool

    def start(self) -> object:
        """Open a window; returns an opaque token for :meth:`stop`."""
        ...

    def stop(self, token: object) -> EnergyMeasurement:
        """Close the window opened by :meth:`start` and return its energy."""
        ...


class EnergyWindow(MeasurementWindow[EnergyMeasurement]):
    """Context manager measuring energy while its body runs.

    Example::

        with EnergyWindow(source) as window:
            run_benchmark()
        window.result.joules

    Args:
        source: the power source to measure with.
    """

    def __init__(self, source: PowerSource) -> None:
        self._source = source
        self._token: object | None = None

    def _open(self) -> None:
        self._token = self._source.start()

    def _close(self) -> EnergyMeasurement:
        return self._source.stop(self._token)


def _energy(joules: float, seconds: float, source: str, estimated: bool) -> EnergyMeasurement:
    seconds = max(0.0, seconds)
    return EnergyMeasurement(
        joules=joules,
        seconds=seconds,
        watts=joules / seconds if seconds > 0 else 0.0,
        source=source,
        estimated=estimated,
    )


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


# --- RAPL ----------------------------------------------------------------------------------


def rapl_delta_uj(start_uj: int, end_uj: int, max_range_uj: int) -> int:
    """Energy between two RAPL counter readings, allowing for one wrap-around.

    Args:
        start_uj: counter at the start.
        end_uj: counter at the end.
        max_range_uj: the counter's range (``max_energy_range_uj``).

    Returns:
        Microjoules used; correct as long as the counter wrapped at most once.
    """
    if end_uj >= start_uj:
        return end_uj - start_uj
    return end_uj + max_range_uj - start_uj


@dataclass(frozen=True)
class _RaplZone:
    energy: Path
    max_range_uj: int


_ProbedT = TypeVar("_ProbedT", bound="_Probed")


class _Probed:
    """Gives a sensor class :meth:`probe`: its constructor, answering ``None`` where it raises ConfigError."""

    @classmethod
    def probe(cls: type[_ProbedT], *args: Any, **kwargs: Any) -> _ProbedT | None:
        """A source if this sensor is present and readable, else ``None``.

        Args:
            *args: the constructor's positional arguments (``root`` for the sysfs sensors,
                ``runner`` for the Raspberry Pi 5 PMIC).
            **kwargs: the constructor's keyword arguments (``interval_s``, ``clock``).

        Returns:
            The source, or ``None`` where the constructor found no usable sensor (ConfigError).
        """
        try:
            return cls(*args, **kwargs)
        except ConfigError:
            return None


_RAPL_PACKAGE = re.compile(r"^intel-rapl:\d+$")


class RaplSource(_Probed):
    """Package energy from RAPL counters; all packages (sockets) are summed.

    Args:
        root: filesystem root holding ``sys/class/powercap``.
        clock: monotonic seconds (injectable).

    Raises:
        ConfigError: no readable RAPL package zone under ``root`` (use :meth:`probe`
            to test for one without an exception).
    """

    name = "rapl"
    estimated = False

    def __init__(self, root: Path = Path("/"), *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._zones = self._find_zones(root)
        if not self._zones:
            raise ConfigError(f"no readable RAPL energy counters under {root}", root=str(root))

    @staticmethod
    def _find_zones(root: Path) -> list[_RaplZone]:
        base = root / "sys" / "class" / "powercap"
        zones = []
        try:
            candidates = sorted(p for p in base.iterdir() if _RAPL_PACKAGE.match(p.name))
        except OSError:
            return []
        for zone in candidates:
            try:
                max_range = _read_int(zone / "max_energy_range_uj")
                _read_int(zone / "energy_uj")
            except _UNREADABLE as exc:
                logger.debug("RAPL zone %s unusable: %s", zone, exc)
                continue
            zones.append(_RaplZone(zone / "energy_uj", max_range))
        return zones

    def _read(self) -> list[int]:
        return [_read_int(z.energy) for z in self._zones]

    def start(self) -> object:
        """Read the counters and the clock."""
        return (self._clock(), self._read())

    def stop(self, token: object) -> EnergyMeasurement:
        """Energy since :meth:`start`.

        Raises:
            ConfigError: the token did not come from this source's :meth:`start`.
        """
        if not (isinstance(token, tuple) and len(token) == 2):
            raise ConfigError("RaplSource.stop needs the token returned by start()")
        t0, start = token
        end = self._read()
        seconds = self._clock() - t0
        micro = sum(rapl_delta_uj(s, e, z.max_range_uj) for s, e, z in zip(start, end, self._zones, strict=False))
        return _energy(micro / 1e6, seconds, self.name, self.estimated)


# --- sampled sensors -----------------------------------------------------------------------


@dataclass
class _SampledWindow:
    t0: float
    samples: list[float]
    sampler: SamplingThread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class _SampledSource:
    """Base for sensors that give instantaneous watts; see the module docs."""

    name = ""
    estimated = False

    def __init__(self, *, interval_s: float | None, clock: Callable[[], float]) -> None:
        if interval_s is not None and not interval_s > 0:
            raise ConfigError(f"interval_s must be positive or None, got {interval_s!r}")
        self._interval_s = interval_s
        self._clock = clock

    def read_watts(self) -> float:
        raise NotImplementedError

    def read(self) -> PowerReading:
        """Instantaneous power now."""
        return PowerReading(watts=self.read_watts(), source=self.name, estimated=self.estimated)

    def _sample_into(self, window: _SampledWindow) -> None:
        watts = self.read_watts()
        with window.lock:
            window.samples.append(watts)

    def start(self) -> object:
        """Take a first sample and, if ``interval_s`` is set, start the sampling thread."""
        window = _SampledWindow(t0=self._clock(), samples=[self.read_watts()])
        if self._interval_s is not None:
            window.sampler = SamplingThread(
                self.name, self._interval_s, lambda: self._sample_into(window), stop_on=_UNREADABLE
            )
            window.sampler.start()
        return window

    def stop(self, token: object) -> EnergyMeasurement:
        """Stop sampling, take a last sample, and integrate the mean power.

        Raises:
            ConfigError: the token did not come from this source's :meth:`start`.
        """
        if not isinstance(token, _SampledWindow):
            raise ConfigError(f"{type(self).__name__}.stop needs the token returned by start()")
        if token.sampler is not None:
            token.sampler.stop()
        last = self.read_watts()
        seconds = self._clock() - token.t0
        with token.lock:
            samples = [*token.samples, last]
        watts = sum(samples) / len(samples)
        energy = _energy(watts * max(0.0, seconds), seconds, self.name, self.estimated)
        if self._interval_s is not None and seconds < self._interval_s:
            reason = (
                f"window of {seconds:.3f} s is shorter than the {self.name} sampling interval ({self._interval_s:g} s)"
            )
            return replace(energy, insufficient_data=reason)
        return energy


class BatterySource(_SampledSource, _Probed):
    """Power drawn from discharging batteries under ``sys/class/power_supply``.

    Uses ``power_now`` (µW) where present, else ``|current_now|`` (µA) times
    ``voltage_now`` (µV); the absolute value because many Android kernels report
    discharge current as negative. Batteries found discharging when the source is
    built are summed; plugging a charger in during a window spoils that window.

    Args:
        root: filesystem root holding ``sys/class/power_supply``.
        interval_s: sampling period of the window thread; ``None`` samples only at
            start and stop.
        clock: monotonic seconds (injectable).

    Raises:
        ConfigError: no readable discharging battery (use :meth:`probe`).
    """

    name = "battery"

    def __init__(
        self,
        root: Path = Path("/"),
        *,
        interval_s: float | None = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(interval_s=interval_s, clock=clock)
        self._supplies = self._find(root)
        if not self._supplies:
            raise ConfigError(f"no readable discharging battery under {root}", root=str(root))

    @staticmethod
    def _supply_watts(supply: Path) -> float:
        power = supply / "power_now"
        if power.exists():
            return abs(_read_int(power)) / 1e6
        return abs(_read_int(supply / "current_now")) * abs(_read_int(supply / "voltage_now")) / 1e12

    @classmethod
    def _find(cls, root: Path) -> list[Path]:
        base = root / "sys" / "class" / "power_supply"
        found = []
        try:
            supplies = sorted(base.iterdir())
        except OSError:
            return []
        for supply in supplies:
            try:
                if (supply / "type").read_text().strip() != "Battery":
                    continue
                if (supply / "status").read_text().strip() != "Discharging":
                    continue
                cls._supply_watts(supply)
            except _UNREADABLE as exc:
                logger.debug("battery %s unusable: %s", supply, exc)
                continue
            found.append(supply)
        return found

    def read_watts(self) -> float:
        """Total power drawn from the batteries now, in watts."""
        return sum(self._supply_watts(s) for s in self._supplies)


@dataclass(frozen=True)
class _Rail:
    label: str
    millivolts: Path
    milliamps: Path


#: Rail labels that measure the whole board's input; preferred over summing all rails.
INPUT_RAIL_LABELS = ("VDD_IN", "POM_5V_IN")


class Ina3221Source(_SampledSource, _Probed):
    """Board power of NVIDIA Jetson modules from their INA3221 rail monitors.

    Reads hwmon channels ``in<N>_label``, ``in<N>_input`` (mV) and
    ``curr<N>_input`` (mA) under ``sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*``
    (JetPack 5 and later; the older ``ina3221x`` IIO layout is not read). Power is
    the total-input rail (``VDD_IN`` on Orin/Xavier, ``POM_5V_IN`` on Nano) where one
    is labelled, else the sum of every labelled rail; ``NC`` (not connected)
    channels are ignored.

    Args:
        root: filesystem root holding ``sys/bus/i2c``.
        interval_s: sampling period of the window thread; ``None`` samples only at
            start and stop.
        clock: monotonic seconds (injectable).

    Raises:
        ConfigError: no readable INA3221 rail (use :meth:`probe`).
    """

    name = "ina3221"

    def __init__(
        self,
        root: Path = Path("/"),
        *,
        interval_s: float | None = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(interval_s=interval_s, clock=clock)
        rails = self._find(root)
        inputs = [r for r in rails if r.label in INPUT_RAIL_LABELS]
        self._rails = inputs or rails
        if not self._rails:
            raise ConfigError(f"no readable INA3221 rails under {root}", root=str(root))

    @staticmethod
    def _find(root: Path) -> list[_Rail]:
        rails = []
        for hwmon in sorted(root.glob("sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*")):
            for label_file in sorted(hwmon.glob("in*_label")):
                channel = label_file.name[len("in") : -len("_label")]
                rail = _Rail(
                    label="",
                    millivolts=hwmon / f"in{channel}_input",
                    milliamps=hwmon / f"curr{channel}_input",
                )
                try:
                    label = label_file.read_text().strip()
                    _read_int(rail.millivolts)
                    _read_int(rail.milliamps)
                except _UNREADABLE as exc:
                    logger.debug("INA3221 channel %s unusable: %s", label_file, exc)
                    continue
                if label and label.upper() != "NC":
                    rails.append(_Rail(label.upper(), rail.millivolts, rail.milliamps))
        return rails

    @property
    def rails(self) -> tuple[str, ...]:
        """Labels of the rails being summed."""
        return tuple(r.label for r in self._rails)

    def read_watts(self) -> float:
        """Power of the chosen rails now, in watts."""
        return sum(_read_int(r.millivolts) * _read_int(r.milliamps) for r in self._rails) / 1e6


# --- Raspberry Pi 5 PMIC ------------------------------------------------------------------

#: Runs a command and returns its standard output; raises OSError or
#: subprocess.SubprocessError when it cannot. Injected so tests need no vcgencmd.
CommandRunner = Callable[[Sequence[str]], str]

_PMIC_LINE = re.compile(r"^\s*(?P<rail>\S+?)_(?P<kind>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+0-9.eE]+)[AV]\s*$")
_PMIC_COMMAND = ("vcgencmd", "pmic_read_adc")


def run_command(argv: Sequence[str], timeout_s: float = 2.0) -> str:
    """The default :data:`CommandRunner`: run ``argv``, return stdout.

    Raises:
        OSError: it cannot be started.
        subprocess.SubprocessError: it failed or timed out.
    """
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=True)
    return proc.stdout


def parse_pmic_adc(text: str) -> dict[str, tuple[float, float]]:
    """Rails of ``vcgencmd pmic_read_adc`` output: name -> (amps, volts).

    The command prints one current line (``VDD_CORE_A current(7)=0.76954200A``) and one
    voltage line (``VDD_CORE_V volt(15)=0.86175000V``) per rail; rails with only one of
    the two (``EXT5V_V``, ``BATT_V``) are left out, since they give no power.

    Raises:
        ValueError: no rail with both a current and a voltage.
    """
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC_LINE.match(line)
        if m is None:
            continue
        (amps if m["kind"] == "A" else volts)[m["rail"]] = float(m["value"])
    rails = {name: (abs(amps[name]), abs(volts[name])) for name in sorted(amps.keys() & volts.keys())}
    if not rails:
        raise ValueError("no PMIC rail with both current and voltage in the output")
    return rails


class Pi5PmicSource(_SampledSource, _Probed):
    """Power of the Raspberry Pi 5 from its PMIC's rail monitors (``vcgencmd pmic_read_adc``).

    Power is the sum over rails of current times voltage: the SoC, memory and the
    board's own supplies. It is a measurement (``estimated=False``), but of the PMIC's
    rails: USB peripherals and the 5 V input's conversion losses are not in it.

    Args:
        runner: runs ``vcgencmd pmic_read_adc`` and returns its output (injectable).
        interval_s: sampling period of the window thread; ``None`` samples only at
            start and stop.
        clock: monotonic seconds (injectable).

    Raises:
        ConfigError: the command fails or prints no usable rail (use :meth:`probe`).
    """

    name = "pi5-pmic"

    def __init__(
        self,
        runner: CommandRunner = run_command,
        *,
        interval_s: float | None = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(interval_s=interval_s, clock=clock)
        self._runner = runner
        try:
            self.rails = tuple(self._rails())
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            raise ConfigError(f"no usable Raspberry Pi 5 PMIC readings: {exc}") from exc

    def _rails(self) -> dict[str, tuple[float, float]]:
        return parse_pmic_adc(self._runner(_PMIC_COMMAND))

    def read_watts(self) -> float:
        """Sum of the PMIC rails' power now, in watts.

        Raises:
            OSError, ValueError: the command failed or printed nothing usable.
        """
        try:
            rails = self._rails()
        except subprocess.SubprocessError as exc:
            raise OSError(f"vcgencmd pmic_read_adc failed: {exc}") from exc
        return sum(a * v for a, v in rails.values())


# --- estimate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerModel:
    """Rough power envelope of a device, for estimates where no sensor exists.

    Attributes:
        name: device name, as platform detection reports it.
        idle_watts: whole-device power at idle.
        max_watts: whole-device power with all cores busy.
        note: where the figures come from.
    """

    name: str
    idle_watts: float
    max_watts: float
    note: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.idle_watts <= self.max_watts:
            raise ConfigError(
                f"power model {self.name!r}: need 0 <= idle_watts <= max_watts",
                idle_watts=self.idle_watts,
                max_watts=self.max_watts,
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


#: Rough, published whole-board figures (vendor data sheets and common reviews).
#: Good enough to compare models on one device; not a measurement.
POWER_MODELS: dict[str, PowerModel] = {
    m.name: m
    for m in (
        PowerModel("raspberry-pi-4", 2.7, 6.4, "Pi 4 B board, idle vs. all cores under stress"),
        PowerModel("raspberry-pi-5", 3.0, 8.0, "Pi 5 board, idle vs. all cores under stress"),
        PowerModel("jetson-nano", 2.0, 10.0, "Jetson Nano module, 10 W power mode"),
        PowerModel("jetson-orin-nano", 5.0, 15.0, "Jetson Orin Nano module, 15 W power mode"),
        PowerModel("android", 1.0, 5.0, "mid-range phone SoC, screen off"),
        PowerModel("generic-arm", 2.0, 8.0, "small ARM single-board computer"),
        PowerModel("generic-x86", 10.0, 65.0, "desktop-class x86 package, 65 W TDP"),
        PowerModel("generic", 5.0, 30.0, "unknown device: a wide guess"),
    )
}


def power_model_for(platform_name: str) -> PowerModel:
    """The power model of a device.

    Args:
        platform_name: e.g. ``"raspberry-pi-4"``; case, spaces and underscores are ignored.

    Returns:
        The matching entry of :data:`POWER_MODELS`.

    Raises:
        ConfigError: no model for that name; the message lists the known ones.
    """
    key = re.sub(r"[\s_]+", "-", platform_name.strip().lower())
    try:
        return POWER_MODELS[key]
    except KeyError:
        raise ConfigError(
            f"no power model for platform {platform_name!r}; known: {', '.join(POWER_MODELS)}",
            platform=platform_name,
        ) from None


class EstimatedSource:
    """Power estimated from this process's CPU use: ``idle + (max - idle) * utilisation``.

    Utilisation is the process's share of all cores over the window (see
    :class:`~edge_sdk.metrics.CpuMeasurement`). Measurements carry
    ``estimated=True`` and ``source="estimate:<model name>"``.

    Args:
        idle_watts: device power at idle.
        max_watts: device power with all cores busy.
        model_name: the label after ``estimate:``.
        cpu_sampler_factory: makes the CPU sampler for each window (injectable).

    Raises:
        ConfigError: not ``0 <= idle_watts <= max_watts``.
    """

    estimated = True

    def __init__(
        self,
        idle_watts: float,
        max_watts: float,
        *,
        model_name: str = "custom",
        cpu_sampler_factory: Callable[[], CpuSampler] = CpuSampler,
    ) -> None:
        self.model = PowerModel(model_name, idle_watts, max_watts)
        self.name = f"estimate:{model_name}"
        self._factory = cpu_sampler_factory

    @classmethod
    def from_model(
        cls, model: PowerModel, *, cpu_sampler_factory: Callable[[], CpuSampler] = CpuSampler
    ) -> EstimatedSource:
        """An estimate using one entry of :data:`POWER_MODELS`."""
        return cls(model.idle_watts, model.max_watts, model_name=model.name, cpu_sampler_factory=cpu_sampler_factory)

    def watts_at(self, utilisation: float) -> float:
        """Estimated power at a CPU utilisation in [0, 1] (clipped)."""
        u = min(1.0, max(0.0, utilisation))
        return self.model.idle_watts + (self.model.max_watts - self.model.idle_watts) * u

    def start(self) -> object:
        """Open a CPU sampling window."""
        sampler = self._factory()
        sampler.__enter__()
        return sampler

    def stop(self, token: object) -> EnergyMeasurement:
        """Close the CPU window and turn its utilisation into energy.

        Raises:
            ConfigError: the token did not come from this source's :meth:`start`.
        """
        if not isinstance(token, CpuSampler):
            raise ConfigError("EstimatedSource.stop needs the token returned by start()")
        token.__exit__(None, None, None)
        cpu = token.result
        if cpu.utilisation is None:
            return replace(
                _energy(0.0, cpu.wall_s, self.name, self.estimated),
                insufficient_data=f"the estimate needs the CPU share, which is unknown: {cpu.insufficient_data}",
            )
        watts = self.watts_at(cpu.utilisation)
        return _energy(watts * cpu.wall_s, cpu.wall_s, self.name, self.estimated)


def detect_power_source(
    root: Path = Path("/"),
    platform_name: str = "generic",
    *,
    clock: Callable[[], float] = time.monotonic,
    interval_s: float | None = 0.1,
    cpu_sampler_factory: Callable[[], CpuSampler] = CpuSampler,
    command_runner: CommandRunner = run_command,
) -> PowerSource:
    """The best power source on this machine.

    Tries RAPL, then INA3221, then (on ``raspberry-pi-5`` only) the PMIC, then a
    discharging battery; the first that is present and readable wins (unreadable
    files count as absent). Otherwise an
    :class:`EstimatedSource` for ``platform_name``, falling back to the ``"generic"``
    model (with a warning) when the platform has no entry.

    Args:
        root: filesystem root; a fake tree in tests.
        platform_name: device name used to pick the estimate's power model.
        clock: monotonic seconds for the real sensors.
        interval_s: sampling period for sampled sensors (battery, INA3221).
        cpu_sampler_factory: CPU sampler maker for the estimate.
        command_runner: runs ``vcgencmd`` for the Pi 5 PMIC (injectable).

    Returns:
        A :class:`PowerSource`; check its ``estimated`` attribute.
    """
    real: PowerSource | None = (
        RaplSource.probe(root, clock=clock)
        or Ina3221Source.probe(root, interval_s=interval_s, clock=clock)
        or (
            Pi5PmicSource.probe(command_runner, interval_s=interval_s, clock=clock)
            if platform_name == "raspberry-pi-5"
            else None
        )
        or BatterySource.probe(root, interval_s=interval_s, clock=clock)
    )
    if real is not None:
        logger.info("power source: %s", real.name)
        return real
    try:
        model = power_model_for(platform_name)
    except ConfigError:
        logger.warning("no power model for %r; estimating with the generic one", platform_name)
        model = POWER_MODELS["generic"]
    logger.info("no power sensor found; estimating power with model %s", model.name)
    return EstimatedSource.from_model(model, cpu_sampler_factory=cpu_sampler_factory)
