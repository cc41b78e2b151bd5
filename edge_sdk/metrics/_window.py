"""What the measuring context managers share: the window's life cycle and its sampling thread.

A :class:`MeasurementWindow` opens when its ``with`` body starts and closes when it
ends; its ``result`` exists only once it has closed. A :class:`SamplingThread` reads a
sensor at a fixed period on a daemon thread while a window is open, for readings
(RSS, instantaneous watts) that only a sample can see.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

from edge_sdk.errors import ConfigError

__all__ = ["MeasurementWindow", "SamplingThread"]

logger = logging.getLogger(__name__)

_R = TypeVar("_R")
_W = TypeVar("_W", bound="MeasurementWindow[Any]")


class MeasurementWindow(Generic[_R]):
    """Base of the context managers that measure something while their body runs.

    Subclasses say how a window opens (:meth:`_open`) and what closing it measures
    (:meth:`_close`); this class keeps the result and refuses to give it out early.
    """

    _result: _R | None = None

    def _open(self) -> None:
        """Start measuring; called on entering the ``with`` block."""
        raise NotImplementedError

    def _close(self) -> _R:
        """Stop measuring and return the window's measurement; called on leaving it."""
        raise NotImplementedError

    def __enter__(self: _W) -> _W:
        self._result = None
        self._open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._result = self._close()

    @property
    def result(self) -> _R:
        """The measurement of the finished window.

        Raises:
            ConfigError: the window has not been closed yet.
        """
        if self._result is None:
            raise ConfigError(f"{type(self).__name__} result read before the window closed")
        return self._result


class SamplingThread:
    """Calls ``sample`` every ``interval_s`` seconds on a daemon thread until :meth:`stop`.

    One object serves one window: :meth:`start` it when the window opens and
    :meth:`stop` it when the window closes. A sample that raises one of ``stop_on``
    (the process ended, the sensor went away) ends the sampling quietly; whatever was
    sampled before it is kept by ``sample``'s owner.

    Args:
        label: what is sampled, for the thread's name (``edge-sdk-<label>-sampler``)
            and the debug message when sampling stops.
        interval_s: sampling period; positive.
        sample: takes one sample and stores it (under its owner's lock).
        stop_on: exception types that end the sampling.
    """

    def __init__(
        self,
        label: str,
        interval_s: float,
        sample: Callable[[], None],
        stop_on: tuple[type[Exception], ...],
    ) -> None:
        self._label = label
        self._interval_s = interval_s
        self._sample = sample
        self._stop_on = stop_on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"edge-sdk-{label.lower()}-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._sample()
            except self._stop_on:
                logger.debug("%s sampling stopped", self._label, exc_info=True)
                return

    def start(self) -> None:
        """Start sampling; the first sample is taken one interval from now."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and wait for the thread; no sample is taken after this returns."""
        self._stop.set()
        self._thread.join()
