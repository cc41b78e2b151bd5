"""The one exit-code table (``edge_sdk.errors.ExitCode``), row by row, on real `edgectl` and `edge-agent` processes.

- Every edgectl command, found by walking the click group (so a new command is covered
  without editing this file), given a missing input file: exit 2, a message naming the
  file, no traceback, and with ``--json`` an error object on stdout.
- A table of command -> expected code for each row of the table, for both programs: the
  same blame gives the same number whatever the command.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from harness import BIN, CliResult, Host

from edge_sdk.errors import ExitCode
from host_tools.cli import DataSource, InputFile, OutputFile, cli

pytestmark = pytest.mark.integration

UNREACHABLE = "mqtt://127.0.0.1:1"  # nothing listens on port 1: the connection is refused at once


# --- every command, given a missing input file ------------------------------------------


def _leaf_commands(
    group: click.Group = cli, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _leaf_commands(command, (*path, name))
        else:
            yield (*path, name), command


def _is_input(param: click.Parameter) -> bool:
    return isinstance(param.type, (InputFile, DataSource))


def _value_for(param: click.Parameter, existing: Path) -> str:
    """A valid value for a required parameter that is not the one under test."""
    if isinstance(param.type, InputFile):
        return str(existing)
    if isinstance(param.type, click.Choice):
        return str(param.type.choices[0])
    if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
        return "2000" if param.name == "chunk_size" else "1"
    if param.name == "broker":
        return UNREACHABLE
    return "x1"


def _argv(command: click.Command, missing_param: click.Parameter, missing: Path, existing: Path) -> list[str]:
    """Options and arguments for ``command``: ``missing`` for the parameter under test, valid values elsewhere."""
    options: list[str] = []
    arguments: list[str] = []
    for param in command.params:
        if param is missing_param:
            value = str(missing)
        elif param.required:
            value = _value_for(param, existing)
        else:
            continue
        if isinstance(param, click.Argument):
            arguments.append(value)
        else:
            options += [param.opts[0], value]
    return [*options, *arguments]


def _missing_file_cases() -> list[tuple[tuple[str, ...], str]]:
    return [
        (path, param.name or "") for path, command in _leaf_commands() for param in command.params if _is_input(param)
    ]


def test_every_path_parameter_says_whether_it_is_read_or_written() -> None:
    """A file parameter declared as a plain click.Path would escape the missing-file test below."""
    commands = dict(_leaf_commands())
    assert {"deploy", "profile", "pack", "verify", "compress"} <= {p[-1] for p in commands}
    for path, command in commands.items():
        for param in command.params:
            if isinstance(param.type, click.Path) and param.type.file_okay:
                assert isinstance(param.type, (InputFile, OutputFile)), f"{' '.join(path)} {param.name}"
    assert len(_missing_file_cases()) >= 8


@pytest.mark.parametrize(
    ("path", "param_name"), _missing_file_cases(), ids=lambda v: "-".join(v) if isinstance(v, tuple) else v
)
def test_every_command_given_a_missing_file_says_so_with_exit_2(
    host: Host, tmp_path: Path, path: tuple[str, ...], param_name: str
) -> None:
    command = dict(_leaf_commands())[path]
    param = next(p for p in command.params if p.name == param_name)
    existing = tmp_path / "exists.bin"
    existing.write_bytes(b"present")
    missing = tmp_path / ("nope-file.npz" if isinstance(param.type, DataSource) else "nope-file.edge")
    argv = [*path, *_argv(command, param, missing, existing)]
    r = host.run(*argv)
    assert r.code == ExitCode.USAGE, (argv, r.code, r.stderr)
    assert "nope-file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    if any(p.name == "json_output" for p in command.params):
        j = host.run(*argv, "--json")
        assert j.code == ExitCode.USAGE and "Traceback" not in j.stderr
        error = j.json()["error"]  # type: ignore[index]
        assert error["exit_code"] == 2 and error["kind"] == "usage" and "nope-file" in error["message"]


def test_deploy_and_profile_of_a_missing_bundle_with_a_live_broker_end_without_traceback(host, mosquitto):
    """The issue's own commands: before, both ended in a traceback (exit 1) once the broker answered."""
    deploy = host.run("deploy", "nope.edge", "--device", "pi-01", "--broker", mosquitto.url)
    profile = host.run("profile", "pi-01", "nope.edge", "--broker", mosquitto.url)
    for r in (deploy, profile):
        assert r.code == 2 and "nope.edge" in r.stderr and "Traceback" not in r.stderr, r.stderr


