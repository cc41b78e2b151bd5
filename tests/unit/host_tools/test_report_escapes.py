"""Every renderer in host_tools.report, fed device- and bundle-supplied strings full of escape
sequences, prints nothing a terminal would interpret.

The renderers are found, not listed: every public function of every module of
``host_tools.report`` must have a case in :data:`CASES` (a new renderer without one fails
:func:`test_every_renderer_has_a_hostile_case`). Each case's text goes through the CLI's
output path for people, its JSON-ready data through the ``--json`` path, as ``edgectl``
prints them.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

import host_tools.report
from edge_sdk.bundle import FileEntry, Manifest
from edge_sdk.errors import EdgeError
from edge_sdk.metrics import LatencyStats, ModelMemory, PowerMeasurement
from edge_sdk.protocol import ErrorInfo, Event, EventKind, MetricsReport
from edge_sdk.trust import SigningKey
from host_tools.cli import HostConfig, _emit
from host_tools.compress import CompressionReport, CompressJobResult, ModelMetrics, PackedFile, StepReport
from host_tools.compress.tflite.quantize import TfliteCompression, TfliteMetrics
from host_tools.config import Resolved
from host_tools.demo import DemoResult, DemoRow
from host_tools.fleet.collect_service import CollectCounts
from host_tools.fleet.deployer import DeployOutcome
from host_tools.fleet.inventory import DeviceView
from host_tools.fleet.profiler import ProfileOutcome
from host_tools.fleet.registry import (
    BundleRef,
    DeviceRecord,
    DeviceRow,
    EnrolmentRecord,
    ForgetResult,
    GroupRecord,
    RunRecord,
)
from host_tools.fleet.rollout_plan import RolloutPolicy
from host_tools.fleet.rollout_store import RolloutRecord
from host_tools.fleet.rollouts import DeviceEnd, RolloutReport
from host_tools.keys import RoleSummary, RootSummary
from host_tools.packing import BundleCheck, BundleChecklist, CheckItem, PackedBundle, ResignedBundle
from host_tools.provision import CaSummary, Provisioned
from host_tools.report import bundle, compress, demo, fleet, keys, provision, rollouts, runs, simulation, table
from host_tools.report import config as config_report
from host_tools.report.progress import ProgressLines
from host_tools.report.safe_text import escape_for_terminal

# ESC [2J (clear screen), OSC 52 (write the clipboard), CSI as the one byte 0x9b, BEL,
# backspace, carriage return, a bidi override and an isolate.
EVIL = "X\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07\x9b31m\x08\r\u202eevil\u2066"
SHOWN = escape_for_terminal(EVIL)
RAW = {chr(c) for c in (*range(0x00, 0x0A), *range(0x0B, 0x20), *range(0x7F, 0xA0))}
RAW |= {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}

#: Public names of host_tools.report modules that render nothing a device or bundle supplies.
NOT_RENDERERS = {"safe_text.escape_for_terminal", "safe_text.TerminalSafeFormatter", "table.Column"} | {
    # Not terminal output: data for plots (data.*), matplotlib figures (plots.*), the
    # Prometheus exposition (exporter.*, its labels checked there) and the HTML report
    # (html.*, escaped as HTML and tested in tests/unit/host_tools/report).
    f"{module}.{name}"
    for module, names in {
        "data": ("CompressionVariant", "DeviceRow", "EnergyPoint", "FleetData", "LatencySeries", "RolloutProgress",
                 "TimelineEvent", "parse_devices", "parse_since", "read_fleet"),
        "plots": ("Plot", "pareto_front", "plot_energy", "plot_latency", "plot_pareto", "plot_timeline", "png_bytes"),
        "exporter": ("CONTENT_TYPE", "FleetExporter", "LATENCY_BUCKETS_S", "exposition", "serve_exporter"),
        "html": ("Report", "build_report", "render_html", "write_report"),
    }.items()
    for name in names
}  # fmt: skip

LATENCY = LatencyStats(
    count=10, mean_ms=1.0, stdev_ms=0.1, min_ms=0.9, max_ms=2.0, p50_ms=1.0, p90_ms=1.5, p99_ms=2.0,
    throughput_per_s=900.0,
)  # fmt: skip
MEMORY = ModelMemory(
    rss_before_load_bytes=0, rss_after_load_bytes=0, model_bytes=0, start_bytes=0, peak_bytes=1 << 20,
    sampled_peak_bytes=1 << 20, hwm_bytes=None, samples=1,
)  # fmt: skip
POWER = PowerMeasurement(
    joules=1.0, seconds=1.0, watts=1.0, source=EVIL, estimated=True, joules_per_inference=0.001
)  # fmt: skip


def _metrics() -> MetricsReport:
    # The device id is checked on the wire; every other string is the device's to choose.
    return MetricsReport(
        "dev-1", EVIL, 2, EVIL, EVIL, ts=1.0, latency=LATENCY, memory=MEMORY, power=POWER, providers=(EVIL,)
    )


def _manifest() -> Manifest:
    # Name and runtime are checked; precision and file paths are the packer's to choose.
    files = (FileEntry("model.onnx", 1, "0" * 64),)
    return Manifest("digits", 2, 0.0, 10.0, "onnxruntime", "model.onnx", files, precision=EVIL)


def _record() -> DeviceRecord:
    return DeviceRecord(
        EVIL, "online", 0.0, platform={"kind": EVIL, "arch": EVIL, "memory_bytes": 1 << 30, "model": EVIL},
        runtimes={EVIL: "1.0", "onnxruntime": EVIL}, agent_version=EVIL, active_bundles=(BundleRef(EVIL, 1),),
        broker=EVIL,
    )  # fmt: skip


def _labelled() -> DeviceView:
    """A device whose own labels and operator labels are attacker-chosen (the registry may hold anything)."""
    record = DeviceRecord(EVIL, "online", 0.0, broker=EVIL, labels={EVIL: EVIL, "site": EVIL})
    return DeviceView(record, False, "", "stale", {"site": EVIL + "o"})


def _evil_row() -> DeviceRow:
    """A stored device row whose every string is attacker-chosen."""
    evil = json.dumps(EVIL)
    return DeviceRow(
        EVIL, "online", f'{{"kind": {evil}}}', f"{{{evil}: {evil}}}", EVIL, f'[{{"name": {evil}, "version": 2}}]',
        0.0, 1.0, EVIL, f'{{"site": {evil}}}', 60.0, None,
    )  # fmt: skip


def _row_json() -> Any:
    """``devices --json`` written from a stored row whose every string is attacker-chosen: ASCII, exact JSON."""
    row = _evil_row()
    text = fleet.device_row_json(row, "stale", {EVIL: EVIL}, 10.0, {EVIL: {EVIL: 1}})
    assert text.isascii() and "\n" not in text
    return json.loads(text)


def _rows_json() -> Any:
    """A listing's JSON (``device_rows_json``) of two attacker-chosen rows, one the operator labelled."""
    row = _evil_row()
    texts = list(fleet.device_rows_json([(row, "stale", {EVIL: EVIL}), (row, "online", {})], 10.0, {EVIL: {EVIL: 1}}))
    assert all(text.isascii() and "\n" not in text for text in texts)
    return [json.loads(text) for text in texts]


