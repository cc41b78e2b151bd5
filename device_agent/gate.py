"""The update gate: may this device install a new model now?

A drone in the air, a vehicle in motion or a phone on its last few percent of battery
must not swap models. The integrator says "not now" in one of two ways, both set in
the agent's config:

- a **file** (``update_gate_file``): while it exists, installs wait. Its first line, if
  any, is the reason reported to the host (``in flight``).
- a **command** (``update_gate_command``): run before each install; exit status 0 means
  "go", anything else "not now", with the first line of its output as the reason.
  A command that cannot be started, or does not answer within its timeout, also means
  "not now": when in doubt, a field device keeps the model it has.

The agent asks the gate after a bundle has been received; while it stays closed the
bundle waits under ``deferred/`` (across restarts too) and the gate is asked again
every ``update_gate_retry_s``.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GateDecision", "UpdateGate", "run_gate_command"]

log = logging.getLogger(__name__)
_MAX_REASON = 200


@dataclass(frozen=True)
class GateDecision:
    """The gate's answer.

    Attributes:
        open: True when an install may go ahead now.
        reason: why not (empty when open).
    """

    open: bool
    reason: str = ""


def run_gate_command(argv: Sequence[str], timeout_s: float) -> tuple[int, str]:
    """Run the gate command; returns (exit status, combined output).

    Raises:
        OSError: it cannot be started.
        subprocess.TimeoutExpired: it did not finish in time.
    """
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, check=False
    )
    return proc.returncode, (proc.stdout or proc.stderr or "")


def _first_line(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line[:_MAX_REASON]


class UpdateGate:
    """Answers "may I install now?" from a file, a command, or both (both must say go).

    Args:
        file: path whose existence closes the gate, or None.
        command: argv of the gate command, or None.
        timeout_s: how long the command may take.
        runner: runs the command (injectable for tests); see :func:`run_gate_command`.
    """

    def __init__(
        self,
        file: Path | None = None,
        command: Sequence[str] | None = None,
        timeout_s: float = 10.0,
        runner: Callable[[Sequence[str], float], tuple[int, str]] = run_gate_command,
    ) -> None:
        self.file = file
        self.command = tuple(command) if command else None
        self.timeout_s = timeout_s
        self._runner = runner

    @property
    def configured(self) -> bool:
        return self.file is not None or self.command is not None

    def check(self) -> GateDecision:
        """Ask the gate now."""
        if self.file is not None:
            try:
                text = self.file.read_text(errors="replace")
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                return GateDecision(False, f"update gate {self.file} exists")
            except OSError as exc:
                # Exists but unreadable: still "not now", and say why.
                return GateDecision(False, f"update gate {self.file} exists ({exc.strerror})")
            else:
                return GateDecision(False, _first_line(text) or f"update gate {self.file} exists")
        if self.command is not None:
            try:
                status, output = self._runner(self.command, self.timeout_s)
            except subprocess.TimeoutExpired:
                return GateDecision(False, f"update gate command did not answer within {self.timeout_s:g} s")
            except OSError as exc:
                log.warning("update gate command %s cannot run: %s", self.command[0], exc)
                return GateDecision(False, f"update gate command cannot run: {exc.strerror or exc}")
            if status != 0:
                return GateDecision(False, _first_line(output) or f"update gate command said no (exit {status})")
        return GateDecision(True)
