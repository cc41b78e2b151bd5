"""The JSON Schemas of `edgectl --json` (schemas/edgectl/), and a check of one command's output against its schema.

Every `edgectl ... --json` that :meth:`harness.Host.run` makes is checked here, so the
integration tests validate each output they see; ``test_json_outputs.py`` runs every command
once to be sure each schema meets a real output.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import click
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from host_tools.cli import cli, json_schema_id, json_schema_name, json_schema_of

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas" / "edgectl"


def schema_path(name: str) -> Path:
    """The file of a command's current schema (``keys-show`` -> schemas/edgectl/keys-show.v1.json)."""
    version = json_schema_id(name).rsplit(":v", 1)[1]
    return SCHEMA_DIR / f"{name}.v{version}.json"


@cache
def registry() -> Registry:
    """Every schema file, by its ``$id`` (a command's schema refers to the shared error object)."""
    resources = []
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        schema = json.loads(path.read_text())
        Draft202012Validator.check_schema(schema)
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


def validate_output(args: tuple[str, ...] | list[str], stdout: str) -> Any:
    """Check what ``edgectl *args`` printed against its command's schema; returns the parsed JSON.

    Raises:
        AssertionError: the output names another schema than its command's, or has no schema file.
        jsonschema.ValidationError: the output does not match the schema.
    """
    name = json_schema_of(cli, list(args))
    data = json.loads(stdout)
    expected = json_schema_id(name)
    if isinstance(data, dict):
        assert data.get("$schema") == expected, f"edgectl {' '.join(args)} names {data.get('$schema')!r}"
    assert schema_path(name).is_file(), f"no schema file {schema_path(name)} for `edgectl {' '.join(name.split('-'))}`"
    schema = registry().contents(expected)
    Draft202012Validator(schema, registry=registry()).validate(data)
    return data


def json_commands() -> dict[str, list[str]]:
    """Schema name -> command words, for every command with a ``--json`` option (found by walking the CLI)."""
    found: dict[str, list[str]] = {}

    def walk(command: click.Command, names: list[str]) -> None:
        if any(p.name == "json_output" for p in command.params):
            found[json_schema_name(names)] = names
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*names, name])

    walk(cli, [])
    return found
