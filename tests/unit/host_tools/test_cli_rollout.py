"""`edgectl rollout` in-process: what it refuses before any broker is touched, and its registry-only commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_sdk.errors import ExitCode
from host_tools.cli import cli
from host_tools.fleet.registry import BundleRef, DeviceRecord, open_registry
from host_tools.fleet.rollout_plan import RolloutPlanner, RolloutPolicy, Target
from host_tools.fleet.rollout_store import RolloutStore


def _edgectl(home: Path, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["--home", str(home), *args])


@pytest.mark.parametrize(
    "flags",
    [
        ["--canary", "lots"],
        ["--canary", "150%"],
        ["--abort-threshold", "3 percent"],
        ["--wave-size", "4", "--wave-factor", "2"],
        ["--window", "9-5"],
    ],
)
def test_bad_rollout_flags_are_usage_errors_before_the_broker(tmp_path: Path, flags: list[str]) -> None:
    bundle = tmp_path / "b.edge"
    bundle.write_bytes(b"not read: the flags fail first")
    assert _edgectl(tmp_path, "keys", "init").exit_code == 0
    r = _edgectl(tmp_path, "rollout", "start", str(bundle), "--to", "a", *flags, "--broker", "mqtt://127.0.0.1:9")
    assert r.exit_code == ExitCode.USAGE, r.output
    assert "edgectl: broker" not in r.output and "does not know" not in r.output  # the flag, not the selector


def test_status_lists_rollouts_and_pause_without_a_runner_takes_effect_at_once(tmp_path: Path) -> None:
    assert json.loads(_edgectl(tmp_path, "rollout", "status", "--json").output) == []
    with open_registry(tmp_path / "registry.db") as reg:
        reg.ensure_schema()
        reg.upsert_device(DeviceRecord("pi-1", "online", 1000.0, active_bundles=(BundleRef("m", 1),)))
        planner = RolloutPlanner.plan(RolloutPolicy(canary_count=1, canary_share=None), [Target("pi-1", 1)], 1000.0)
        rid = RolloutStore(reg).create(planner, bundle=("m", 2, "00" * 32, "/x.edge"), selector="pi-1", now=1000.0).id
    listed = _edgectl(tmp_path, "rollout", "status")
    assert rid in listed.output and "running" in listed.output

    paused = _edgectl(tmp_path, "rollout", "pause", rid, "--json")
    assert paused.exit_code == 0, paused.output
    assert json.loads(paused.output)["status"] == "paused" and json.loads(paused.output)["runner_live"] is False
    shown = _edgectl(tmp_path, "rollout", "status", rid)
    assert "paused" in shown.output and "canary" in shown.output and "pi-1" in shown.output
    data = json.loads(_edgectl(tmp_path, "rollout", "status", rid, "--json").output)
    assert data["waves_progress"] == [{"queued": 1}]
    assert data["devices"][0] | {"runs": 1} == data["devices"][0]  # what the registry says it runs

    missing = _edgectl(tmp_path, "rollout", "status", "nope")
    assert missing.exit_code == ExitCode.USAGE and "no rollout 'nope'" in missing.output
