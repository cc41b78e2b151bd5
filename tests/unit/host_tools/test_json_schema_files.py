"""Every `edgectl` command with `--json` has a versioned JSON Schema file, and its output names it.

The commands are found by walking the CLI, so a new command with `--json` and no schema file
fails here. Outputs of real commands are checked in tests/integration/test_json_outputs.py
(and by every integration test through harness.Host.run); the ones that need no broker, key or
model are also checked here, in-process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from json_schemas import SCHEMA_DIR, json_commands, registry, schema_path, validate_output
from jsonschema import Draft202012Validator, ValidationError

from edge_sdk.errors import ExitCode
from edge_sdk.protocol import DeviceStatus, Heartbeat
from host_tools.cli import ERROR_SCHEMA, cli, command_names, json_schema_id, json_schema_of
from host_tools.fleet.collector import record_message
from host_tools.fleet.registry import BundleRef, DeviceRecord, open_registry
from host_tools.fleet.rollout_plan import RolloutPlanner, RolloutPolicy, Target
from host_tools.fleet.rollout_store import RolloutStore

#: Schema files that are not one command's output: the failure object, and shared definitions.
NOT_COMMANDS = {ERROR_SCHEMA, "common"}


@pytest.mark.parametrize("name", sorted(json_commands()))
def test_every_json_command_has_its_schema_file(name: str) -> None:
    path = schema_path(name)
    assert path.is_file(), f"`edgectl {' '.join(json_commands()[name])} --json` has no schema: write {path}"
    schema = json.loads(path.read_text())
    assert schema["$id"] == json_schema_id(name)
    assert schema["title"] and schema["description"]
    # Every command's JSON may be a failure: the shared error object is one of its forms.
    assert {"$ref": json_schema_id(ERROR_SCHEMA)} in schema["anyOf"]


def test_every_schema_file_is_valid_and_named_by_its_id() -> None:
    files = sorted(SCHEMA_DIR.glob("*.json"))
    assert files
    for path in files:
        schema = json.loads(path.read_text())
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", path
        name, version = path.name.removesuffix(".json").rsplit(".v", 1)
        assert schema["$id"] == f"urn:edge-sdk:edgectl:{name}:v{version}", path
        assert name in json_commands() or name in NOT_COMMANDS, f"{path} belongs to no command"
    registry()  # every $ref resolves among them (checked when used below)


def test_the_error_object_kinds_are_the_exit_code_kinds() -> None:
    error = json.loads(schema_path(ERROR_SCHEMA).read_text())["$defs"]["error"]
    assert error["properties"]["kind"]["enum"] == [c.kind for c in ExitCode if c is not ExitCode.OK]
    assert error["properties"]["exit_code"]["maximum"] == max(ExitCode)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--home", "keys", "keys", "show", "--json"], ["keys", "show"]),
        (["--registry=x", "-vv", "devices", "--broker", "enroll", "--json"], ["devices"]),
        (["devices", "enroll", "show"], ["devices", "enroll"]),
        (["--json", "nosuch"], []),
        (["config", "--", "show"], ["config"]),
    ],
)
def test_command_names_skip_options_and_their_values(args: list[str], names: list[str]) -> None:
    assert command_names(cli, args) == names


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["init", "--json", "--broker", "mqtt://127.0.0.1:1"], ExitCode.OK),
        (["config", "show", "--json"], ExitCode.OK),
        (["keys", "show", "--json"], ExitCode.LOCAL_STATE),  # no keys yet
        (["devices", "--json", "--state", "gone"], ExitCode.USAGE),  # not a state
        (["metrics", "--json", "--bogus"], ExitCode.USAGE),
        (["--json", "nosuch"], ExitCode.USAGE),
        (["keys", "--json"], ExitCode.USAGE),  # a group without --json: the error schema
    ],
)
def test_outputs_and_failures_name_and_meet_their_schema(edgectl_env: Path, args: list[str], code: int) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    data = validate_output(args, result.stdout)
    expected = json_schema_id(json_schema_of(cli, args))
    assert data["$schema"] == expected and ("error" in data) == (code != ExitCode.OK)
    assert (expected == json_schema_id(ERROR_SCHEMA)) == (args[0] in ("--json", "keys") and len(args) == 2)


def _registry_with_a_fleet(home: Path) -> str:
    """A SQLite registry with labelled devices, two kept runs and a rollout; returns the rollout's id."""
    now, broker = time.time(), "mqtt://127.0.0.1:1"
    with open_registry(home / "registry.db") as reg:
        for i in range(3):
            status = DeviceStatus(f"dev-{i}", "online", now - 5, labels={"site": f"depot-{i}"}, heartbeat_s=60)
            record_message(reg, status, now, broker)
            record_message(reg, Heartbeat(f"dev-{i}", now, 60.0), now, broker)
        reg.upsert_device(DeviceRecord("pi-1", "offline", now - 900, active_bundles=(BundleRef("m", 1),)))
        outcome = {"device_id": "pi-1", "state": "installed", "metrics": {"latency": {"p50_ms": 2.0, "p99_ms": 4.0}}}
        for p99 in (4.0, 5.0):
            results = {"outcomes": [{**outcome, "metrics": {"latency": {"p50_ms": 2.0, "p99_ms": p99}}}]}
            reg.add_run("profile", now, {"bundle": {"path": "/m.edge", "sha256": "00" * 32}}, results)
        planner = RolloutPlanner.plan(RolloutPolicy(canary_count=1, canary_share=None), [Target("pi-1", 1)], now)
        return RolloutStore(reg).create(planner, bundle=("m", 2, "00" * 32, "/m.edge"), selector="pi-1", now=now).id


