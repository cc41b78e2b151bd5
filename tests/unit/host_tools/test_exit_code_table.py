"""The exit-code table is printed where users look: README and `edgectl --help`, both made from ExitCode."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from edge_sdk.errors import EXIT_CODES
from host_tools.cli import cli

README = Path(__file__).resolve().parents[3] / "README.md"


def test_the_readme_prints_every_row_of_the_table() -> None:
    text = README.read_text()
    for code, meaning in EXIT_CODES.items():
        assert f"| {int(code)} | {meaning} |" in text, (code, meaning)


def test_edgectl_help_prints_every_row_of_the_table() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    flat = " ".join(result.output.split())
    for code, meaning in EXIT_CODES.items():
        assert f"{int(code)} {meaning}" in flat, (code, meaning)
