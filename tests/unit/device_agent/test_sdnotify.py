"""device_agent.sdnotify against a real unix datagram socket, as systemd listens."""

from __future__ import annotations

import socket
from pathlib import Path

from device_agent.sdnotify import Notifier


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    return sock


def test_messages_reach_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with _listen(path) as sock:
        n = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
        n.ready("online")
        assert sock.recv(4096) == b"READY=1\nSTATUS=online"
        n.stopping()
        assert sock.recv(4096) == b"STOPPING=1"


def test_watchdog_pings_at_half_the_period() -> None:
    now = [0.0]
    sent: list[tuple[str, ...]] = []

    class Recording(Notifier):
        def notify(self, *fields: str) -> bool:
            sent.append(fields)
            return True

    n = Recording("/unused", watchdog_usec=10_000_000, clock=lambda: now[0])
    for t in (0.0, 1.0, 4.9, 5.0, 6.0, 10.0):
        now[0] = t
        n.watchdog()
    assert sent == [("WATCHDOG=1",)] * 3  # at 0, 5 and 10 s


def test_abstract_socket_names_are_supported() -> None:
    name = f"edge-sdk-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert Notifier("@" + name).notify("READY=1")
        assert sock.recv(100) == b"READY=1"


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier.from_environ({})
    assert n.notify("READY=1") is False
    n.watchdog()  # no watchdog configured: a no-op
    assert Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "junk"}).watchdog_interval_s is None
