"""Measure how a model behaves on this machine: latency, memory, CPU, temperature, power.

Statistics are pure. Every reader of hardware state takes a ``root`` path (``/`` on a
device, a fake sysfs tree in tests) or an injectable reader and clock, and treats
missing or unreadable files as "this machine has no such sensor". Power readings
always say whether they are measured or estimated.
"""

from __future__ import annotations

from edge_sdk.metrics._cpu import CpuMeasurement, CpuSampler
from edge_sdk.metrics._latency import LatencyStats, benchmark
from edge_sdk.metrics._memory import (
    MemoryMeasurement,
    PeakRssSampler,
    read_vm_hwm,
    rss_bytes,
)
from edge_sdk.metrics._power import (
    POWER_MODELS,
    BatterySource,
    EnergyMeasurement,
    EnergyWindow,
    EstimatedSource,
    Ina3221Source,
    PowerModel,
    PowerReading,
    PowerSource,
    RaplSource,
    detect_power_source,
    power_model_for,
)
from edge_sdk.metrics._thermal import ThermalReading, read_thermal_zones

__all__ = [
    "POWER_MODELS",
    "BatterySource",
    "CpuMeasurement",
    "CpuSampler",
    "EnergyMeasurement",
    "EnergyWindow",
    "EstimatedSource",
    "Ina3221Source",
    "LatencyStats",
    "MemoryMeasurement",
    "PeakRssSampler",
    "PowerModel",
    "PowerReading",
    "PowerSource",
    "RaplSource",
    "ThermalReading",
    "benchmark",
    "detect_power_source",
    "power_model_for",
    "read_thermal_zones",
    "read_vm_hwm",
    "rss_bytes",
]
