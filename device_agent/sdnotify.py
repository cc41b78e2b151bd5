"""systemd's notify protocol, without a dependency: one unix datagram per state change.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) and,
with ``WatchdogSec=``, ``WATCHDOG_USEC``. The entry point reads both (library code reads
no environment) and builds a :class:`Notifier`; the agent sends ``READY=1`` once it
runs, ``WATCHDOG=1`` from its worker loop at half the watchdog period, a ``STATUS=`` line,
and ``STOPPING=1`` on the way out. Without ``NOTIFY_SOCKET`` every call does nothing.

The worker vouches only for an agent that can hear: :func:`should_feed` (pure) says
whether to ping, from the liveness of the threads that bring messages in. A wedged worker
sends nothing (it is the one that pings); a dead network thread makes it stop
pinging. Either way systemd's watchdog fires and restarts the agent.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Liveness", "Notifier", "should_feed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Liveness:
    """What the worker knows about the threads it depends on, at one moment.

    Attributes:
        network_alive: the transport's network thread runs (it receives and keeps the connection).
    """

    network_alive: bool


def should_feed(liveness: Liveness) -> bool:
    """Whether the worker may tell systemd the agent is well (pure).

    The worker calls this itself, so its own liveness is implied: a stuck worker calls
    nothing. An agent that cannot receive is not well, however busy its worker looks.

    Args:
        liveness: the state of the receiving threads.

    Returns:
        True only if every thread on the way from the network to the worker is alive.
    """
    return liveness.network_alive


class Notifier:
    """Sends sd_notify messages to one socket.

    Args:
        address: the ``NOTIFY_SOCKET`` value, or None to do nothing.
        watchdog_usec: the ``WATCHDOG_USEC`` value, or None when no watchdog is set.
        clock: monotonic seconds (injectable).
    """

    def __init__(
        self,
        address: str | None = None,
        watchdog_usec: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address or None
        self.watchdog_interval_s = watchdog_usec / 2e6 if watchdog_usec and watchdog_usec > 0 else None
        self._clock = clock
        self._last_ping = float("-inf")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """Build from ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` (call at the entry point)."""
        usec = environ.get("WATCHDOG_USEC", "")
        return cls(environ.get("NOTIFY_SOCKET"), int(usec) if usec.isdigit() else None)

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines; returns False (and logs) when the send failed."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), target)
        except OSError as exc:
            log.debug("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> None:
        """Tell systemd start-up is done (``READY=1``), with an optional status line."""
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> None:
        """Set the status line ``systemctl status`` shows."""
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        """Tell systemd the agent is stopping."""
        self.notify("STOPPING=1")

    def watchdog(self) -> None:
        """Ping the watchdog if it is due (call often; it rate-limits itself)."""
        if self.watchdog_interval_s is None:
            return
        now = self._clock()
        if now - self._last_ping >= self.watchdog_interval_s:
            self._last_ping = now
            self.notify("WATCHDOG=1")
