"""`edge-agent`'s command line: what --help shows, and what it accepts without showing."""

from __future__ import annotations

import pytest

from device_agent.cli import _parser


def _help(*args: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args([*args, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_the_crash_test_hook_is_not_in_help_but_still_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    shown = _help("run", capsys=capsys)
    assert "--reconnect-max" in shown  # the real options are there
    assert "crash" not in shown.lower()
    assert "crash" not in _help(capsys=capsys).lower()
    args = _parser().parse_args(["run", "--debug-crash-at", "staged"])
    assert args.debug_crash_at == "staged"
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--debug-crash-at", "nowhere"])  # still checked against the crash points
