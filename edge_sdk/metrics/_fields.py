"""Reading measurements back from JSON: one field check per kind of value, and unknown keys kept.

Every measurement type's ``from_dict`` reads a mapping that came from another machine
(a device's metrics report) or from a database row, so each check names the type and
the field it found wrong and raises :class:`~edge_sdk.errors.MessageError`. Keys this
build does not know are returned by :func:`unknown` so the type can keep them in its
``extra`` and write them back unchanged; they are never acted on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, cast

from edge_sdk.errors import MessageError

__all__ = [
    "as_mapping",
    "optional_int",
    "optional_number",
    "optional_str",
    "plain_dict",
    "read_bool",
    "read_int",
    "read_number",
    "read_str",
    "unknown",
]

_MISSING: Any = object()


def as_mapping(data: object, where: str) -> Mapping[str, Any]:
    """``data`` itself when it is a JSON object.

    Raises:
        MessageError: it is not.
    """
    if not isinstance(data, Mapping):
        raise MessageError(f"{where} must be an object, got {type(data).__name__}", field=where)
    return data


def _get(data: Mapping[str, Any], name: str, where: str, default: Any) -> Any:
    if name in data:
        return data[name]
    if default is _MISSING:
        raise MessageError(f"{where} field {name!r} is missing", field=name)
    return default


def read_number(data: Mapping[str, Any], name: str, where: str, default: Any = _MISSING) -> float:
    """A finite number; an int is accepted and kept as it is, so a report reads back unchanged.

    Raises:
        MessageError: missing without a default, not a number, or not finite.
    """
    raw = _get(data, name, where, default)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise MessageError(f"{where} field {name!r} must be a finite number, got {raw!r}", field=name)
    return raw


def read_int(data: Mapping[str, Any], name: str, where: str, default: Any = _MISSING) -> int:
    """An integer (a float with no fractional part is accepted).

    Raises:
        MessageError: missing without a default, or not an integer.
    """
    raw = _get(data, name, where, default)
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise MessageError(f"{where} field {name!r} must be an integer, got {raw!r}", field=name)
    return raw


def read_str(data: Mapping[str, Any], name: str, where: str, default: Any = _MISSING) -> str:
    """A string.

    Raises:
        MessageError: missing without a default, or not a string.
    """
    raw = _get(data, name, where, default)
    if not isinstance(raw, str):
        raise MessageError(f"{where} field {name!r} must be a string, got {raw!r}", field=name)
    return raw


def read_bool(data: Mapping[str, Any], name: str, where: str, default: Any = _MISSING) -> bool:
    """A boolean.

    Raises:
        MessageError: missing without a default, or not a boolean.
    """
    raw = _get(data, name, where, default)
    if not isinstance(raw, bool):
        raise MessageError(f"{where} field {name!r} must be true or false, got {raw!r}", field=name)
    return raw


def optional_number(data: Mapping[str, Any], name: str, where: str) -> float | None:
    """A finite number, or ``None`` when absent or null."""
    return None if data.get(name) is None else read_number(data, name, where)


def optional_int(data: Mapping[str, Any], name: str, where: str) -> int | None:
    """An integer, or ``None`` when absent or null."""
    return None if data.get(name) is None else read_int(data, name, where)


def optional_str(data: Mapping[str, Any], name: str, where: str) -> str | None:
    """A string, or ``None`` when absent or null."""
    return None if data.get(name) is None else read_str(data, name, where)


def unknown(data: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """The keys of ``data`` that are not fields of the dataclass ``cls`` (``extra`` aside)."""
    known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return {k: v for k, v in data.items() if k not in known}


def plain_dict(obj: Any, omit_none: tuple[str, ...] = ()) -> dict[str, Any]:
    """A measurement's JSON form: its kept unknown keys, then its own fields (which win).

    Nested measurements and tuples of them are written with their own ``to_dict``.
    Fields named in ``omit_none`` are left out while they are ``None`` (optional fields
    added later, so a report without them reads as it always did).
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name == "extra":
            continue
        value = getattr(obj, f.name)
        if value is None and f.name in omit_none:
            continue
        if dataclasses.is_dataclass(value):
            value = cast(Any, value).to_dict()  # every nested measurement has to_dict
        elif isinstance(value, tuple):
            value = [cast(Any, v).to_dict() if dataclasses.is_dataclass(v) else v for v in value]
        out[f.name] = value
    extra = getattr(obj, "extra", None)
    return {**extra, **out} if extra else out
