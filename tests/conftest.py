"""Fixtures shared by the whole test suite.

Real brokers for the integration tests:

- ``mosquitto`` (session): one Mosquitto for the whole run, on a free loopback port.
  It has ``host``, ``port``, ``url`` (``mqtt://127.0.0.1:PORT``) and ``log_path``.
  Tests share it, so they must use topics of their own (e.g. include the test name).
- ``start_mosquitto`` (function): a factory for brokers of the test's own, for tests
  that kill or restart the broker: ``broker = start_mosquitto()`` returns a running
  :class:`mosquitto.MosquittoProcess` with ``stop()``, ``kill()`` and ``restart()``
  (same port). Every broker it started is stopped when the test ends.

A missing mosquitto binary fails the run (never skips it): ``make test`` installs it.

For `edgectl` run in-process: ``edgectl_env`` (function) removes every ``EDGE_SDK_``
variable the run inherited and puts HOME and the working directory in ``tmp_path``
(returned), so no setting comes from the machine's environment or config file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import mosquitto as mosquitto_helpers
import pytest
from mosquitto import MosquittoNotFoundError, MosquittoProcess


def _require_mosquitto() -> str:
    try:
        return mosquitto_helpers.find_mosquitto()
    except MosquittoNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """One real Mosquitto broker on a free loopback port for the whole session."""
    binary = _require_mosquitto()
    broker = MosquittoProcess(tmp_path_factory.mktemp("mosquitto"), binary=binary)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def start_mosquitto(tmp_path: Path) -> Iterator[Callable[..., MosquittoProcess]]:
    """Factory for Mosquitto brokers owned by one test; stopped when it ends.

    Call it with keyword arguments of :class:`mosquitto.MosquittoProcess`
    (``port``, ``max_packet_size``, ``extra_config``); each broker gets its own
    directory under ``tmp_path``.
    """
    binary = _require_mosquitto()
    started: list[MosquittoProcess] = []

    def start(**options: object) -> MosquittoProcess:
        workdir = tmp_path / f"mosquitto-{len(started)}"
        options.setdefault("binary", binary)
        broker = MosquittoProcess(workdir, **options)  # type: ignore[arg-type]
        started.append(broker)
        return broker.start()

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def edgectl_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No EDGE_SDK_ variable from outside; HOME and the working directory in ``tmp_path``."""
    for name in list(os.environ):
        if name.startswith("EDGE_SDK_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path
