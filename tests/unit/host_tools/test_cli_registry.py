"""`edgectl devices` (registry only), `devices label` and `groups`, in-process against a real SQLite registry."""

from __future__ import annotations

import json
import time
from pathlib import Path

from click.testing import CliRunner

from edge_sdk.errors import ExitCode
from edge_sdk.protocol import DeviceStatus, Heartbeat
from host_tools.cli import cli, json_schema_id
from host_tools.fleet.collector import record_message
from host_tools.fleet.registry import open_registry

BROKER = "mqtt://127.0.0.1:1"


def _fleet(home: Path) -> None:
    now = time.time()
    with open_registry(home / "registry.db") as reg:
        for i in range(5):
            labels = {"site": "depot-3" if i < 3 else "depot-4", "hw": "pi5" if i % 2 else "pi4"}
            record_message(reg, DeviceStatus(f"dev-{i}", "online", now - 5, labels=labels, heartbeat_s=60), now, BROKER)
            record_message(reg, Heartbeat(f"dev-{i}", now, 60.0), now, BROKER)
        record_message(reg, DeviceStatus("dev-9", "online", now - 500, heartbeat_s=60), now - 500, BROKER)


def _edgectl(home: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["--home", str(home), *args], env={"EDGE_SDK_BROKER": ""})
    return result.exit_code, result.stdout, result.stderr


def _ids(home: Path, *args: str) -> list[str]:
    code, out, err = _edgectl(home, "devices", "--json", *args)
    assert code == 0, err
    return [d["device_id"] for d in json.loads(out)]


def test_listing_reads_the_registry_selects_filters_and_pages(tmp_path: Path) -> None:
    _fleet(tmp_path)
    assert _ids(tmp_path) == ["dev-0", "dev-1", "dev-2", "dev-3", "dev-4", "dev-9"]
    assert _ids(tmp_path, "--select", "site=depot-3,hw=pi5") == ["dev-1"]
    assert _ids(tmp_path, "--select", "hw!=pi4,site") == ["dev-1", "dev-3"]
    assert _ids(tmp_path, "--state", "stale") == ["dev-9"]
    assert _ids(tmp_path, "--state", "offline") == []
    code, out, err = _edgectl(tmp_path, "devices", "--json", "--limit", "2")
    assert code == 0 and [d["device_id"] for d in json.loads(out)] == ["dev-0", "dev-1"]
    cursor = err.strip().rsplit("--after ", 1)[1]
    assert cursor == f"dev-1/{BROKER}"
    assert _ids(tmp_path, "--after", cursor, "--limit", "3") == ["dev-2", "dev-3", "dev-4"]


def test_operator_labels_override_and_groups_select(tmp_path: Path) -> None:
    _fleet(tmp_path)
    code, out, err = _edgectl(tmp_path, "devices", "label", "dev-0", "site=depot-4", "tier=canary", "--json")
    assert code == 0, err
    assert json.loads(out)["label_sources"] == {"hw": "device", "site": "operator", "tier": "operator"}
    assert _ids(tmp_path, "--select", "site=depot-4") == ["dev-0", "dev-3", "dev-4"]
    assert _edgectl(tmp_path, "groups", "add", "d4", "site = depot-4, tier")[0] == 0
    code, out, _ = _edgectl(tmp_path, "groups", "list", "--json")
    assert [(g["name"], g["selector"]) for g in json.loads(out)] == [("d4", "site=depot-4,tier")]
    assert _ids(tmp_path, "--select", "@d4") == ["dev-0"]
    assert _edgectl(tmp_path, "devices", "label", "dev-0", "--remove", "tier")[0] == 0
    assert _ids(tmp_path, "--select", "@d4") == []
    code, out, _ = _edgectl(tmp_path, "groups", "rm", "d4", "--json")
    assert code == 0 and json.loads(out) == {"$schema": json_schema_id("groups-rm"), "name": "d4", "removed": True}
    assert _edgectl(tmp_path, "groups", "rm", "d4")[0] == 0  # removing it again is no error


def test_mistakes_are_usage_errors_naming_what_is_wrong(tmp_path: Path) -> None:
    _fleet(tmp_path)
    for args, named in [
        (("devices", "--select", "site=a b"), "site=a b"),
        (("devices", "--select", "@nope"), "no group 'nope'"),
        (("devices", "--after", "no-slash"), "bad cursor"),
        (("devices", "label", "ghost", "a=b"), "no device 'ghost'"),
        (("devices", "label", "dev-0", "Bad=x"), "bad label key"),
        (("devices", "label", "dev-0"), "KEY=VALUE"),
        (("groups", "add", "g", "id"), "needs a device id"),
        (("groups", "add", "Bad Name", "a=b"), "bad group name"),
    ]:
        code, out, err = _edgectl(tmp_path, *args)
        assert code == ExitCode.USAGE, (args, code, out, err)
        assert named in out + err, (args, out, err)