# --- the table, row by row ----------------------------------------------------------------


def _agent(*args: str, timeout: float = 30.0) -> CliResult:
    proc = subprocess.run([str(BIN / "edge-agent"), *args], capture_output=True, text=True, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr, 0.0)


@pytest.fixture
def homes(tmp_path: Path, tiny_model, host: Host) -> dict[str, object]:
    """Homes (``@keys``, ``@none`` yet, ``@encrypted`` key) and the files the rows name in braces."""
    os.environ["EDGE_EXIT_PASS"] = "correct horse"
    try:
        encrypted = Host(tmp_path / "encrypted")
        assert encrypted.run("keys", "init", "--passphrase-env", "EDGE_EXIT_PASS").code == 0
    finally:
        del os.environ["EDGE_EXIT_PASS"]
    bundle = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "tiny.edge", "tiny", 3)
    cut = tmp_path / "cut.edge"
    cut.write_bytes(bundle.read_bytes()[:-3000])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 not a model")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    return {
        "@keys": host,
        "@none": Host(tmp_path / "no-keys-yet"),
        "@encrypted": encrypted,
        "{model}": str(tiny_model.path),
        "{bundle}": str(bundle),
        "{cut}": str(cut),
        "{garbage}": str(garbage),
        "{missing}": str(tmp_path / "nope-file"),
        "{file}": str(a_file),
        "{root}": str(host.root),
        "{out}": str(tmp_path / "out.edge"),
        "{data}": str(tmp_path / "agent-data"),
    }


_DEV = ("--device", "pi-01", "--broker", UNREACHABLE, "--connect-timeout", "2")
_PACK = ("pack", "{model}", "-o", "{out}", "--name", "t", "--version", "1")

# (row id, program or home, argv, expected code, a fragment of stderr)
EDGECTL_ROWS = [
    ("ok", "@keys", ("keys", "show"), ExitCode.OK, ""),
    ("missing-file-deploy", "@keys", ("deploy", "{missing}", *_DEV), ExitCode.USAGE, "nope-file"),
    (
        "missing-file-pack",
        "@keys",
        ("pack", "{missing}", "-o", "{out}", "--name", "t", "--version", "1"),
        2,
        "nope-file",
    ),
    ("chunk-size-0", "@keys", ("deploy", "{bundle}", *_DEV, "--chunk-size", "0"), ExitCode.USAGE, "chunk-size"),
    (
        "same-device-twice",
        "@keys",
        ("deploy", "{bundle}", *_DEV, *_DEV),
        ExitCode.USAGE,
        "more than once",
    ),
    ("bad-broker-url", "@keys", ("deploy", "{bundle}", "--device", "pi-01", "--broker", "http://x"), 2, "broker URL"),
    ("passphrase-pack", "@encrypted", _PACK, ExitCode.USAGE, "passphrase"),
    ("passphrase-deploy", "@encrypted", ("deploy", "{model}", *_DEV), ExitCode.USAGE, "passphrase"),
    ("passphrase-rollback", "@encrypted", ("rollback", *_DEV, "--name", "t", "--version", "1"), 2, "passphrase"),
    ("passphrase-remove", "@encrypted", ("remove", *_DEV, "--name", "t"), ExitCode.USAGE, "passphrase"),
    ("rollback-refused", "@keys", ("verify", "{bundle}", "--installed-version", "5"), 3, "not newer"),
    ("truncated-bundle", "@keys", ("verify", "{cut}"), ExitCode.UNTRUSTED_INPUT, "truncated"),
    ("broker-unreachable-deploy", "@keys", ("deploy", "{bundle}", *_DEV), ExitCode.TRANSPORT, "cannot reach"),
    ("broker-unreachable-rollback", "@keys", ("rollback", *_DEV, "--name", "t", "--version", "1"), 4, "cannot reach"),
    ("broker-unreachable-devices", "@keys", ("devices", *_DEV[2:]), ExitCode.TRANSPORT, "cannot reach"),
    ("no-keys-pack", "@none", _PACK, ExitCode.LOCAL_STATE, "edgectl keys init"),
    ("no-keys-verify", "@none", ("verify", "{bundle}"), ExitCode.LOCAL_STATE, "edgectl keys init"),
    ("no-keys-show", "@none", ("keys", "show"), ExitCode.LOCAL_STATE, "edgectl keys init"),
    ("no-keys-deploy", "@none", ("deploy", "{bundle}", *_DEV), ExitCode.LOCAL_STATE, "edgectl keys init"),
    ("no-keys-profile", "@none", ("profile", "pi-01", "{bundle}", *_DEV[2:]), 5, "edgectl keys init"),
    ("no-keys-rollback", "@none", ("rollback", *_DEV, "--name", "t", "--version", "1"), 5, "edgectl keys init"),
    ("no-keys-remove", "@none", ("remove", *_DEV, "--name", "t"), ExitCode.LOCAL_STATE, "edgectl keys init"),
    (
        "model-does-not-load",
        "@keys",
        ("pack", "{garbage}", "-o", "{out}", "--name", "g", "--version", "1"),
        6,
        "garbage",
    ),
]

