"""edge_sdk.metrics: pure statistics, and hardware readers against fake sysfs trees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import edge_sdk.metrics as metrics
from edge_sdk.errors import ConfigError, MessageError
from edge_sdk.metrics import (
    BatterySource,
    CpuSampler,
    EnergyWindow,
    EstimatedSource,
    Ina3221Source,
    LatencyStats,
    PeakRssSampler,
    PowerSource,
    RaplSource,
    benchmark,
    detect_power_source,
    power_model_for,
    read_thermal_zones,
    read_vm_hwm,
    rss_bytes,
)
from edge_sdk.metrics._power import rapl_delta_uj


class FakeClock:
    """A clock that advances by ``step`` seconds each time it is read."""

    def __init__(self, step: float = 0.0, start: float = 100.0) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def fixed_cpu_sampler(wall_s: float, cpu_s: float, cores: int) -> Callable[[], CpuSampler]:
    """A CpuSampler factory whose window always lasts ``wall_s`` and uses ``cpu_s``."""

    def factory() -> CpuSampler:
        clock = iter([0.0, wall_s])
        cpu = iter([10.0, 10.0 + cpu_s])
        return CpuSampler(clock=lambda: next(clock), cpu_seconds=lambda: next(cpu), cores=cores)

    return factory


def test_public_names_are_exactly_the_intended_ones() -> None:
    assert sorted(metrics.__all__) == sorted(
        [
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
    )


# --- latency -------------------------------------------------------------------------------


def test_latency_stats_match_numpy() -> None:
    seconds = [0.010, 0.012, 0.011, 0.050, 0.009, 0.013, 0.010, 0.011, 0.012, 0.100]
    stats = LatencyStats.from_samples(seconds)
    ms = np.array(seconds) * 1000
    assert stats.count == 10
    assert stats.mean_ms == pytest.approx(ms.mean())
    assert stats.stdev_ms == pytest.approx(ms.std(ddof=1))
    assert stats.min_ms == pytest.approx(9.0)
    assert stats.max_ms == pytest.approx(100.0)
    for q, got in [(50, stats.p50_ms), (90, stats.p90_ms), (99, stats.p99_ms)]:
        assert got == pytest.approx(np.percentile(ms, q, method="linear"))
    assert stats.throughput_per_s == pytest.approx(10 / sum(seconds))


def test_latency_stats_known_percentiles() -> None:
    stats = LatencyStats.from_samples([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats.p50_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01)


def test_latency_stats_single_and_zero_samples() -> None:
    one = LatencyStats.from_samples([0.002])
    assert one.stdev_ms == 0.0 and one.p99_ms == pytest.approx(2.0)
    assert LatencyStats.from_samples([0.0, 0.0]).throughput_per_s == 0.0


@pytest.mark.parametrize("bad", [[], [0.1, -0.001], [float("nan")], [float("inf")]])
def test_latency_stats_reject_bad_samples(bad: list[float]) -> None:
    with pytest.raises(ConfigError):
        LatencyStats.from_samples(bad)


def test_latency_stats_round_trip_through_json() -> None:
    stats = LatencyStats.from_samples([0.001, 0.002, 0.004])
    wire = json.loads(json.dumps({**stats.to_dict(), "newer_field": 1}))
    assert LatencyStats.from_dict(wire) == stats


@pytest.mark.parametrize("damage", [{"count": None}, {"p50_ms": "fast"}, {"mean_ms": True}])
def test_latency_stats_from_dict_rejects_malformed(damage: dict[str, object]) -> None:
    data = {**LatencyStats.from_samples([0.001]).to_dict(), **damage}
    with pytest.raises(MessageError):
        LatencyStats.from_dict(data)


def test_benchmark_with_fake_clock_counts_only_timed_runs() -> None:
    calls = []
    clock = FakeClock(step=0.005)
    stats = benchmark(lambda: calls.append(1), warmup=3, runs=20, clock=clock)
    assert len(calls) == 23
    assert stats.count == 20
    assert stats.mean_ms == pytest.approx(5.0)
    assert stats.p99_ms == pytest.approx(5.0)


def test_benchmark_runs_until_min_duration_but_not_past_max_runs() -> None:
    # Each clock read advances 1 ms; each timed run costs 2 reads -> 1 ms sample.
    stats = benchmark(lambda: None, warmup=0, runs=5, min_duration_s=0.1, clock=FakeClock(step=0.001))
    assert 45 <= stats.count <= 55
    capped = benchmark(lambda: None, warmup=0, runs=5, min_duration_s=1e9, max_runs=30, clock=FakeClock(step=0.001))
    assert capped.count == 30
    frozen = benchmark(lambda: None, warmup=0, runs=5, min_duration_s=1.0, max_runs=50, clock=FakeClock(step=0.0))
    assert frozen.count == 50


@pytest.mark.parametrize("kwargs", [{"runs": 0}, {"warmup": -1}, {"min_duration_s": -1.0}, {"runs": 10, "max_runs": 5}])
def test_benchmark_rejects_bad_parameters(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        benchmark(lambda: None, **kwargs)  # type: ignore[arg-type]


# --- memory and CPU ------------------------------------------------------------------------


def test_rss_bytes_of_this_process_is_positive() -> None:
    assert rss_bytes() > 0
    assert rss_bytes(os.getpid()) > 0


def test_vm_hwm_read_from_fake_proc(tmp_path: Path) -> None:
    write(tmp_path, "proc/42/status", "Name:\tpython\nVmPeak:\t  9000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1024 kB")
    assert read_vm_hwm(42, tmp_path) == 2048 * 1024
    assert read_vm_hwm(43, tmp_path) is None


def test_peak_rss_sampler_uses_hwm_only_when_it_grew_in_the_window(tmp_path: Path) -> None:
    status = write(tmp_path, "proc/7/status", "VmHWM:\t 1000 kB")
    readings: Iterator[int] = iter([500_000, 600_000])

    class GrowHwm:
        def __call__(self) -> int:
            value = next(readings)
            status.write_text("VmHWM:\t 2000 kB\n")  # a spike the sampler never saw
            return value

    with PeakRssSampler(7, interval_s=60, root=tmp_path, rss_reader=GrowHwm()) as mem:
        pass
    assert mem.start_bytes == 500_000
    assert mem.result.sampled_peak_bytes == 600_000
    assert mem.result.hwm_bytes == 2000 * 1024
    assert mem.peak_bytes == 2000 * 1024
    assert mem.result.samples == 2

    # The lifetime peak was set before the window: it says nothing about this window.
    values = iter([500_000, 700_000])
    with PeakRssSampler(7, interval_s=60, root=tmp_path, rss_reader=lambda: next(values)) as mem:
        pass
    assert mem.peak_bytes == 700_000
    assert mem.result.to_dict()["hwm_bytes"] == 2000 * 1024


_REAL_ALLOCATION = """
import time
import numpy as np
from edge_sdk.metrics import PeakRssSampler
with PeakRssSampler(interval_s=0.001) as mem:
    block = np.ones(40 * 1024 * 1024 // 8)  # 40 MiB, touched
    block.sum()
    time.sleep(0.2)
    del block
print(mem.peak_bytes - mem.start_bytes, mem.result.samples)
"""


def test_peak_rss_sampler_sees_a_real_allocation() -> None:
    # In a process of its own: late in a long test run this one's heap and lifetime VmHWM
    # hold the memory of earlier tests, and a block can be served from resident pages.
    # The block is held across many sampling intervals (filling it holds the GIL).
    out = subprocess.run([sys.executable, "-c", _REAL_ALLOCATION], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    grown, samples = (int(v) for v in out.stdout.split())
    assert grown >= 30 * 1024 * 1024 and samples >= 2, out.stdout


def test_samplers_refuse_results_before_the_window_closes() -> None:
    with pytest.raises(ConfigError, match="PeakRssSampler result read before the window closed"):
        PeakRssSampler().peak_bytes  # noqa: B018
    with pytest.raises(ConfigError, match="CpuSampler result read before the window closed"):
        CpuSampler().result  # noqa: B018
    with pytest.raises(ConfigError, match="EnergyWindow result read before the window closed"):
        EnergyWindow(EstimatedSource(1.0, 2.0)).result  # noqa: B018
    with pytest.raises(ConfigError):
        PeakRssSampler(interval_s=0)
    # A window opened again has no result until it closes again.
    sampler = CpuSampler(clock=FakeClock(step=1.0), cpu_seconds=lambda: 5.0, cores=1)
    with sampler:
        pass
    assert sampler.result.wall_s == 1.0
    with pytest.raises(ConfigError), sampler:
        sampler.result  # noqa: B018
    assert sampler.result.wall_s == 1.0


def test_cpu_sampler_with_fake_clock_and_cpu_time() -> None:
    with fixed_cpu_sampler(wall_s=2.0, cpu_s=3.0, cores=4)() as cpu:
        pass
    m = cpu.result
    assert m.wall_s == 2.0 and m.cpu_s == 3.0 and m.cores == 4
    assert m.percent_of_one_core == pytest.approx(150.0)
    assert m.utilisation == pytest.approx(0.375)
    assert m.to_dict()["utilisation"] == pytest.approx(0.375)


def _process_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def test_cpu_sampler_real_process_busy_loop() -> None:
    # Burn a fixed amount of CPU time, not a fixed amount of work: on a loaded machine the
    # loop just takes longer. The sampler must report the CPU time the kernel (os.times)
    # saw this process use, give or take the kernel's accounting tick.
    burn_s, tick_s = 0.2, 0.05
    outer0 = _process_cpu_s()
    with CpuSampler() as cpu:
        inner0 = _process_cpu_s()
        thread0 = time.thread_time()
        deadline = time.monotonic() + 60
        while _process_cpu_s() - inner0 < burn_s and time.monotonic() < deadline:
            sum(i * i for i in range(10_000))
        thread_s = time.thread_time() - thread0
    outer_s = _process_cpu_s() - outer0
    m = cpu.result
    assert burn_s - tick_s <= m.cpu_s <= outer_s + tick_s
    assert m.wall_s >= thread_s * 0.9  # one thread cannot burn more CPU than the window's length
    assert m.percent_of_one_core == pytest.approx(100 * m.cpu_s / m.wall_s)
    assert m.utilisation == pytest.approx(min(1.0, m.cpu_s / m.wall_s / m.cores))
    assert 0 < m.utilisation <= 1


# --- temperature ---------------------------------------------------------------------------


def test_thermal_zones_read_sorted_and_skip_broken(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/thermal/thermal_zone0/type", "cpu-thermal")
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "48312")
    write(tmp_path, "sys/class/thermal/thermal_zone10/type", "gpu-thermal")
    write(tmp_path, "sys/class/thermal/thermal_zone10/temp", "-1500")
    write(tmp_path, "sys/class/thermal/thermal_zone2/type", "sleeping")
    write(tmp_path, "sys/class/thermal/thermal_zone2/temp", "")  # read error: skipped
    write(tmp_path, "sys/class/thermal/thermal_zone3/type", "no-temp")  # no temp file: skipped
    write(tmp_path, "sys/class/thermal/cooling_device0/type", "fan")  # not a zone
    readings = read_thermal_zones(tmp_path)
    assert [(r.zone, r.type, r.celsius) for r in readings] == [
        ("thermal_zone0", "cpu-thermal", pytest.approx(48.312)),
        ("thermal_zone10", "gpu-thermal", pytest.approx(-1.5)),
    ]
    assert readings[0].to_dict() == {"zone": "thermal_zone0", "type": "cpu-thermal", "celsius": 48.312}


def test_thermal_zones_absent_is_empty(tmp_path: Path) -> None:
    assert read_thermal_zones(tmp_path) == []


# --- power: RAPL ---------------------------------------------------------------------------


def rapl_tree(root: Path, energy_uj: int, max_uj: int = 262_143_328_850) -> Path:
    write(root, "sys/class/powercap/intel-rapl:0/max_energy_range_uj", str(max_uj))
    write(root, "sys/class/powercap/intel-rapl:0:0/energy_uj", "5")  # sub-zone: not summed
    write(root, "sys/class/powercap/intel-rapl:0:0/max_energy_range_uj", str(max_uj))
    return write(root, "sys/class/powercap/intel-rapl:0/energy_uj", str(energy_uj))


def test_rapl_delta_handles_wrap() -> None:
    assert rapl_delta_uj(100, 350, 1000) == 250
    assert rapl_delta_uj(900, 150, 1000) == 250


def test_rapl_energy_over_a_window_with_counter_wrap(tmp_path: Path) -> None:
    counter = rapl_tree(tmp_path, energy_uj=999_000_000, max_uj=1_000_000_000)
    source = RaplSource(tmp_path, clock=FakeClock(step=2.0))
    assert isinstance(source, PowerSource)
    token = source.start()
    counter.write_text("19000000\n")  # wrapped: 1 J to the top, then 19 J
    energy = source.stop(token)
    assert energy.joules == pytest.approx(20.0)
    assert energy.seconds == pytest.approx(2.0)
    assert energy.watts == pytest.approx(10.0)
    assert energy.to_dict() == {
        "joules": pytest.approx(20.0),
        "seconds": 2.0,
        "watts": pytest.approx(10.0),
        "source": "rapl",
        "estimated": False,
    }


def test_rapl_sums_packages(tmp_path: Path) -> None:
    rapl_tree(tmp_path, energy_uj=0)
    write(tmp_path, "sys/class/powercap/intel-rapl:1/max_energy_range_uj", "1000000000")
    second = write(tmp_path, "sys/class/powercap/intel-rapl:1/energy_uj", "0")
    first = tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj"
    source = RaplSource(tmp_path, clock=FakeClock(step=1.0))
    with EnergyWindow(source) as window:
        first.write_text("3000000")
        second.write_text("4000000")
    assert window.result.joules == pytest.approx(7.0)


def test_rapl_unreadable_counter_means_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Since CVE-2020-8694 energy_uj is root-only on most kernels; reading it fails.
    rapl_tree(tmp_path, energy_uj=10)
    real_read_text = Path.read_text

    def deny_energy(self: Path, *args: object, **kwargs: object) -> str:
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", deny_energy)
    assert RaplSource.probe(tmp_path) is None
    with pytest.raises(ConfigError, match="RAPL"):
        RaplSource(tmp_path)
    assert detect_power_source(tmp_path, "generic-x86").estimated is True


# --- power: battery and INA3221 ------------------------------------------------------------


def battery_tree(root: Path, status: str = "Discharging", **files: int) -> Path:
    base = root / "sys/class/power_supply/battery"
    write(root, "sys/class/power_supply/battery/type", "Battery")
    write(root, "sys/class/power_supply/battery/status", status)
    for name, value in files.items():
        write(root, f"sys/class/power_supply/battery/{name}", str(value))
    write(root, "sys/class/power_supply/AC/type", "Mains")
    return base


def test_battery_from_current_and_voltage(tmp_path: Path) -> None:
    # Android reports discharge current as negative microamps.
    base = battery_tree(tmp_path, current_now=-500_000, voltage_now=4_000_000)
    source = BatterySource(tmp_path, interval_s=None, clock=FakeClock(step=10.0))
    assert source.read().to_dict() == {"watts": pytest.approx(2.0), "source": "battery", "estimated": False}
    token = source.start()
    (base / "current_now").write_text("-1000000\n")  # 4 W at the end
    energy = source.stop(token)
    assert energy.watts == pytest.approx(3.0)  # mean of the start and stop samples
    assert energy.joules == pytest.approx(30.0)
    assert energy.estimated is False


def test_battery_prefers_power_now(tmp_path: Path) -> None:
    battery_tree(tmp_path, power_now=7_500_000, current_now=1, voltage_now=1)
    assert BatterySource(tmp_path, interval_s=None).read_watts() == pytest.approx(7.5)


def test_battery_sampling_thread_collects_samples(tmp_path: Path) -> None:
    battery_tree(tmp_path, power_now=2_000_000)
    source = BatterySource(tmp_path, interval_s=0.001)
    token = source.start()
    time.sleep(0.02)
    energy = source.stop(token)
    assert energy.watts == pytest.approx(2.0)
    assert len(token.samples) > 2  # type: ignore[attr-defined]


def _new_sampler_threads(name: str, before: set[threading.Thread]) -> list[threading.Thread]:
    """Live threads named ``edge-sdk-<name>-sampler`` that were not running at ``before``."""
    return [t for t in threading.enumerate() if t.name == f"edge-sdk-{name}-sampler" and t not in before]


def test_battery_sampling_stops_quietly_when_the_sensor_goes_away(tmp_path: Path) -> None:
    base = battery_tree(tmp_path, power_now=2_000_000)
    source = BatterySource(tmp_path, interval_s=0.001)
    before = set(threading.enumerate())
    token = source.start()
    (thread,) = _new_sampler_threads("battery", before)
    deadline = time.monotonic() + 30
    while len(token.samples) < 3 and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.001)
    (base / "power_now").write_text("unreadable\n")  # the sampling thread ends at its next read
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(token.samples) >= 3 and set(token.samples) == {2.0}  # type: ignore[attr-defined]
    (base / "power_now").write_text("4000000\n")
    energy = source.stop(token)  # the samples from before the failure are kept, plus the last one
    assert 2.0 < energy.watts < 4.0


def test_peak_rss_sampler_thread_lives_only_as_long_as_the_window() -> None:
    before = set(threading.enumerate())
    with PeakRssSampler(interval_s=0.001):
        (thread,) = _new_sampler_threads("rss", before)
        assert thread.daemon
    assert not thread.is_alive()


@pytest.mark.parametrize("status", ["Charging", "Full", "Not charging"])
def test_battery_not_discharging_is_not_a_source(tmp_path: Path, status: str) -> None:
    battery_tree(tmp_path, status=status, power_now=5_000_000)
    assert BatterySource.probe(tmp_path) is None


def ina_tree(root: Path, channels: dict[int, tuple[str, int, int]]) -> Path:
    hwmon = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    for n, (label, mv, ma) in channels.items():
        write(root, f"{hwmon}/in{n}_label", label)
        write(root, f"{hwmon}/in{n}_input", str(mv))
        write(root, f"{hwmon}/curr{n}_input", str(ma))
    return root / hwmon


def test_ina3221_prefers_the_input_rail(tmp_path: Path) -> None:
    ina_tree(tmp_path, {1: ("VDD_IN", 5000, 1200), 2: ("VDD_CPU_GPU_CV", 5000, 400), 3: ("VDD_SOC", 5000, 300)})
    source = Ina3221Source(tmp_path, interval_s=None, clock=FakeClock(step=0.5))
    assert source.rails == ("VDD_IN",)
    assert source.read_watts() == pytest.approx(6.0)
    with EnergyWindow(source) as window:
        pass
    assert window.result.joules == pytest.approx(3.0)
    assert window.result.source == "ina3221"


def test_ina3221_sums_all_rails_without_an_input_rail(tmp_path: Path) -> None:
    ina_tree(tmp_path, {1: ("VDD_GPU", 1000, 1000), 2: ("VDD_CPU", 2000, 1000), 3: ("NC", 5000, 5000)})
    source = Ina3221Source(tmp_path, interval_s=None)
    assert source.rails == ("VDD_GPU", "VDD_CPU")
    assert source.read_watts() == pytest.approx(3.0)


# --- power: estimate and detection ---------------------------------------------------------


def test_estimated_source_scales_with_cpu_utilisation() -> None:
    source = EstimatedSource(2.0, 6.0, model_name="toy", cpu_sampler_factory=fixed_cpu_sampler(4.0, 8.0, 4))
    energy = source.stop(source.start())  # utilisation 8 / 4 / 4 = 0.5 -> 4 W
    assert energy.watts == pytest.approx(4.0)
    assert energy.joules == pytest.approx(16.0)
    assert energy.to_dict()["source"] == "estimate:toy"
    assert energy.to_dict()["estimated"] is True
    assert source.watts_at(2.0) == 6.0


def test_power_models_table() -> None:
    pi4 = power_model_for("Raspberry Pi 4")
    assert (pi4.idle_watts, pi4.max_watts) == (2.7, 6.4)
    assert power_model_for("jetson_orin_nano").max_watts == 15.0
    with pytest.raises(ConfigError, match="raspberry-pi-4"):
        power_model_for("toaster")
    with pytest.raises(ConfigError):
        EstimatedSource(5.0, 1.0)


def test_detect_prefers_real_sensors_in_order(tmp_path: Path) -> None:
    battery_tree(tmp_path, power_now=1_000_000)
    assert detect_power_source(tmp_path, "android").name == "battery"
    ina_tree(tmp_path, {1: ("POM_5V_IN", 5000, 1000)})
    assert detect_power_source(tmp_path, "jetson-nano").name == "ina3221"
    rapl_tree(tmp_path, energy_uj=1)
    source = detect_power_source(tmp_path, "generic-x86")
    assert source.name == "rapl" and source.estimated is False


def test_detect_falls_back_to_labelled_estimate(tmp_path: Path) -> None:
    battery_tree(tmp_path, status="Charging", power_now=1_000_000)
    factory = fixed_cpu_sampler(1.0, 1.0, 1)
    source = detect_power_source(tmp_path, "raspberry-pi-5", cpu_sampler_factory=factory, command_runner=_no_vcgencmd)
    assert source.estimated is True
    assert source.name == "estimate:raspberry-pi-5"
    assert source.stop(source.start()).watts == pytest.approx(8.0)
    unknown = detect_power_source(tmp_path, "toaster", cpu_sampler_factory=factory)
    assert unknown.name == "estimate:generic" and unknown.estimated is True


# --- Raspberry Pi 5 PMIC (vcgencmd pmic_read_adc through a fake runner) ----------------------

PMIC_OUTPUT = """\
     3V7_WL_SW_A current(0)=0.00000000A
       3V3_SYS_A current(1)=0.05000000A
     VDD_CORE_A current(7)=2.00000000A
     3V7_WL_SW_V volt(8)=3.70000000V
       3V3_SYS_V volt(9)=3.30000000V
     VDD_CORE_V volt(15)=0.80000000V
     EXT5V_V volt(24)=5.15000000V
     BATT_V volt(25)=0.00000000V
"""


def _no_vcgencmd(argv: object) -> str:
    raise FileNotFoundError(2, "No such file or directory", "vcgencmd")


def test_pmic_output_parses_into_rails() -> None:
    from edge_sdk.metrics import parse_pmic_adc

    rails = parse_pmic_adc(PMIC_OUTPUT)
    assert rails == {"3V3_SYS": (0.05, 3.3), "3V7_WL_SW": (0.0, 3.7), "VDD_CORE": (2.0, 0.8)}
    with pytest.raises(ValueError):
        parse_pmic_adc('error=1 error_msg="Command not registered"\n')


def test_pmic_source_measures_energy_with_a_fake_runner() -> None:
    from edge_sdk.metrics import Pi5PmicSource

    calls: list[tuple[str, ...]] = []

    def runner(argv: object) -> str:
        calls.append(tuple(argv))  # type: ignore[arg-type]
        return PMIC_OUTPUT

    source = Pi5PmicSource(runner, interval_s=None, clock=FakeClock(step=1.0))
    assert source.name == "pi5-pmic" and source.estimated is False
    assert source.read().watts == pytest.approx(0.05 * 3.3 + 2.0 * 0.8)
    m = source.stop(source.start())
    assert m.seconds == pytest.approx(1.0) and m.joules == pytest.approx(1.765)
    assert m.estimated is False and m.source == "pi5-pmic"
    assert calls[0] == ("vcgencmd", "pmic_read_adc")


def test_pmic_is_probed_only_on_a_pi_5(tmp_path: Path) -> None:
    from edge_sdk.metrics import Pi5PmicSource

    factory = fixed_cpu_sampler(1.0, 1.0, 1)
    pi5 = detect_power_source(
        tmp_path, "raspberry-pi-5", command_runner=lambda argv: PMIC_OUTPUT, cpu_sampler_factory=factory
    )
    assert isinstance(pi5, Pi5PmicSource)
    pi4 = detect_power_source(
        tmp_path, "raspberry-pi-4", command_runner=lambda argv: PMIC_OUTPUT, cpu_sampler_factory=factory
    )
    assert pi4.name == "estimate:raspberry-pi-4" and pi4.estimated is True
    assert Pi5PmicSource.probe(_no_vcgencmd) is None
    assert Pi5PmicSource.probe(lambda argv: "garbage\n") is None


def test_every_public_name_resolves_and_importing_loads_no_numpy() -> None:
    import subprocess
    import sys

    for name in metrics.__all__:
        assert getattr(metrics, name) is not None
    assert dir(metrics) == sorted(metrics.__all__)
    with pytest.raises(AttributeError, match="no_such_reader"):
        metrics.no_such_reader  # noqa: B018
    code = (
        "import sys\n"
        "from edge_sdk.metrics import detect_power_source, PowerSource\n"
        "import edge_sdk.runtime\n"
        "edge_sdk.runtime.available_runtimes()\n"
        "assert 'numpy' not in sys.modules, 'numpy loaded'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_benchmark_interleaved_alternates_rounds_and_warms_up_first() -> None:
    calls: list[str] = []
    ticks = iter(range(10_000))
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b")}
    stats = metrics.benchmark_interleaved(
        fns, rounds=3, runs_per_round=2, warmup=4, later_warmup=1, clock=lambda: float(next(ticks))
    )
    assert [len(stats[n]) for n in "ab"] == [3, 3] and all(s.count == 2 for n in "ab" for s in stats[n])
    # round 1: a (4 warm + 2), b (4 + 2); rounds 2 and 3: a (1 + 2), b (1 + 2)
    assert calls == ["a"] * 6 + ["b"] * 6 + (["a"] * 3 + ["b"] * 3) * 2
    with pytest.raises(ConfigError, match="rounds"):
        metrics.benchmark_interleaved(fns, rounds=0, runs_per_round=1, warmup=0)


# --- typed measurements: today's dicts read back, unknown fields kept, bad values refused ---

_TODAY = {
    "memory": {
        "rss_before_load_bytes": 61865984,
        "rss_after_load_bytes": 63176704,
        "model_bytes": 1310720,
        "start_bytes": 63176704,
        "peak_bytes": 63438848,
        "sampled_peak_bytes": 63438848,
        "hwm_bytes": None,
        "samples": 27,
    },
    "cpu": {"wall_s": 0.137, "cpu_s": 0.131, "cores": 2, "percent_of_one_core": 95.6, "utilisation": 0.478},
    "power": {
        "joules": 1.29,
        "seconds": 0.137,
        "watts": 9.43,
        "source": "estimate:generic",
        "estimated": True,
        "joules_per_inference": 0.0039,
    },
    "temperature": {"zone": "thermal_zone0", "type": "cpu-thermal", "celsius": 48.3},
    "execution": {
        "chosen": "sparse",
        "reason": "measured",
        "pinned_by": None,
        "candidates": [
            {"name": "dense", "p50_ms": 0.4, "p90_ms": 0.5, "mean_ms": 0.41, "runs": 100},
            {"name": "sparse_int8", "p50_ms": None, "p90_ms": None, "mean_ms": None, "runs": 0, "not_applicable": "no"},
        ],
    },
}
_TYPES = {
    "memory": metrics.ModelMemory,
    "cpu": metrics.CpuMeasurement,
    "power": metrics.PowerMeasurement,
    "temperature": metrics.ThermalReading,
    "execution": metrics.ExecutionChoice,
}


@pytest.mark.parametrize("kind", sorted(_TYPES))
def test_measurement_reads_todays_dict_and_keeps_unknown_fields(kind: str) -> None:
    cls = _TYPES[kind]
    assert cls.from_dict(_TODAY[kind]).to_dict() == _TODAY[kind]
    newer = {**_TODAY[kind], "from_newer_peer": {"x": [1]}}
    read = cls.from_dict(json.loads(json.dumps(newer)))
    assert read == cls.from_dict(_TODAY[kind]) and read.extra == {"from_newer_peer": {"x": [1]}}
    assert read.to_dict() == newer


@pytest.mark.parametrize(
    ("kind", "damage", "field"),
    [
        ("memory", {"peak_bytes": "big"}, "peak_bytes"),
        ("memory", {"samples": -1}, "memory"),
        ("cpu", {"cores": 0}, "cores"),
        ("cpu", {"utilisation": 1.5}, "cpu"),
        ("power", {"watts": None}, "watts"),
        ("power", {"estimated": "yes"}, "estimated"),
        ("temperature", {"celsius": float("nan")}, "celsius"),
        ("execution", {"candidates": "none"}, "candidates"),
        ("execution", {"chosen": ""}, "chosen"),
    ],
)
def test_measurement_refuses_a_bad_field_and_names_it(kind: str, damage: dict[str, object], field: str) -> None:
    with pytest.raises(MessageError) as info:
        _TYPES[kind].from_dict({**_TODAY[kind], **damage})
    assert info.value.details["field"] == field


def test_power_that_does_not_say_is_read_as_estimated() -> None:
    undeclared = {k: v for k, v in _TODAY["power"].items() if k != "estimated"}
    assert metrics.PowerMeasurement.from_dict({**undeclared, "source": "rapl"}).estimated is True


def test_model_memory_and_power_from_the_windows() -> None:
    window = metrics.MemoryMeasurement(100, 180, 170, None, 5)
    memory = metrics.ModelMemory.from_window(50, 40, window)
    assert memory.model_bytes == 0 and memory.to_dict()["peak_bytes"] == 180
    energy = metrics.EnergyMeasurement(2.0, 1.0, 2.0, "rapl", False)
    power = metrics.PowerMeasurement.from_energy(energy, 0)
    assert power.joules_per_inference == 2.0 and power.estimated is False


# --- too little data -------------------------------------------------------------------------


def test_cpu_window_shorter_than_the_tick_count_has_no_share_and_says_why() -> None:
    from edge_sdk.metrics import CpuMeasurement

    # 200 runs in 4 ms: one 10 ms tick was counted, which read as 250 % of one core.
    short = CpuMeasurement.from_deltas(0.004, 0.01, cores=4, threads=1, tick_s=0.01, min_ticks=10)
    assert short.percent_of_one_core is None and short.utilisation is None and short.cpu_s is None
    assert short.insufficient_data is not None and "10 CPU-time ticks" in short.insufficient_data
    assert CpuMeasurement.from_dict(json.loads(json.dumps(short.to_dict()))) == short
    with pytest.raises(MessageError):
        CpuMeasurement(wall_s=1.0, cpu_s=None, cores=1, percent_of_one_core=None, utilisation=None)


def test_cpu_share_is_bounded_by_threads_and_cores() -> None:
    from edge_sdk.metrics import CpuMeasurement

    one_thread = CpuMeasurement.from_deltas(1.0, 2.99, cores=4, threads=1, tick_s=0.01)
    assert one_thread.percent_of_one_core == 100.0 and one_thread.utilisation == pytest.approx(0.25)
    assert one_thread.cpu_s == pytest.approx(2.99) and one_thread.to_dict()["threads"] == 1
    more_threads_than_cores = CpuMeasurement.from_deltas(1.0, 5.0, cores=2, threads=8, tick_s=0.01)
    assert more_threads_than_cores.percent_of_one_core == 200.0 and more_threads_than_cores.utilisation == 1.0
    plain = CpuMeasurement.from_deltas(1.0, 0.5, cores=2, tick_s=0.01)
    assert plain.percent_of_one_core == pytest.approx(50.0) and "insufficient_data" not in plain.to_dict()


def test_power_estimate_from_a_too_short_cpu_window_is_no_number() -> None:
    from edge_sdk.metrics import PowerMeasurement

    source = EstimatedSource(10.0, 65.0, model_name="generic", cpu_sampler_factory=fixed_cpu_sampler(0.004, 0.03, 2))
    with EnergyWindow(source) as window:
        pass
    power = PowerMeasurement.from_energy(window.result, 220)
    assert power.watts is None and power.joules is None and power.joules_per_inference is None
    assert power.insufficient_data is not None and "CPU share" in power.insufficient_data
    assert power.to_dict()["watts"] is None and PowerMeasurement.from_dict(power.to_dict()) == power

    long_enough = EstimatedSource(10.0, 65.0, cpu_sampler_factory=fixed_cpu_sampler(2.0, 1.0, 2))
    with EnergyWindow(long_enough) as window:
        pass
    figures = PowerMeasurement.from_energy(window.result, 100)
    assert figures.watts == pytest.approx(10.0 + 55.0 * 0.25) and figures.insufficient_data is None
    assert "insufficient_data" not in figures.to_dict()


def test_sampled_sensor_window_shorter_than_its_interval_is_no_number(tmp_path: Path) -> None:
    from edge_sdk.metrics import PowerMeasurement

    battery_tree(tmp_path, power_now=7_500_000)
    source = BatterySource(tmp_path, interval_s=0.25, clock=FakeClock(step=0.01))
    energy = source.stop(source.start())
    assert energy.insufficient_data is not None and "sampling interval" in energy.insufficient_data
    assert PowerMeasurement.from_energy(energy, 10).watts is None


def test_heap_reading_and_trimming_work_on_glibc() -> None:
    from edge_sdk.metrics import heap_in_use_bytes, release_free_heap

    before = heap_in_use_bytes()
    if before is None:
        pytest.skip("no mallinfo2 in this C library")
    block = bytearray(8 << 20)
    after = heap_in_use_bytes()
    assert after is not None and after - before >= 8 << 20
    del block
    assert release_free_heap() is True


def test_latency_keeps_a_bounded_set_of_samples_that_round_trips() -> None:
    from edge_sdk.errors import MessageError
    from edge_sdk.metrics._latency import KEPT_SAMPLES, MAX_READ_SAMPLES

    few = LatencyStats.from_samples([0.003, 0.001, 0.002])
    assert few.samples_ms == pytest.approx((1.0, 2.0, 3.0))
    many = LatencyStats.from_samples([i / 1e6 for i in range(1, 10_001)])
    assert many.samples_ms is not None and len(many.samples_ms) == KEPT_SAMPLES
    assert list(many.samples_ms) == sorted(many.samples_ms)
    assert many.samples_ms[0] >= many.min_ms and many.samples_ms[-1] <= many.max_ms
    assert LatencyStats.from_dict(many.to_dict()).samples_ms == many.samples_ms
    old = {k: v for k, v in many.to_dict().items() if k != "samples_ms"}
    assert LatencyStats.from_dict(old).samples_ms is None and "samples_ms" not in LatencyStats.from_dict(old).to_dict()
    with pytest.raises(MessageError, match="samples_ms"):
        LatencyStats.from_dict({**old, "samples_ms": [1.0] * (MAX_READ_SAMPLES + 1)})
    with pytest.raises(MessageError):
        LatencyStats.from_dict({**old, "samples_ms": [1.0, float("nan")]})
