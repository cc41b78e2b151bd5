"""Which execution of a sparse bundle a device chose, and what each candidate measured.

The device's ``device_agent.selection`` measures and chooses; these are its results as
they travel in a metrics report (``execution``) and sit in the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_sdk.errors import MessageError
from edge_sdk.metrics._fields import (
    as_mapping,
    optional_number,
    optional_str,
    read_int,
    read_str,
    unknown,
)

__all__ = ["CandidateTiming", "ExecutionChoice"]


@dataclass(frozen=True)
class CandidateTiming:
    """How one execution measured, or why it could not run or does not apply.

    Attributes:
        name: the execution, e.g. ``dense``, ``dense_int8``, ``sparse``.
        p50_ms, p90_ms, mean_ms: latency over the timed runs (``None`` when not timed).
        runs: timed runs.
        error: why it could not run (or disagreed with the dense execution), or ``None``.
        not_applicable: why it does not apply to this bundle or this build, or ``None``.
        extra: fields from a newer peer, kept and written back, never read.

    Raises:
        MessageError: an empty name or a negative run count.
    """

    name: str
    p50_ms: float | None = None
    p90_ms: float | None = None
    mean_ms: float | None = None
    runs: int = 0
    error: str | None = None
    not_applicable: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise MessageError("execution candidate needs a name", field="name")
        if self.runs < 0:
            raise MessageError(f"execution candidate {self.name!r}: runs must not be negative", field="runs")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form; ``error`` and ``not_applicable`` only when set."""
        d: dict[str, Any] = {
            "name": self.name,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "mean_ms": self.mean_ms,
            "runs": self.runs,
        }
        if self.error is not None:
            d["error"] = self.error
        if self.not_applicable is not None:
            d["not_applicable"] = self.not_applicable
        return {**self.extra, **d} if self.extra else d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CandidateTiming:
        """Rebuild from :meth:`to_dict` output.

        Args:
            data: the mapping to read; unknown keys are kept in ``extra``.

        Returns:
            The timing.

        Raises:
            MessageError: a field is missing or of the wrong type.
        """
        where = "execution candidate"
        data = as_mapping(data, where)
        return cls(
            name=read_str(data, "name", where),
            p50_ms=optional_number(data, "p50_ms", where),
            p90_ms=optional_number(data, "p90_ms", where),
            mean_ms=optional_number(data, "mean_ms", where),
            runs=read_int(data, "runs", where, default=0),
            error=optional_str(data, "error", where),
            not_applicable=optional_str(data, "not_applicable", where),
            extra=unknown(data, cls),
        )


@dataclass(frozen=True)
class ExecutionChoice:
    """The execution picked for a bundle on a device, and why.

    Attributes:
        chosen: the execution that runs, e.g. ``sparse``.
        reason: one line for humans.
        pinned_by: ``"config"``, ``"manifest"`` or ``None`` (measured).
        candidates: what each execution measured, or why it did not (empty when pinned).
        extra: fields from a newer peer, kept and written back, never read.

    Raises:
        MessageError: ``chosen`` is empty.
    """

    chosen: str
    reason: str
    pinned_by: str | None = None
    candidates: tuple[CandidateTiming, ...] = field(default_factory=tuple)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.chosen:
            raise MessageError("execution choice names no execution", field="chosen")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, with the kept unknown fields."""
        d = {
            "chosen": self.chosen,
            "reason": self.reason,
            "pinned_by": self.pinned_by,
            "candidates": [c.to_dict() for c in self.candidates],
        }
        return {**self.extra, **d} if self.extra else d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExecutionChoice:
        """Rebuild from :meth:`to_dict` output, e.g. a metrics report's ``execution``.

        Args:
            data: the mapping to read; unknown keys are kept in ``extra``.

        Returns:
            The choice.

        Raises:
            MessageError: a field is missing or of the wrong type.
        """
        where = "execution"
        data = as_mapping(data, where)
        raw = data.get("candidates", [])
        if not isinstance(raw, (list, tuple)):
            raise MessageError(f"{where} field 'candidates' must be a list", field="candidates")
        return cls(
            chosen=read_str(data, "chosen", where),
            reason=read_str(data, "reason", where, default=""),
            pinned_by=optional_str(data, "pinned_by", where),
            candidates=tuple(CandidateTiming.from_dict(c) for c in raw),
            extra=unknown(data, cls),
        )