def _views() -> list[DeviceView]:
    return [DeviceView(_record(), True, EVIL), DeviceView(_record(), False, EVIL)]


def _deploy(state: str, **kw: Any) -> DeployOutcome:
    return DeployOutcome(EVIL, EVIL, 2, "ab" * 32, "t1", state, **kw)


def _profile() -> ProfileOutcome:
    return ProfileOutcome(EVIL, EVIL, 2, "profiled", metrics=_metrics())


def _event(kind: str) -> Event:
    return Event("dev-1", kind, 1.0, error=ErrorInfo(EVIL, EVIL, {EVIL: EVIL}), detail={EVIL: EVIL, "x": [EVIL]})


def _compression() -> CompressionReport:
    m = ModelMetrics(4096, 10, 0.5, 0.9, EVIL, 0.1)
    notes = {"float_nodes": [EVIL], "packed_bytes": 10, "factorized_params_before": 1}
    notes["layers"] = [{"layer": EVIL, "rank": 1, "full_rank": 2}]
    return CompressionReport(m, (StepReport(EVIL, True, 0.1, m, notes),))


def _tflite() -> TfliteCompression:
    m = TfliteMetrics(8192, MappingProxyType({EVIL: 2}), 0.9, EVIL, 0.25)
    return TfliteCompression(b"", EVIL, EVIL, m, m)


def _demo_rows() -> tuple[DemoRow, ...]:
    return (DemoRow(EVIL, EVIL, 4096, 0.9, _metrics()), DemoRow(EVIL, EVIL, 1024, 0.9, _metrics()))