_AS_D1 = ("--device-id", "d1", "--data-dir")
AGENT_ROWS = [
    ("config-missing", ("run", "--config", "{missing}"), ExitCode.USAGE, "nope-file"),
    ("unknown-option", ("run", "--bogus"), ExitCode.USAGE, "--bogus"),
    ("bad-broker-url", ("run", "--broker", "http://x", *_AS_D1, "{data}", "--root", "{root}"), 2, "broker URL"),
    ("data-dir-not-a-dir", ("run", "--broker", UNREACHABLE, *_AS_D1, "{file}", "--root", "{root}"), 5, "a-file"),
    ("root-unreadable", ("run", "--broker", UNREACHABLE, *_AS_D1, "{data}", "--root", "{missing}"), 5, "nope-file"),
]  # fmt: skip


def _fill(args: tuple[str, ...], homes: dict[str, object]) -> list[str]:
    return [str(homes.get(a, a)) for a in args]


@pytest.mark.parametrize(("row", "home", "args", "code", "says"), EDGECTL_ROWS, ids=[r[0] for r in EDGECTL_ROWS])
def test_edgectl_exit_code_table(homes, row: str, home: str, args: tuple[str, ...], code: int, says: str) -> None:
    runner = homes[home]
    assert isinstance(runner, Host)
    argv = _fill(args, homes)
    r = runner.run(*argv, "--json")
    assert r.code == code, (row, r.code, r.stderr)
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr
    if code != ExitCode.OK:
        error = json.loads(r.stdout)["error"]
        assert error["exit_code"] == code and error["kind"] == ExitCode(code).kind, error
        assert says in error["message"]


@pytest.mark.parametrize(("row", "args", "code", "says"), AGENT_ROWS, ids=[r[0] for r in AGENT_ROWS])
def test_edge_agent_uses_the_same_table(homes, row: str, args: tuple[str, ...], code: int, says: str) -> None:
    r = _agent(*_fill(args, homes))
    assert r.code == code, (row, r.code, r.stderr)
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_timeout_prints_a_json_error_too(host: Host, tmp_path: Path, tiny_model, mosquitto) -> None:
    """No agent answers: the device timeout is a transport failure (4), with its JSON object on stdout."""
    bundle = host.pack(tiny_model.path, tiny_model.sample, tmp_path / "t.edge", "t", 1)
    r = host.run(
        "deploy", str(bundle), "--device", "nobody-home", "--broker", mosquitto.url, "--accept-timeout", "1", "--json"
    )
    assert r.code == ExitCode.TRANSPORT, r.stderr
    error = r.json()["error"]  # type: ignore[index]
    assert error["kind"] == "transport" and error["exit_code"] == 4 and "nobody-home" in error["message"]
    # The address used is echoed on stderr, never on the JSON stdout.
    assert f"edgectl: broker {mosquitto.url}" in r.stderr and "edgectl: broker" not in r.stdout


def test_every_broker_help_names_the_default_ports(host: Host) -> None:
    helps = [host.run(*c, "--help").stdout for c in (("deploy",), ("devices",), ("metrics",), ("demo",))]
    assert all("1883" in h and "8883" in h for h in helps)
