"""Untrusted JSON, parsed within bounds: the one parser for manifests, messages, roots and signatures. Pure.

Every JSON document that comes from outside this process goes through :func:`parse_json`
(or :func:`parse_json_object`, which also requires an object at the top), which:

- refuses a document above ``max_bytes`` before decoding a single byte;
- requires UTF-8;
- refuses ``NaN``, ``Infinity`` and ``-Infinity``, which Python's :mod:`json` accepts but JSON does not;
- refuses nesting deeper than ``max_depth``, and a document so deep that the decoder itself
  would run out of stack.

Duplicate keys are not refused (the last one wins, as in :func:`json.loads`): none of the
documents has ever refused them, and the signed forms are canonical JSON anyway.

Failures raise :class:`~edge_sdk.errors.JsonError`, or :class:`~edge_sdk.errors.JsonTooLargeError`
for size; each caller maps them to its own type (``raise ManifestError(exc.message) from exc``).

The predicates :func:`is_int`, :func:`is_number` and :func:`is_text` check decoded values the
way JSON means them (``True`` is not the integer 1). They take ``object`` on purpose: the
dataclasses that validate in ``__post_init__`` declare the type a field *should* have, and
these checks are for the values that arrive from outside without one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, TypeGuard

from edge_sdk.errors import ConfigError, JsonError, JsonTooLargeError

__all__ = ["DEFAULT_MAX_DEPTH", "JsonLimits", "is_int", "is_number", "is_text", "parse_json", "parse_json_object"]

#: Nesting bound used by every document unless its owner says otherwise.
DEFAULT_MAX_DEPTH = 16


@dataclass(frozen=True)
class JsonLimits:
    """Bounds on one untrusted JSON document.

    Attributes:
        max_bytes: largest document accepted, in bytes, checked before decoding.
        max_depth: deepest nesting accepted. Every value counts one level below its
            container: a top-level scalar is depth 1, ``{"a": 1}`` is depth 2,
            ``{"a": [1]}`` is depth 3.

    Raises:
        ConfigError: a bound is not a positive integer.
    """

    max_bytes: int
    max_depth: int = DEFAULT_MAX_DEPTH

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"JsonLimits.{name} must be a positive integer, got {value!r}")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_depth(value: object, limit: int, what: str) -> None:
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise JsonError(f"{what} nests deeper than {limit} levels", max_depth=limit)
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def parse_json(data: bytes, limits: JsonLimits, *, what: str) -> object:
    """Decode one untrusted JSON document of any top-level type.

    Args:
        data: the document as received.
        limits: size and depth bounds.
        what: the document's name in error messages (``"manifest"``, ``"message"``).

    Returns:
        The decoded value (dicts, lists, str, int, float, bool, None).

    Raises:
        JsonTooLargeError: ``data`` is above ``limits.max_bytes`` (checked before decoding).
        JsonError: not UTF-8 JSON, uses NaN or Infinity, or nests deeper than ``limits.max_depth``.
    """
    if len(data) > limits.max_bytes:
        raise JsonTooLargeError(
            f"{what} is {len(data)} bytes (limit {limits.max_bytes})", size=len(data), limit=limits.max_bytes
        )
    try:
        value: object = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise JsonError(f"{what} is not UTF-8 JSON") from exc
    # A value nests no deeper than one level per opening bracket in the text (brackets
    # inside strings only raise the count), so most documents need no walk at all.
    if data.count(b"[") + data.count(b"{") >= limits.max_depth:
        _check_depth(value, limits.max_depth, what)
    return value


def parse_json_object(data: bytes, limits: JsonLimits, *, what: str) -> dict[str, Any]:
    """Decode one untrusted JSON document that must be an object at the top.

    Args:
        data: the document as received.
        limits: size and depth bounds.
        what: the document's name in error messages.

    Returns:
        The decoded object.

    Raises:
        JsonTooLargeError: ``data`` is above ``limits.max_bytes`` (checked before decoding).
        JsonError: not UTF-8 JSON, NaN or Infinity, too deep, or not an object.
    """
    value = parse_json(data, limits, what=what)
    if not isinstance(value, dict):
        raise JsonError(f"{what} must be a JSON object")
    return value


def is_int(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an integer and not a bool.

    Args:
        value: any value, typically decoded from JSON.

    Returns:
        True for ``int`` values other than ``True`` and ``False``.
    """
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[float]:
    """Whether ``value`` is an int or a float and not a bool (finite or not: check that apart).

    Args:
        value: any value, typically decoded from JSON.

    Returns:
        True for ``int`` and ``float`` values other than ``True`` and ``False``.
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_text(value: object, *, max_len: int | None = None, pattern: re.Pattern[str] | None = None) -> TypeGuard[str]:
    """Whether ``value`` is a non-empty string, within ``max_len`` and matching ``pattern`` in full.

    Args:
        value: any value, typically decoded from JSON.
        max_len: longest length accepted, or ``None`` for any.
        pattern: a regular expression the whole string must match, or ``None``.

    Returns:
        True when every given condition holds.
    """
    if not isinstance(value, str) or not value:
        return False
    if max_len is not None and len(value) > max_len:
        return False
    return pattern is None or pattern.fullmatch(value) is not None