PATH = Path(f"/tmp/{EVIL}.bundle")


def _enrolment() -> EnrolmentRecord:
    return EnrolmentRecord(EVIL, SigningKey.generate().public_key.raw.hex(), "pending", 0.0)


def _rollout() -> RolloutRecord:
    # Everything but the numbers and our own status words is a registry row's to hold.
    return RolloutRecord(
        EVIL, EVIL, 2, EVIL, f"/tmp/{EVIL}", EVIL, RolloutPolicy(), "running", 1, 3, EVIL, EVIL, 0.0, 1.0, EVIL, 1.0
    )


WAVES = ({"succeeded": 1, EVIL: 1}, {"failed": 1, "pending": 2}, {})


def _rollout_report() -> RolloutReport:
    devices = (
        DeviceEnd(EVIL, 0, EVIL, 1, EVIL, 1.5, 1 << 20, 2, True),
        DeviceEnd(EVIL, 1, EVIL, 2, None, None, None, None, False),
    )
    return RolloutReport(_rollout(), devices, WAVES)


def _runs() -> tuple[RunRecord, RunRecord]:
    """A compression and a deploy whose file names, hashes, metrics and device outcomes are attacker-chosen."""
    final = {"size_bytes": 200, "quality": 0.97, "quality_metric": EVIL, "latency_p50_ms": 0.5}
    compressed = RunRecord(
        1, "compress", 1000.0, {"model": {"path": f"/tmp/{EVIL}.onnx", "sha256": EVIL}, "output": {"sha256": EVIL}},
        {"output": EVIL, "report": {"final": final, "steps": [EVIL]}},
    )  # fmt: skip
    latency = {"p50_ms": 1.0, "p90_ms": 1.5, "p99_ms": 2.0}
    outcomes = [{"device_id": EVIL, "state": EVIL, "metrics": {"latency": latency}}, {"device_id": EVIL + "2"}]
    bundle_file = {"path": f"/tmp/{EVIL}", "sha256": EVIL, "size_bytes": 10}
    deployed = RunRecord(2, "deploy", 2000.0, {"bundle": bundle_file, "bundle_name": EVIL}, {"outcomes": outcomes})
    return compressed, deployed


def _sim() -> dict[str, Any]:
    """:meth:`SimFleet.to_dict` with the operator's and the file system's strings attacker-chosen."""
    return {
        "devices": 10, "processes": [{"pid": 1, "spec": EVIL}], "runtime": EVIL, "simulated_latency": True,
        "broker": EVIL, "root": f"/tmp/{EVIL}", "started_in_s": 1.0, "seed": 1, "faults": {EVIL: [EVIL] * 10},
    }  # fmt: skip


