"""Device labels: ``key=value`` pairs that say where a device is and what it is. Pure.

A device's agent config names its own labels (``site=depot-3``, ``hw=pi5``); its signed
status carries them to the host, where an operator may add or override some. Selectors
(``site=depot-3,hw!=pi4``) pick devices by them, so the characters a selector uses
(``,``, ``=``, ``!``) never appear in a key or a value.

Bounds, because a status is untrusted input: at most :data:`MAX_LABELS` labels; a key is
1 to :data:`MAX_KEY_LEN` characters of lowercase letters, digits, ``.``, ``_``, ``-``
and ``/``, starting with a letter or digit; a value is 0 to :data:`MAX_VALUE_LEN`
characters of letters, digits, ``.``, ``_``, ``-``, ``:`` and ``/``. The key ``id`` is
reserved: a selector's ``id=`` names the device id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from edge_sdk.errors import ConfigError

__all__ = [
    "MAX_KEY_LEN",
    "MAX_LABELS",
    "MAX_VALUE_LEN",
    "RESERVED_KEYS",
    "check_label_key",
    "check_label_value",
    "check_labels",
    "parse_label",
    "parse_labels",
]

#: Most labels one device may carry (from its config, and separately from the operator).
MAX_LABELS = 32
#: Longest label key.
MAX_KEY_LEN = 63
#: Longest label value.
MAX_VALUE_LEN = 63
#: Keys a label may not have: selectors use them for the device itself.
RESERVED_KEYS = frozenset({"id"})

_KEY_RE = re.compile(rf"[a-z0-9][a-z0-9._/-]{{0,{MAX_KEY_LEN - 1}}}")
_VALUE_RE = re.compile(rf"[A-Za-z0-9._:/-]{{0,{MAX_VALUE_LEN}}}")


def check_label_key(key: object) -> str:
    """``key`` if it may name a label.

    Raises:
        ConfigError: not a string of the allowed characters and length, or reserved.
    """
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ConfigError(
            f"bad label key {key!r}: use 1-{MAX_KEY_LEN} lowercase letters, digits, '.', '_', '-' or '/', "
            "starting with a letter or digit",
            key=str(key)[:80],
        )
    if key in RESERVED_KEYS:
        raise ConfigError(f"label key {key!r} is reserved (a selector's {key}= names the device)", key=key)
    return key


def check_label_value(key: str, value: object) -> str:
    """``value`` if label ``key`` may hold it.

    Raises:
        ConfigError: not a string of the allowed characters and length.
    """
    if not isinstance(value, str) or not _VALUE_RE.fullmatch(value):
        raise ConfigError(
            f"bad value {str(value)[:80]!r} for label {key!r}: use at most {MAX_VALUE_LEN} letters, digits, "
            "'.', '_', '-', ':' or '/'",
            key=key,
        )
    return value


def check_labels(labels: object) -> dict[str, str]:
    """A label mapping, checked: every key and value allowed, at most :data:`MAX_LABELS`.

    Args:
        labels: the candidate (any value: config files and messages are checked here).

    Returns:
        The labels as a new dict, sorted by key.

    Raises:
        ConfigError: not a mapping of strings, too many, or a bad key or value.
    """
    if not isinstance(labels, Mapping):
        raise ConfigError(f"labels must be a table of key = value, got {type(labels).__name__}")
    if len(labels) > MAX_LABELS:
        raise ConfigError(f"{len(labels)} labels given; at most {MAX_LABELS} are allowed")
    return {check_label_key(k): check_label_value(k, v) for k, v in sorted(labels.items(), key=lambda kv: str(kv[0]))}


def parse_label(text: str) -> tuple[str, str]:
    """``key=value`` as a checked pair.

    Raises:
        ConfigError: no ``=``, or a bad key or value.
    """
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"label {text[:80]!r} must be key=value")
    return check_label_key(key), check_label_value(key, value)


def parse_labels(texts: Iterable[str]) -> dict[str, str]:
    """Several ``key=value`` texts as checked labels (a key given twice keeps the last value).

    Raises:
        ConfigError: a bad label, or more than :data:`MAX_LABELS`.
    """
    return check_labels(dict(parse_label(t) for t in texts))
