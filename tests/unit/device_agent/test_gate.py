"""device_agent.gate: the update gate's file and command, failing closed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from device_agent.gate import UpdateGate


def test_no_gate_is_always_open() -> None:
    gate = UpdateGate()
    assert not gate.configured and gate.check().open


def test_the_file_closes_the_gate_with_its_first_line_as_reason(tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    gate = UpdateGate(file=hold)
    assert gate.check().open
    hold.write_text("\n  in flight  \nsecond line\n")
    decision = gate.check()
    assert not decision.open and decision.reason == "in flight"
    hold.write_text("")
    assert "exists" in gate.check().reason
    hold.unlink()
    assert gate.check().open


def test_a_real_command_decides_by_exit_status(tmp_path: Path) -> None:
    flag = tmp_path / "battery-low"
    script = f"import os, sys\nif os.path.exists({str(flag)!r}):\n    print('battery at 7%')\n    sys.exit(1)\n"
    gate = UpdateGate(command=[sys.executable, "-c", script])
    assert gate.check().open
    flag.write_text("")
    decision = gate.check()
    assert not decision.open and decision.reason == "battery at 7%"


def test_a_command_that_cannot_run_or_hangs_keeps_the_gate_closed() -> None:
    missing = UpdateGate(command=["/nonexistent/may-update"]).check()
    assert not missing.open and "cannot run" in missing.reason

    def hangs(argv: Sequence[str], timeout_s: float) -> tuple[int, str]:
        raise subprocess.TimeoutExpired(list(argv), timeout_s)

    slow = UpdateGate(command=["x"], timeout_s=0.5, runner=hangs).check()
    assert not slow.open and "did not answer" in slow.reason


def test_file_and_command_must_both_say_go(tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    calls: list[tuple[str, ...]] = []

    def runner(argv: Sequence[str], timeout_s: float) -> tuple[int, str]:
        calls.append(tuple(argv))
        return 0, ""

    gate = UpdateGate(file=hold, command=["go?"], runner=runner)
    assert gate.check().open and calls == [("go?",)]
    hold.write_text("parked on a ramp")
    assert gate.check().reason == "parked on a ramp"
