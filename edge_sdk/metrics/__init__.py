"""Measure how a model behaves on this machine: latency, memory, CPU, temperature, power.

Statistics are pure. The measurement types (:class:`LatencyStats`, :class:`ModelMemory`,
:class:`CpuMeasurement`, :class:`ThermalReading`, :class:`PowerMeasurement`,
:class:`ExecutionChoice`) are frozen, validated, and read back with ``from_dict``, keeping
fields a newer peer sent in ``extra``; they are what a metrics report carries.

Every reader of hardware state takes a ``root`` path (``/`` on a device, a fake sysfs
tree in tests) or an injectable reader and clock, and treats
missing or unreadable files as "this machine has no such sensor". Power readings
always say whether they are measured or estimated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_sdk._lazy import lazy_exports

if TYPE_CHECKING:
    from edge_sdk.metrics._cpu import CpuMeasurement, CpuSampler
    from edge_sdk.metrics._execution import CandidateTiming, ExecutionChoice
    from edge_sdk.metrics._latency import LatencyStats, benchmark, benchmark_interleaved
    from edge_sdk.metrics._memory import (
        MemoryMeasurement,
        ModelMemory,
        PeakRssSampler,
        heap_in_use_bytes,
        read_vm_hwm,
        release_free_heap,
        rss_bytes,
    )
    from edge_sdk.metrics._power import (
        POWER_MODELS,
        BatterySource,
        EnergyMeasurement,
        EnergyWindow,
        EstimatedSource,
        Ina3221Source,
        Pi5PmicSource,
        PowerMeasurement,
        PowerModel,
        PowerReading,
        PowerSource,
        RaplSource,
        detect_power_source,
        parse_pmic_adc,
        power_model_for,
    )
    from edge_sdk.metrics._thermal import ThermalReading, read_thermal_zones

# Names load their module on first use (PEP 562), so the agent can pick its power source
# at start without paying for numpy, which only the latency statistics need.
_HOMES = {
    "CpuMeasurement": "_cpu",
    "CpuSampler": "_cpu",
    "CandidateTiming": "_execution",
    "ExecutionChoice": "_execution",
    "LatencyStats": "_latency",
    "benchmark": "_latency",
    "benchmark_interleaved": "_latency",
    "MemoryMeasurement": "_memory",
    "ModelMemory": "_memory",
    "PeakRssSampler": "_memory",
    "heap_in_use_bytes": "_memory",
    "read_vm_hwm": "_memory",
    "release_free_heap": "_memory",
    "rss_bytes": "_memory",
    "ThermalReading": "_thermal",
    "read_thermal_zones": "_thermal",
    **dict.fromkeys(
        (
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
        ),
        "_power",
    ),
}


__all__ = [
    "POWER_MODELS",
    "BatterySource",
    "CandidateTiming",
    "CpuMeasurement",
    "CpuSampler",
    "EnergyMeasurement",
    "EnergyWindow",
    "EstimatedSource",
    "ExecutionChoice",
    "Ina3221Source",
    "LatencyStats",
    "MemoryMeasurement",
    "ModelMemory",
    "PeakRssSampler",
    "Pi5PmicSource",
    "PowerMeasurement",
    "PowerModel",
    "PowerReading",
    "PowerSource",
    "RaplSource",
    "ThermalReading",
    "benchmark",
    "benchmark_interleaved",
    "detect_power_source",
    "heap_in_use_bytes",
    "parse_pmic_adc",
    "power_model_for",
    "read_thermal_zones",
    "read_vm_hwm",
    "release_free_heap",
    "rss_bytes",
]

__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)
