"""Whether another execution of a model gives the same outputs as its dense fp32 one.

Shared by the host, which checks a sparse graph before packing it, and the device,
which checks every execution it may choose before timing it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["TOLERANCE", "agreement"]

#: Largest difference from the dense execution's outputs an execution may show, as a
#: fraction of the largest magnitude among the dense outputs. Int8 values carry int8
#: error whichever graph runs them.
TOLERANCE = {"dense_int8": 0.05, "sparse": 1e-3}


def agreement(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], tolerance: float) -> str | None:
    """Whether a candidate's outputs match the dense execution's, within ``tolerance``.

    Floating outputs are compared by their largest absolute difference, as a fraction
    of the largest magnitude among the reference's floating outputs; other outputs
    (labels, indices) only by shape, since an int8 execution may flip a near tie.

    Returns:
        ``None`` when they agree, else why not.
    """
    if len(reference) != len(outputs):
        return f"it returns {len(outputs)} outputs, the dense execution {len(reference)}"
    floats = [np.asarray(r) for r in reference if np.issubdtype(np.asarray(r).dtype, np.floating)]
    scale = max((float(np.abs(r).max()) for r in floats if r.size), default=0.0) or 1.0
    worst = 0.0
    for i, (want, got) in enumerate(zip(reference, outputs, strict=False)):
        want, got = np.asarray(want), np.asarray(got)
        if want.shape != got.shape:
            return f"its output {i} has shape {list(got.shape)}, the dense execution's {list(want.shape)}"
        if np.issubdtype(want.dtype, np.floating) and want.size:
            diff = float(np.abs(got.astype(np.float64) - want).max()) / scale
            worst = max(worst, diff) if np.isfinite(diff) else float("inf")
    if not worst <= tolerance:
        return f"its outputs differ from the dense execution's by {worst:.2%} of their size (limit {tolerance:.2%})"
    return None
