"""Fixtures for the end-to-end tests: real `edgectl` and `edge-agent` processes, real broker.

- ``host``: an operator's home (keys created with `edgectl keys init`) and a runner for
  `edgectl` commands in a subprocess.
- ``tiny_model``: a small ONNX model built with onnx.helper, and a sample input.
- ``start_agent``: starts `edge-agent run --root ROOT` as its own process and stops it afterwards.
  The key the agent makes at first start is enrolled in the ``host``'s registry (as
  `edgectl devices enroll ID --key device.pub` does), unless ``enroll_key=False``; a test
  with its own operator home passes it as ``enroll_home``. ``launcher`` rewrites the command
  line (the ARM userland tests run it in a chroot under qemu: tests/userland.py), and
  ``timeout`` bounds the waits for its key and its birth message.

Broker topologies (helpers in ``tests/topologies.py``):

- ``topology``: runs a test once per topology (Mosquitto with MQTT 5 clients, Mosquitto
  with 3.1.1 clients, embedded amqtt, two bridged Mosquittos); ``topology.connect("host",
  name)`` and ``topology.connect("device", name)`` give connected ``MqttClient``s on the
  right broker with the right protocol, closed afterwards.
- ``embedded_broker``: an amqtt :class:`host_tools.broker.EmbeddedBroker` on a free port.
- ``bridged_mosquittos``: ``.gateway`` and ``.fleet`` Mosquittos, the bridge already
  forwarding ``edge/v1/devices/#`` both ways and ``edge/v1/transfers/#`` fleet -> gateway.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import BIN, AgentProcess, ChunkSpy, Host, TinyModel, build_tiny_model, enroll, wait_online
from mosquitto import MosquittoProcess
from topologies import TOPOLOGIES, Topology, bridge_config, wait_bridged

from host_tools.broker import EmbeddedBroker


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
        launcher: Callable[[list[str]], list[str]] | None = None,
        timeout: float = 20.0,
    ) -> AgentProcess:
        data_dir = tmp_path / f"agent-{device_id}"
        if "--data-dir" in extra:  # the test's own data directory wins (argparse takes the last)
            data_dir = Path(extra[len(extra) - 1 - extra[::-1].index("--data-dir") + 1])
        log_path = tmp_path / f"agent-{device_id}.log"
        log_file = open(log_path, "w")  # noqa: SIM115 - closed with the process below
        argv = [
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
        ]
        proc = subprocess.Popen(
            launcher(argv) if launcher else argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log_file.close()
        agent = AgentProcess(proc, device_id, data_dir, log_path)
        agents.append(agent)
        if enroll_key:
            home = enroll_home or request.getfixturevalue("host").home
            enroll(home, device_id, agent.wait_for_key(timeout))
        if wait:
            wait_online(broker_url, device_id, timeout)
        return agent

    yield start
    for agent in agents:
        agent.stop()


@pytest.fixture
def spy(mosquitto) -> Iterator[Callable[[str], ChunkSpy]]:
    """``spy(device_id)`` counts the chunks the broker delivers on that device's data topic."""
    made: list[ChunkSpy] = []

    def make(device_id: str) -> ChunkSpy:
        made.append(ChunkSpy(mosquitto.url, device_id))
        return made[-1]

    yield make
    for s in made:
        s.close()


# --- broker topologies (tests/topologies.py) ----------------------------------------------------


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """The embedded amqtt broker (MQTT 3.1.1 only), in this process on a free loopback port."""
    with EmbeddedBroker(port=0) as broker:
        yield broker


@dataclass(frozen=True)
class Bridged:
    """Two Mosquittos: devices on ``gateway``, the host on ``fleet``; the gateway bridges to the fleet."""

    gateway: MosquittoProcess
    fleet: MosquittoProcess


@pytest.fixture
def bridged_mosquittos(start_mosquitto: Callable[..., MosquittoProcess]) -> Bridged:
    """A gateway Mosquitto bridged to a fleet Mosquitto, forwarding both ways already (see tests/topologies.py).

    ``bridged_mosquittos.fleet`` and ``.gateway`` are :class:`mosquitto.MosquittoProcess`
    (``url``, ``stop()``, ``restart()``...). Both stop when the test ends.
    """
    fleet = start_mosquitto()
    gateway = start_mosquitto(extra_config=bridge_config(fleet.port))
    wait_bridged(gateway.url, fleet.url)
    return Bridged(gateway, fleet)


@pytest.fixture(params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """Runs the test once per broker topology: Mosquitto with MQTT 5 clients, with 3.1.1 clients,
    the embedded amqtt broker, and two bridged Mosquittos (host on the fleet broker, devices on
    the gateway). ``topology.connect("host" | "device", name, **options)`` gives connected clients.
    """
    name = request.param
    if name == "amqtt":
        broker = request.getfixturevalue("embedded_broker")
        chosen = Topology(name, broker.url, broker.url, "auto", "3.1.1")
    elif name == "bridged":
        pair = request.getfixturevalue("bridged_mosquittos")
        chosen = Topology(name, pair.fleet.url, pair.gateway.url, "auto", "5")
    else:
        shared = request.getfixturevalue("mosquitto")
        mqtt5 = name == "mosquitto-mqtt5"
        chosen = Topology(name, shared.url, shared.url, "auto" if mqtt5 else "3.1.1", "5" if mqtt5 else "3.1.1")
    try:
        yield chosen
    finally:
        chosen.close()
