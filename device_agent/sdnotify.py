"""systemd's notify protocol, without a dependency: one unix datagram per state change.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) and,
with ``WatchdogSec=``, ``WATCHDOG_USEC``. The entry point reads both (library code reads
no environment) and builds a :class:`Notifier`; the agent sends ``READY=1`` once it
runs, ``WATCHDOG=1`` from its worker loop at half the watchdog period (so a wedged
worker gets the agent restarted), a ``STATUS=`` line, and ``STOPPING=1`` on the way out.
Without ``NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


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
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def watchdog(self) -> None:
        """Ping the watchdog if it is due (call often; it rate-limits itself)."""
        if self.watchdog_interval_s is None:
            return
        now = self._clock()
        if now - self._last_ping >= self.watchdog_interval_s:
            self._last_ping = now
            self.notify("WATCHDOG=1")
