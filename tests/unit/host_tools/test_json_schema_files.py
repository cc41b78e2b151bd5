"""Every `edgectl` command with `--json` has a versioned JSON Schema file, and its output names it.

The commands are found by walking the CLI, so a new command with `--json` and no schema file
fails here. Outputs of real commands are checked in tests/integration/test_json_outputs.py
(and by every integration test through harness.Host.run); the ones that need no broker, key or
model are also checked here, in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from json_schemas import SCHEMA_DIR, json_commands, registry, schema_path, validate_output
from jsonschema import Draft202012Validator

from edge_sdk.errors import ExitCode
from host_tools.cli import ERROR_SCHEMA, cli, command_names, json_schema_id, json_schema_of

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
        (["init", "--json", "--broker", "mqtt://127.0.0.1:18830"], ExitCode.OK),
        (["config", "show", "--json"], ExitCode.OK),
        (["keys", "show", "--json"], ExitCode.LOCAL_STATE),  # no keys yet
        (["devices", "--json"], ExitCode.USAGE),  # no --broker
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
