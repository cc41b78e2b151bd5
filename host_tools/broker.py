"""An embedded MQTT broker for a single machine, built on amqtt.

``edgectl broker`` and the demo start one of these when no ``--broker`` is given,
so that a laptop can play host and devices without installing Mosquitto. It is not
meant for a fleet: production uses Mosquitto (see ``deploy/mosquitto/``) or a
clustered broker.

amqtt is asyncio-native; :class:`EmbeddedBroker` gives it its own thread and its
own event loop so that callers can stay synchronous::

    with EmbeddedBroker(port=0) as broker:
        run_demo(broker.url)

The broker is configured in code, never from files: one TCP listener, anonymous
clients allowed, and only the anonymous-auth plugin loaded. In particular the
``$SYS`` plugin (periodic chatter, and a deprecation warning about psutil) and the
packet/event logging plugins are left out, and no persistence plugin is loaded, so
nothing is written to the working directory. amqtt itself puts no limit on message
size, so bundle chunks of 64-256 KB pass unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from edge_sdk.errors import ConfigError, TransportError

__all__ = ["EmbeddedBroker"]

logger = logging.getLogger(__name__)

#: Loggers of amqtt and of the state-machine library it uses; both log every
#: packet and every state change at INFO/DEBUG.
_CHATTY_LOGGERS = ("amqtt", "transitions")

_LISTENER_NAME = "default"


def _broker_config(host: str, port: int) -> dict[str, Any]:
    """Build the amqtt 0.12 broker configuration.

    Args:
        host: address to bind.
        port: port to bind; 0 lets the kernel choose.

    Returns:
        A dictionary accepted by ``amqtt.contexts.BrokerConfig.from_dict``.
    """
    bind_host = f"[{host}]" if ":" in host else host
    return {
        "listeners": {
            _LISTENER_NAME: {
                "type": "tcp",
                "bind": f"{bind_host}:{port}",
                "max_connections": 0,
            },
        },
        # Listing plugins explicitly keeps amqtt from loading its defaults
        # ($SYS topics, packet and event loggers) and from falling back to the
        # deprecated entry-point loading.
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


def _make_amqtt_broker(config: dict[str, Any]) -> Any:
    """Create an amqtt broker on the running loop that always closes its sockets.

    amqtt 0.12 leaves the connection open when a client connects and sends no
    CONNECT packet (a port probe, a health check, a scanner): the socket leaks
    until garbage collection. The subclass closes every accepted connection when
    amqtt is done with it.

    Args:
        config: broker configuration from :func:`_broker_config`.

    Returns:
        An ``amqtt.broker.Broker``, not started.
    """
    # Imported here: amqtt pulls in websockets, transitions and more, which
    # nobody needs unless a broker actually starts.
    from amqtt.broker import Broker

    class _ClosingBroker(Broker):  # type: ignore[misc]
        async def stream_connected(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
        ) -> None:
            # This is the top of a connection's task. At shutdown the task is cancelled;
            # ending it normally instead of re-raising matters on Python 3.11, whose
            # asyncio stream callback calls task.exception() on a cancelled task and logs
            # a CancelledError traceback for every client still connected.
            try:
                await super().stream_connected(reader, writer, listener_name)
            except asyncio.CancelledError:
                pass
            except OSError as exc:
                # amqtt refuses an MQTT 5 CONNECT (clients that try 5 first, then 3.1.1) and then
                # half-closes a socket the client may have closed already; nothing is lost.
                logger.debug("a client connection ended while amqtt closed it: %s", exc)
            finally:
                if not writer.is_closing():
                    writer.close()
                # OSError: the peer is gone; CancelledError: the broker is shutting down.
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()

    return _ClosingBroker(config, loop=asyncio.get_running_loop())


class EmbeddedBroker:
    """An amqtt MQTT broker running in this process on a background thread.

    Supports QoS 0/1/2, retained messages and last-will messages. Anonymous
    clients are allowed; bind it to loopback unless the network is trusted.

    Args:
        host: address to listen on. Defaults to loopback.
        port: TCP port; 0 picks a free port, readable from :attr:`port` after
            :meth:`start`.
        amqtt_log_level: level set on amqtt's own loggers when the broker starts,
            because at INFO they log every connection and state change. ``None``
            leaves them as the application configured them.

    Raises:
        ConfigError: if ``host`` is not an IP address or ``port`` is out of range.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        amqtt_log_level: int | None = logging.WARNING,
    ) -> None:
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            raise ConfigError(f"broker host must be an IP address, got {host!r}", host=host) from exc
        given: object = port  # untyped callers (and tests) may pass anything; refuse it plainly
        if not isinstance(given, int) or isinstance(given, bool) or not 0 <= given <= 65535:
            raise ConfigError(f"broker port must be an integer in 0..65535, got {port!r}", port=repr(port))
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._amqtt_log_level = amqtt_log_level
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    # --- public API -----------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the broker listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The port the broker listens on.

        Raises:
            ConfigError: if the broker was asked for port 0 and has not started yet.
        """
        if self._port is not None:
            return self._port
        if self._requested_port != 0:
            return self._requested_port
        raise ConfigError("the broker's port is chosen when it starts; call start() first")

    @property
    def url(self) -> str:
        """The URL clients connect to, e.g. ``mqtt://127.0.0.1:1883``.

        A wildcard listen address is reported as the loopback address of its family.
        """
        host = self._host
        if host == "0.0.0.0":
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"mqtt://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the broker thread is up and serving."""
        return self._thread is not None and self._thread.is_alive() and self._started.is_set()

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and block until it accepts TCP connections.

        Args:
            timeout: seconds to wait for the listener to come up.

        Raises:
            ConfigError: if the broker is already running.
            TransportError: if the address cannot be bound (port in use,
                address not available) or the broker does not come up in time.
        """
        if self._thread is not None:
            raise ConfigError(f"broker on {self._address()} is already started")
        if self._amqtt_log_level is not None:
            for name in _CHATTY_LOGGERS:
                logging.getLogger(name).setLevel(self._amqtt_log_level)
        if self._requested_port != 0:
            # amqtt logs a full traceback at ERROR before it gives up on a busy
            # port; checking first gives the operator one clear message instead.
            self._check_bindable()

        self._started.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._run, name=f"edge-sdk-broker-{self._address()}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            self.stop(timeout=timeout)
            raise TransportError(
                f"embedded MQTT broker on {self._address()} did not start within {timeout:g} s",
                address=self._address(),
            )
        if self._start_error is not None:
            error = self._start_error
            self._thread.join(timeout)
            self._thread = None
            raise self._as_transport_error(error) from error
        logger.info("embedded MQTT broker listening on %s", self.url)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down, closing client connections, and join its thread.

        Safe to call more than once and on a broker that never started.

        Args:
            timeout: seconds to wait for the thread to finish.

        Raises:
            TransportError: if the broker thread does not finish in time.
        """
        thread = self._thread
        if thread is None:
            return
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None and not loop.is_closed():
            # RuntimeError: the loop closed between the check and the call.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout)
        if thread.is_alive():
            raise TransportError(
                f"embedded MQTT broker on {self._address()} did not stop within {timeout:g} s",
                address=self._address(),
            )
        self._thread = None
        self._loop = None
        self._stop_event = None
        logger.info("embedded MQTT broker on %s stopped", self._address())

    def serve(self, stop: threading.Event, on_ready: Callable[[str], None]) -> None:
        """Start, serve until ``stop`` is set or Ctrl-C, then stop: ``edgectl broker``.

        Args:
            stop: set it (from a signal handler, say) to shut the broker down.
            on_ready: called with the broker's URL once it accepts connections.

        Raises:
            TransportError: the address cannot be bound, or the broker does not start or stop in time.
        """
        with self:
            on_ready(self.url)
            # KeyboardInterrupt (Ctrl-C) is the ordinary way to stop; the broker shuts down cleanly.
            with contextlib.suppress(KeyboardInterrupt):
                while not stop.wait(0.5):
                    pass

    def __enter__(self) -> EmbeddedBroker:
        """Start the broker (see :meth:`start`) and return it."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the broker (see :meth:`stop`)."""
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedBroker({self._address()}, {state})"

    # --- internals ------------------------------------------------------------------

    def _address(self) -> str:
        port = self._port if self._port is not None else self._requested_port
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{port}"

    def _check_bindable(self) -> None:
        """Fail early, with a plain message, when the address cannot be bound."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # Same option asyncio sets for the real listener, so that sockets in
            # TIME_WAIT from a previous run do not count as "in use".
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self._host, self._requested_port))
            except OSError as exc:
                raise self._as_transport_error(exc) from exc

    def _as_transport_error(self, error: BaseException) -> TransportError:
        """Turn a start-up failure into a TransportError naming the address."""
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        address = self._address()
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            return TransportError(
                f"cannot start the embedded MQTT broker: {address} is already in use "
                "(another broker running? pick another port or pass --broker)",
                address=address,
            )
        reason = cause if cause is not None else error
        return TransportError(
            f"cannot start the embedded MQTT broker on {address}: {reason}",
            address=address,
        )

    def _run(self) -> None:
        """Thread body: own event loop, serve until stop() is called."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                logger.exception("embedded MQTT broker on %s failed", self._address())
        finally:
            try:
                self._cancel_leftover_tasks(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    @staticmethod
    def _cancel_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
        """Cancel and await tasks amqtt left behind, so none is destroyed pending."""
        leftover = [task for task in asyncio.all_tasks(loop) if not task.done()]
        if not leftover:
            return
        logger.debug("cancelling %d leftover broker task(s)", len(leftover))
        for task in leftover:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))

    async def _serve(self) -> None:
        """Start amqtt, publish the bound port, wait for stop, shut down."""
        self._stop_event = asyncio.Event()
        broker = _make_amqtt_broker(_broker_config(self._host, self._requested_port))
        await broker.start()
        try:
            self._port = self._bound_port(broker)
            self._started.set()
            await self._stop_event.wait()
        finally:
            await broker.shutdown()

    def _bound_port(self, broker: Any) -> int:
        """Read the port the listener really bound (differs from 0 when 0 was asked)."""
        if self._requested_port != 0:
            return self._requested_port
        # amqtt keeps its listening servers in a private mapping; there is no
        # public accessor in 0.11/0.12.
        server = broker._servers[_LISTENER_NAME].instance
        return int(server.sockets[0].getsockname()[1])