#: One call per renderer with every string it takes chosen by an attacker.
CASES: dict[str, Callable[[], Any]] = {
    "bundle.packed_text": lambda: bundle.packed_text(PackedBundle(PATH, (EVIL,), _manifest())),
    "bundle.check_text": lambda: bundle.check_text(BundleCheck(PATH, (EVIL, f"file {EVIL}: ok"), _manifest())),
    "bundle.resigned_text": lambda: bundle.resigned_text(
        ResignedBundle(PATH, PATH, (EVIL,), (EVIL,), 1, (EVIL,), _manifest())
    ),
    "compress.quality_cell": lambda: compress.quality_cell(0.5, EVIL),
    "compress.compress_table": lambda: compress.compress_table(_compression(), PATH),
    "compress.packed_line": lambda: compress.packed_line(PackedFile(PATH, 10, (EVIL,)), _compression()),
    "compress.tflite_table": lambda: compress.tflite_table(_tflite(), PATH),
    "compress.compress_text": lambda: compress.compress_text(
        CompressJobResult(PATH, _compression(), PackedFile(PATH, 10, (EVIL,)))
    ),
    "demo.demo_table": lambda: demo.demo_table(_demo_rows()),
    "demo.demo_text": lambda: demo.demo_text(DemoResult(_demo_rows(), 1.0)),
    "fleet.power_cell": lambda: fleet.power_cell(POWER),
    "fleet.metrics_table": lambda: fleet.metrics_table([_metrics()]),
    "fleet.metrics_text": lambda: fleet.metrics_text([_metrics()]),
    "fleet.seen_text": lambda: fleet.seen_text(0.0, 10.0),
    "fleet.devices_text": lambda: fleet.devices_text(_views(), 10.0),
    "fleet.devices_data": lambda: fleet.devices_data(_views(), 10.0),
    "fleet.device_data": lambda: fleet.device_data(_labelled(), 10.0),
    "fleet.device_row_json": _row_json,
    "fleet.device_rows_json": _rows_json,
    "fleet.labels_cell": lambda: fleet.labels_cell(_labelled()),
    "fleet.labels_text": lambda: fleet.labels_text(_labelled()),
    "fleet.groups_text": lambda: fleet.groups_text([GroupRecord(EVIL, EVIL, 0.0)]),
    "fleet.forget_text": lambda: fleet.forget_text(ForgetResult(EVIL, (EVIL, ""), 1, 1, 1), EVIL),
    "fleet.outcome_data": lambda: fleet.outcome_data(_deploy("refused", error=EdgeError(EVIL, why=EVIL))),
    "fleet.deploy_data": lambda: fleet.deploy_data(_deploy("installed", metrics=_metrics(), checks=(EVIL,))),
    "fleet.refusal_text": lambda: fleet.refusal_text(_deploy(EVIL, error=EdgeError(EVIL))),
    "fleet.deploy_many_data": lambda: fleet.deploy_many_data(
        [_deploy("installed", metrics=_metrics(), checks=(EVIL,)), _deploy(EVIL, error=EdgeError(EVIL))]
    ),
    "fleet.deploy_many_text": lambda: fleet.deploy_many_text(
        [_deploy("installed", metrics=_metrics()), _deploy(EVIL, error=EdgeError(EVIL))]
    ),
    "fleet.deploy_text": lambda: (
        fleet.deploy_text(_deploy("installed", metrics=_metrics()))
        + "\n"
        + fleet.deploy_text(_deploy("deferred", detail={"reason": EVIL, "retry_s": EVIL}))
    ),
    "fleet.profile_text": lambda: fleet.profile_text(_profile()),
    "fleet.command_data": lambda: fleet.command_data(EVIL, _event(EventKind.REFUSED)),
    "fleet.command_text": lambda: (
        fleet.command_text(EVIL, _event(EventKind.DONE), EVIL)
        + "\n"
        + fleet.command_text(EVIL, _event(EventKind.REFUSED), EVIL)
    ),
    "keys.root_text": lambda: keys.root_text(RootSummary(PATH, 1, 0.0, (RoleSummary(EVIL, 1, ((EVIL, False),)),))),
    "table.format_bytes": lambda: table.format_bytes(1536),
    "table.format_time": lambda: table.format_time(0.0),
    "fleet.local_time": lambda: fleet.local_time(0.0),
    "provision.ca_text": lambda: provision.ca_text(CaSummary(True, PATH, EVIL, EVIL, 0.0, (PATH,)), EVIL),
    "provision.provisioned_text": lambda: provision.provisioned_text(
        Provisioned(EVIL, PATH, f"/etc/{EVIL}", (PATH,), False, None)
    ),
    "fleet.enrolments_data": lambda: fleet.enrolments_data([_enrolment()]),
    "fleet.enrolments_text": lambda: fleet.enrolments_text([_enrolment()], EVIL),
    "bundle.checklist_text": lambda: bundle.checklist_text(
        BundleChecklist(PATH, (CheckItem(EVIL, "ok", EVIL), CheckItem(EVIL, "failed", EVIL)), _manifest())
    ),
    "progress.ProgressLines": lambda: ProgressLines(EVIL).update(1, 2, 0.0),
    # A config file or an environment variable is written by someone else than the one reading it.
    "config.settings_data": lambda: config_report.settings_data({"broker": _setting()}, PATH, True),
    "config.settings_text": lambda: config_report.settings_text({"broker": _setting()}, PATH, False),
    "config.init_data": lambda: config_report.init_data(PATH, [_setting()], True),
    "config.init_text": lambda: config_report.init_text(PATH, [_setting()], False),
    "table.render_table": lambda: table.render_table([table.Column(EVIL, lambda r: r)], [EVIL, None]),
    "fleet.collect_line": lambda: fleet.collect_line(CollectCounts(9, 5, 4, 2, 2, 0, 1, 1).to_dict(), 3.0),
    "fleet.collect_text": lambda: fleet.collect_text(CollectCounts(9, 5, 4, 2, 2, 0, 1, 1).to_dict(), 3.0),
    "rollouts.wave_line": lambda: rollouts.wave_line(1, WAVES[0], True) + "\n" + rollouts.wave_line(0, WAVES[0], False),
    "rollouts.rollout_text": lambda: (
        rollouts.rollout_text(_rollout_report(), bars=True) + "\n" + rollouts.rollout_text(_rollout_report())
    ),
    "rollouts.rollout_list_text": lambda: rollouts.rollout_list_text([_rollout()]),
    "runs.run_facts": lambda: runs.run_facts(_runs()[1]),
    "runs.runs_data": lambda: runs.runs_data(_runs()),
    "runs.runs_text": lambda: runs.runs_text(_runs()),
    "runs.compare_runs": lambda: runs.compare_runs(*_runs()),
    "runs.compare_text": lambda: runs.compare_text(runs.compare_runs(*_runs())),
    "simulation.sim_text": lambda: simulation.sim_text(_sim()),
}


