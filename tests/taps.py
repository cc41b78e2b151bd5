"""A client on the broker that watches what others publish, for tests and benchmarks.

:class:`BrokerTap` subscribes to topic filters and hands every message to a handler on its
own thread; the integration tests and ``benchmarks/fleet.py`` count chunk frames, bytes and
device events with it.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable

from edge_sdk.mqtt import Incoming, MqttClient, MqttOptions

__all__ = ["BrokerTap"]


class BrokerTap:
    """Subscribes to ``filters`` on ``url`` and calls ``handle(topic, payload)`` for each message, in order.

    The client reconnects (and subscribes again) by itself if the broker restarts.
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, url: str, filters: Iterable[str], handle: Callable[[str, bytes], None]) -> None:
        self.client = MqttClient(url, MqttOptions(client_id=f"tap-{os.getpid()}-{time.monotonic_ns()}"))
        self.client.connect()
        for topic_filter in filters:
            self.client.subscribe(topic_filter, qos=1)
        self._handle = handle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self.client.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(item, Incoming):
                self._handle(item.topic, item.payload)

    def close(self) -> None:
        """Stop watching and disconnect. Idempotent."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.close()

    def __enter__(self) -> BrokerTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
