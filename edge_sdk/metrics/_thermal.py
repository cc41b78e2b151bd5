"""Temperatures from the Linux thermal framework (``/sys/class/thermal``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.metrics._fields import as_mapping, plain_dict, read_number, read_str, unknown

__all__ = ["ThermalReading", "read_thermal_zones"]

logger = logging.getLogger(__name__)

_ZONE = re.compile(r"^thermal_zone(\d+)$")


@dataclass(frozen=True)
class ThermalReading:
    """One thermal zone's temperature.

    Attributes:
        zone: the sysfs directory name, e.g. ``"thermal_zone0"``.
        type: what the zone measures, e.g. ``"cpu-thermal"`` or ``"x86_pkg_temp"``.
        celsius: temperature in degrees Celsius.
        extra: fields from a newer peer, kept and written back, never read.
    """

    zone: str
    type: str
    celsius: float
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, with the kept unknown fields."""
        return plain_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ThermalReading:
        """Rebuild from :meth:`to_dict` output, e.g. one entry of a metrics report's ``temperature``.

        Args:
            data: the mapping to read; unknown keys are kept in ``extra``.

        Returns:
            The reading.

        Raises:
            MessageError: a field is missing or of the wrong type.
        """
        where = "temperature"
        data = as_mapping(data, where)
        return cls(
            zone=read_str(data, "zone", where),
            type=read_str(data, "type", where),
            celsius=read_number(data, "celsius", where),
            extra=unknown(data, cls),
        )


def read_thermal_zones(root: Path = Path("/")) -> list[ThermalReading]:
    """Read every thermal zone under ``root/sys/class/thermal``.

    Zones whose files are missing, unreadable or not a number (some report errors
    while their sensor sleeps) are skipped.

    Args:
        root: filesystem root; a fake tree in tests.

    Returns:
        Readings ordered by zone number; empty where there are none.
    """
    base = root / "sys" / "class" / "thermal"
    zones = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = _ZONE.match(entry.name)
        if match:
            zones.append((int(match.group(1)), entry))
    readings = []
    for _, zone in sorted(zones):
        try:
            millidegrees = int((zone / "temp").read_text().strip())
            kind = (zone / "type").read_text().strip()
        except (OSError, ValueError) as exc:
            logger.debug("skipping %s: %s", zone, exc)
            continue
        readings.append(ThermalReading(zone=zone.name, type=kind, celsius=millidegrees / 1000.0))
    return readings
