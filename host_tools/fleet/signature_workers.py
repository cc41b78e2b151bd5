"""Checking many device signatures at once, in this process and worker processes.

:class:`SignaturePool` is what a collector hands :meth:`~host_tools.fleet.enrolment.ReportGate.check_many`
for a backlog: the checks (:func:`edge_sdk.trust.check_device_signatures`, pure) are split
between the collector and ``workers`` processes. Workers are started with ``spawn`` (the
collector runs paho's network thread; never fork it), import only the trust code, and
exit when their collector is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor

from edge_sdk.errors import ConfigError
from edge_sdk.trust import SignatureCheck, check_device_signatures

__all__ = ["SignaturePool", "follow_parent"]

log = logging.getLogger(__name__)


class SignaturePool:
    """Checks a batch's signatures in this process and ``workers`` worker processes at once.

    The pool starts on first use (``spawn``: never fork a process that runs paho's
    thread). Should it break (a worker killed), the batch is checked here instead and the
    pool started again next time: an answer is never skipped.

    Args:
        workers: worker processes beside this one.
        executor: makes the executor (tests inject one); a ``spawn`` process pool by default.
    """

    def __init__(self, workers: int, executor: Callable[[int], Executor] | None = None) -> None:
        if workers < 1:
            raise ConfigError(f"a signature pool needs at least one worker, not {workers}", key="verify_workers")
        self.workers = workers
        self._make = executor or _spawn_pool
        self._executor: Executor | None = None

    def __call__(self, checks: Sequence[SignatureCheck]) -> list[bool]:
        """Whether each signature verifies (:func:`edge_sdk.trust.check_device_signatures`), in order."""
        parts = self.workers + 1
        size = -(-len(checks) // parts)
        chunks = [list(checks[i : i + size]) for i in range(0, len(checks), size)]
        if len(chunks) < 2:
            return check_device_signatures(checks)
        try:
            if self._executor is None:
                self._executor = self._make(self.workers)
            futures = [self._executor.submit(check_device_signatures, chunk) for chunk in chunks[1:]]
            answers = check_device_signatures(chunks[0])  # this process takes a share too
            for future in futures:
                answers.extend(future.result())
            return answers
        except Exception as exc:  # a broken pool (BrokenProcessPool, OSError): check here, start again later
            log.warning("signature workers failed (%s); checking this batch in the collector", exc)
            self.close()
            return check_device_signatures(checks)

    def submit(self, checks: Sequence[SignatureCheck]) -> Callable[[], list[bool]]:
        """Start checking ``checks`` in the worker processes only, and return at once.

        For a collector that judges and writes one batch while the workers check the next
        one's signatures. Call what is returned (once) for the answers, in order; should the
        pool break, they are computed here then.
        """
        if not checks:
            return list
        size = -(-len(checks) // self.workers)
        chunks = [list(checks[i : i + size]) for i in range(0, len(checks), size)]
        try:
            if self._executor is None:
                self._executor = self._make(self.workers)
            futures = [self._executor.submit(check_device_signatures, chunk) for chunk in chunks]
        except Exception as exc:  # a broken pool: check when asked, start again later
            log.warning("signature workers failed (%s); checking this batch in the collector", exc)
            self.close()
            return lambda: check_device_signatures(checks)

        def answers() -> list[bool]:
            try:
                return [ok for future in futures for ok in future.result()]
            except Exception as exc:  # a worker died mid-batch
                log.warning("signature workers failed (%s); checking this batch in the collector", exc)
                self.close()
                return check_device_signatures(checks)

        return answers

    def close(self) -> None:
        """Stop the workers (started again on next use)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


def _spawn_pool(workers: int) -> Executor:
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=follow_parent,
        initargs=(os.getpid(),),
    )


def follow_parent(parent: int, poll_s: float = 0.2) -> None:
    """In a worker: exit as soon as ``parent`` is gone (SIGKILLed collectors leave no workers behind).

    A worker whose collector was killed would otherwise live on, holding what it inherited
    (the collector's stdout, its place in the service's cgroup).
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()
