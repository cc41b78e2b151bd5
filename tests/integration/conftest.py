"""Fixtures for the end-to-end tests: real `edgectl` and `edge-agent` processes, real broker.

- ``host``: an operator's home (keys created with `edgectl keys init`) and a runner for
  `edgectl` commands in a subprocess.
- ``tiny_model``: a small ONNX model built with onnx.helper, and a sample input.
- ``start_agent``: starts `edge-agent run --root ROOT` as its own process and stops it afterwards.
  The key the agent makes at first start is enrolled in the ``host``'s registry (as
  `edgectl devices enroll ID --key device.pub` does), unless ``enroll_key=False``; a test
  with its own operator home passes it as ``enroll_home``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import BIN, AgentProcess, Host, TinyModel, build_tiny_model, enroll, wait_online


@pytest.fixture
def host(tmp_path: Path) -> Host:
    h = Host(tmp_path / "home")
    result = h.run("keys", "init")
    assert result.code == 0, result.stderr
    return h


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def start_agent(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., AgentProcess]]:
    agents: list[AgentProcess] = []

    def start(
        broker_url: str,
        device_id: str,
        root: Path,
        *extra: str,
        wait: bool = True,
        enroll_key: bool = True,
        enroll_home: Path | None = None,
    ) -> AgentProcess:
        data_dir = tmp_path / f"agent-{device_id}"
        if "--data-dir" in extra:  # the test's own data directory wins (argparse takes the last)
            data_dir = Path(extra[len(extra) - 1 - extra[::-1].index("--data-dir") + 1])
        log_path = tmp_path / f"agent-{device_id}.log"
        log_file = open(log_path, "w")  # noqa: SIM115 - closed with the process below
        proc = subprocess.Popen(
            [
                str(BIN / "edge-agent"),
                "run",
                "--broker",
                broker_url,
                "--device-id",
                device_id,
                "--data-dir",
                str(data_dir),
                "--root",
                str(root),
                "--log-level",
                "DEBUG",
                *extra,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log_file.close()
        agent = AgentProcess(proc, device_id, data_dir, log_path)
        agents.append(agent)
        if enroll_key:
            home = enroll_home or request.getfixturevalue("host").home
            enroll(home, device_id, agent.wait_for_key())
        if wait:
            wait_online(broker_url, device_id)
        return agent

    yield start
    for agent in agents:
        agent.stop()