def test_registry_commands_outputs_meet_their_schemas(edgectl_env: Path) -> None:
    rollout_id = _registry_with_a_fleet(edgectl_env)
    for args in (
        ["devices", "--json"],
        ["devices", "--json", "--state", "stale"],
        ["devices", "label", "dev-0", "site=lab", "tier=canary", "--json"],
        ["groups", "add", "lab", "site=lab", "--json"],
        ["groups", "list", "--json"],
        ["groups", "rm", "lab", "--json"],
        ["groups", "rm", "lab", "--json"],
        ["runs", "--json"],
        ["compare", "1", "2", "--json"],
        ["compare", "1", "9", "--json"],  # no run 9: the failure, in compare's schema
        ["rollout", "status", "--json"],
        ["rollout", "status", rollout_id, "--json"],
        ["rollout", "pause", rollout_id, "--json"],
        ["rollout", "status", "nope", "--json"],
        ["report", "--png", str(edgectl_env / "png"), "--json"],
        ["report", "--json"],  # neither --html nor --png: a usage error
    ):
        result = CliRunner().invoke(cli, ["--home", str(edgectl_env), *args])
        data = validate_output(args, result.stdout)
        assert ("error" in data) == (result.exit_code != ExitCode.OK), (args, result.output)
        assert data or args == ["devices", "--json", "--state", "stale"], args  # each shows what it read


@pytest.mark.parametrize(
    ("args", "item"),
    [
        (["devices", "--json"], {"device_id": "dev-0", "state": "sideways"}),
        (["groups", "add", "g", "a=b", "--json"], {"created_at": "yesterday"}),
        (["rollout", "status", "--json"], {"status": "halfway"}),
    ],
)
def test_schemas_refuse_what_their_commands_never_print(
    edgectl_env: Path, args: list[str], item: dict[str, str]
) -> None:
    _registry_with_a_fleet(edgectl_env)
    data = validate_output(args, CliRunner().invoke(cli, ["--home", str(edgectl_env), *args]).stdout)
    bad = [{**data[0], **item}] if isinstance(data, list) else {**data, **item}
    with pytest.raises(ValidationError):
        validate_output(args, json.dumps(bad))
