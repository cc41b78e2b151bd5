"""Text safe to print (host_tools.report.safe_text) and the CLI's one output path for people.

The attacks: a device or a bundle puts terminal escape sequences (clear screen, OSC 52
clipboard write, the one-byte CSI 0x9b, BEL, backspace, carriage return) or a bidi
override into a string ``edgectl`` prints. Each must show as a visible escape.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edge_sdk.errors import EdgeError, TargetMismatchError
from host_tools.cli import HostConfig, _echo_for_terminal, _EdgeGroup, _emit, _log_handler, _say
from host_tools.report.safe_text import TerminalSafeFormatter, escape_for_terminal
from host_tools.report.table import Column, render_table

CLEAR_SCREEN = "\x1b[2J\x1b[H"
OSC52_CLIPBOARD = "\x1b]52;c;cm0gLXJmIH4=\x07"
CSI_8BIT = "\x9b31m"
BIDI = "\u202eevil\u202c \u2066x\u2069"
HOSTILE = f"a{CLEAR_SCREEN}b{OSC52_CLIPBOARD}c{CSI_8BIT}d\x07e\x08f\rg\th{BIDI}\ud800"

HOME = Path("/nonexistent-home")

#: What must never reach a terminal raw (the test's own list, independent of the module's).
UNSAFE = {chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0))} - {"\n"}
UNSAFE |= {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}
UNSAFE |= {"\u2028", "\u2029"}  # and lone surrogates, checked by range below


def raw_unsafe(text: str) -> list[str]:
    """The characters of ``text`` a terminal would interpret (newlines excepted)."""
    return sorted({ch for ch in text if ch in UNSAFE or 0xD800 <= ord(ch) <= 0xDFFF})


def test_every_unsafe_character_becomes_a_visible_escape() -> None:
    out = escape_for_terminal(HOSTILE)
    assert raw_unsafe(out) == [] and "\n" not in out
    assert out == (
        "a\\x1b[2J\\x1b[Hb\\x1b]52;c;cm0gLXJmIH4=\\x07c\\x9b31md\\x07e\\x08f\\x0dg\\x09h"
        "\\u202eevil\\u202c \\u2066x\\u2069\\ud800"
    )
    for code in (*range(0x00, 0x20), *range(0x7F, 0xA0), 0x202A, 0x202E, 0x2066, 0x2069, 0x200F, 0x2028):
        assert raw_unsafe(escape_for_terminal(f"x{chr(code)}y")) == [], hex(code)
    assert escape_for_terminal("x\u202ey") == "x\\u202ey" and escape_for_terminal("\x9b") == "\\x9b"


def test_newlines_stay_only_in_multiline_text_and_ordinary_text_is_unchanged() -> None:
    assert escape_for_terminal("one\ntwo") == "one\\x0atwo"
    assert escape_for_terminal("one\ntwo\x1b[31m", multiline=True) == "one\ntwo\\x1b[31m"
    plain = "dev-1: installed digits v2 in 2.2 s — 1.5 KiB, Jetson Orin Nano, 東京, C:\\models"
    assert escape_for_terminal(plain) == plain
    assert escape_for_terminal(escape_for_terminal(HOSTILE)) == escape_for_terminal(HOSTILE)  # idempotent


def test_table_escapes_each_cell_and_measures_widths_on_what_is_shown() -> None:
    rows = [("dev-1", "ok"), (f"x{CLEAR_SCREEN}", "line\nbreak"), ("plain", None)]
    table = render_table([Column("device", lambda r: r[0]), Column("note", lambda r: r[1])], rows)
    assert raw_unsafe(table) == []
    lines = table.splitlines()
    assert len(lines) == 5  # a newline in a cell does not add a line
    shown = "x\\x1b[2J\\x1b[H"
    assert lines[3] == f"{shown}  line\\x0abreak"
    assert lines[2] == "dev-1" + " " * (len(shown) - len("dev-1")) + "  ok"  # aligned on the escaped width
    assert lines[1] == "-" * len(shown) + "  " + "-" * len("line\\x0abreak")


def test_text_output_escapes_and_json_output_stays_exact(capsys: pytest.CaptureFixture[str]) -> None:
    data = {"platform": {"kind": HOSTILE}}
    _emit(HostConfig(HOME, "r", json_output=False), data, f"kind: {HOSTILE}\nnext line")
    out = capsys.readouterr().out
    assert raw_unsafe(out) == [] and out == "kind: " + escape_for_terminal(HOSTILE) + "\nnext line\n"

    _emit(HostConfig(HOME, "r", json_output=True), data, lambda: pytest.fail("text rendered for --json"))
    out = capsys.readouterr().out
    assert raw_unsafe(out) == [] and out.isascii()
    assert "\\u001b[2J" in out and "\\u202e" in out and "\\u009b" in out
    assert json.loads(out) == data  # exact: every character comes back


def test_progress_warning_and_log_lines_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    _say(HostConfig(HOME, "r"))(f"agent says {CLEAR_SCREEN}")
    _echo_for_terminal(f"edgectl: warning: {BIDI}", err=True)
    err = capsys.readouterr().err
    assert raw_unsafe(err) == [] and "agent says \\x1b[2J\\x1b[H" in err and "\\u202eevil" in err

    record = logging.LogRecord("edgectl", logging.WARNING, __file__, 1, "dropped %s", (HOSTILE,), None)
    line = TerminalSafeFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert line == "WARNING edgectl: dropped " + escape_for_terminal(HOSTILE)
    assert isinstance(_log_handler().formatter, TerminalSafeFormatter)


def test_error_line_escapes_the_devices_code_and_message() -> None:
    @click.group(cls=_EdgeGroup)
    def group() -> None:
        pass

    @group.command()
    def fail() -> None:
        err = EdgeError(f"device says {CLEAR_SCREEN}{OSC52_CLIPBOARD}")
        err.code = f"odd{CSI_8BIT}"  # an unknown code from a newer (or hostile) peer is kept as sent
        raise err

    @group.command()
    def refuse() -> None:
        raise TargetMismatchError(f"it has {BIDI}, none runs onnxruntime")

    result = CliRunner().invoke(group, ["fail"], color=True)  # color: click strips nothing
    assert result.exit_code == 1 and raw_unsafe(result.stderr) == []
    assert result.stderr == "edgectl: error [odd\\x9b31m]: device says \\x1b[2J\\x1b[H\\x1b]52;c;cm0gLXJmIH4=\\x07\n"
    result = CliRunner().invoke(group, ["refuse"], color=True)
    assert raw_unsafe(result.stderr) == [] and "it has \\u202eevil\\u202c" in result.stderr
