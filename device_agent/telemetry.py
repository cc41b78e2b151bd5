"""Periodic metrics reports: each active bundle measured again every ``metrics_every_s``.

The report after an install says how a bundle ran once, when it arrived. A fleet operator
also wants to see how it runs later (a device warms up, throttles, fills its memory). With
``metrics_every_s`` set (:class:`~device_agent.config.AgentConfig`; off by default), the
agent's worker measures each active bundle again, as its health check and a short
benchmark (one warm-up run, then ``metrics_runs`` timed runs; one thread), and publishes a
signed :class:`~edge_sdk.protocol.MetricsReport` for it, not retained, marked
``extra: {"mode": "periodic", "every_s": S}`` (the report after an install has no ``mode``;
a profile-only run says ``profile``). Readers that do not know the mark read it as any
report. Each report has its own time (:meth:`Reporter.metrics_time
<device_agent.reporter.Reporter.metrics_time>`), which keys it in the host's registry: a
periodic report is a row of its own, and one the broker delivers twice is stored once.

It runs in the agent's periodic work, as heartbeats do, and stays out of the way of installs:

- one bundle per step of the worker: between two measurements, what arrived is handled;
- a round waits while the inbound queue holds anything or a transfer had a chunk within
  :data:`RECEIVING_S` (``busy``): an install is never delayed by a measurement starting;
- only while connected: a report is not measured to wait in the offline outbox, which is
  kept for events and install reports;
- rounds keep their phase (every ``every_s`` from the first), and a round that could not
  run in its period is skipped, not made up for.

A measurement that fails (the model no longer loads or fails its health check) is logged and
counted (:attr:`Telemetry.failures`); the next round tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from device_agent.install import InstallSequence
from device_agent.installer import Installer
from device_agent.reporter import Reporter
from edge_sdk.errors import EdgeError
from edge_sdk.protocol import PERIODIC_MODE, BenchmarkSpec

__all__ = ["RECEIVING_S", "Telemetry"]

log = logging.getLogger(__name__)

#: A transfer that had a chunk within this many seconds holds periodic measurements back.
RECEIVING_S = 5.0


class Telemetry:
    """When to measure which active bundle, and the reports that come of it.

    Args:
        every_s: seconds between rounds.
        runs: timed runs of each measurement.
        installer: what is active now (read at each measurement).
        installs: measures a bundle and builds its report.
        reporter: publishes the reports.
    """

    def __init__(
        self, every_s: float, runs: int, installer: Installer, installs: InstallSequence, reporter: Reporter
    ) -> None:
        self.every_s = every_s
        self.spec = BenchmarkSpec(runs=runs, warmup=1, threads=1)
        self.installer = installer
        self.installs = installs
        self.reporter = reporter
        self.next_round = float("inf")  # set by start()
        self._waiting: list[str] = []  # bundle names of the round under way
        self.reports = 0
        self.failures = 0
        self.rounds_skipped = 0

    def start(self, now: float) -> None:
        """Schedule the first round ``every_s`` after ``now`` (once; later calls keep the phase)."""
        if self.next_round == float("inf"):
            self.next_round = now + self.every_s

    def step(self, now: float, connected: bool, busy: Callable[[], bool]) -> bool:
        """Measure and report at most one active bundle, if a round is due and the agent is free.

        Args:
            now: monotonic seconds.
            connected: whether the agent is connected now.
            busy: whether inbound work waits (asked only when a measurement is due).

        Returns:
            Whether a report was published.
        """
        if now >= self.next_round:
            if self._waiting:  # the last round did not finish within its period: drop its rest
                self.rounds_skipped += 1
            self._waiting = sorted(a.name for a in self.installer.all_active())
            self.next_round += self.every_s
            if self.next_round <= now:  # asleep or offline for longer than a period: keep the phase
                missed = int((now - self.next_round) // self.every_s) + 1
                self.next_round += missed * self.every_s
        if not self._waiting or not connected or busy():
            return False
        name = self._waiting.pop(0)
        active = self.installer.active(name)
        if active is None:  # removed since the round began
            return False
        try:
            profile, choice = self.installs.measure(active, self.spec)
        except EdgeError as exc:
            self.failures += 1
            log.warning("periodic measurement of %s v%s failed: %s: %s", name, active.version, exc.code, exc.message)
            return False
        report = self.installs.metrics_report(
            "", active.name, active.version, profile, choice, mode=PERIODIC_MODE, every_s=self.every_s
        )
        self.reporter.metrics(report)
        self.reports += 1
        log.debug("periodic report of %s v%s: p50 %.3f ms", name, active.version, profile.latency.p50_ms)
        return True
