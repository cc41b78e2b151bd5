"""A stand-in runtime for simulated devices: a session that runs nothing and takes simulated time.

A thousand simulated devices on one machine cannot each load and time a real model. The
stand-in session satisfies :class:`~edge_sdk.runtime.InferenceSession`: it has no inputs
and no outputs (so a health check passes), and each :meth:`StandInSession.run` advances
the session's own clock by a latency drawn from a :class:`~edge_sdk.simulation.LatencyModel`
(times a regression factor) instead of computing. Time it with :attr:`StandInSession.clock`
and the figures follow the configured distribution exactly; they are not a measurement,
and the session says so: its runtime and provider are ``simulated``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from edge_sdk.runtime._types import TensorSpec

if TYPE_CHECKING:
    import numpy as np

    from edge_sdk.simulation import LatencyModel

__all__ = ["SIMULATED", "StandInSession"]

#: The runtime, provider and precision label of every stand-in session (and of its reports).
SIMULATED = "simulated"


class StandInSession:
    """A session whose runs take simulated time.

    Args:
        model: the latency distribution and the model's memory.
        seed: seeds the draws (a device id and version make a stable one).
        factor: latency regression: every draw multiplied by it.
        threads: the threads it claims to use.
    """

    runtime = SIMULATED
    providers: tuple[str, ...] = (SIMULATED,)
    precision = "fp32"

    def __init__(self, model: LatencyModel, seed: str | int, factor: float = 1.0, threads: int = 1) -> None:
        self.model = model
        self.factor = factor
        self.threads = threads
        self._rng = random.Random(seed)
        self._now = 0.0
        self.runs = 0

    def clock(self) -> float:
        """The session's simulated seconds (advanced only by :meth:`run`)."""
        return self._now

    def inputs(self) -> list[TensorSpec]:
        return []

    def outputs(self) -> list[TensorSpec]:
        return []

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Take one drawn latency of simulated time; compute nothing."""
        self._now += self.model.draw_s(self._rng, self.factor)
        self.runs += 1
        return []

    def close(self) -> None:
        pass

    def __enter__(self) -> StandInSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