def _setting() -> Resolved:
    return Resolved("broker", EVIL, f"env {EVIL}")


#: Renderers whose output carries no string an attacker chooses (numbers and our own words).
NO_HOSTILE_TEXT = {
    "fleet.seen_text",
    "table.format_bytes",
    "table.format_time",
    "fleet.local_time",
    "fleet.power_cell",
    "compress.quality_cell",
    "fleet.collect_line",
    "fleet.collect_text",
}


def _public_functions() -> set[str]:
    names = set()
    for info in pkgutil.iter_modules(host_tools.report.__path__):
        module = importlib.import_module(f"host_tools.report.{info.name}")
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                names.add(f"{info.name}.{name}")
    return names - NOT_RENDERERS


def test_every_renderer_has_a_hostile_case() -> None:
    assert _public_functions() == set(CASES)


def _raw(text: str) -> list[str]:
    return sorted({f"U+{ord(ch):04X}" for ch in text if ch in RAW or 0xD800 <= ord(ch) <= 0xDFFF})


@pytest.mark.parametrize("name", sorted(CASES))
def test_renderer_output_reaches_the_terminal_escaped(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    rendered = CASES[name]()
    if isinstance(rendered, str) or rendered is None:
        # What edgectl prints for people: the text through the one output function.
        _emit(HostConfig(Path("/home"), "r", json_output=False), None, rendered or "")
        out = capsys.readouterr().out
        assert _raw(out) == [], f"{name} printed raw control characters"
        if name not in NO_HOSTILE_TEXT:
            assert SHOWN in out or escape_for_terminal(EVIL, multiline=True) in out, name
    else:
        # What edgectl prints with --json: exact JSON, every unsafe character a \\u escape.
        _emit(HostConfig(Path("/home"), "r", json_output=True), rendered, "")
        out = capsys.readouterr().out
        assert _raw(out) == [] and out.isascii(), f"{name} --json printed raw characters"
        assert json.loads(out) == json.loads(json.dumps(rendered, default=str))
        assert EVIL in _strings(json.loads(out))  # the device's string comes back exactly


def _strings(value: Any) -> set[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set(value) | {s for v in value.values() for s in _strings(v)}
    if isinstance(value, list):
        return {s for v in value for s in _strings(v)}
    return set()


def test_a_hostile_cell_keeps_the_table_aligned() -> None:
    # The table alone, before the output function: every cell is already escaped, and
    # each column is as wide as its widest cell as shown.
    header, rule, *rows = fleet.devices_text(_views(), 10.0).split("\n\n")[0].splitlines()
    assert _raw("\n".join([header, rule, *rows])) == [] and len(rows) == 2
    widths = [len(dashes) for dashes in rule.split("  ")]
    assert widths[0] == len(SHOWN) and rows[0].startswith(SHOWN + "  ")
    column_starts = [sum(widths[:i]) + 2 * i for i in range(len(widths))]
    assert rows[0][column_starts[1] : column_starts[1] + len(SHOWN)] == SHOWN  # the broker column lines up


def test_a_rollout_shows_its_selector_escaped_like_every_other_field(capsys: pytest.CaptureFixture[str]) -> None:
    _emit(HostConfig(Path("/home"), "r", json_output=False), None, rollouts.rollout_text(_rollout_report()))
    head = capsys.readouterr().out.splitlines()[0]
    assert head == f"rollout {SHOWN}: {SHOWN} v2 to '{SHOWN}': running, wave 1 of 2"
