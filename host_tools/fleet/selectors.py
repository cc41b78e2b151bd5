"""Selectors: which devices a command is about, by their labels. Pure.

Grammar (whitespace around terms is ignored)::

    selector := term ("," term)*          comma means AND
    term     := key "=" value             the label is present with this value
              | key "!=" value            the label is absent, or has another value
              | key                       the label is present (any value)
              | "id=" device_id           the device itself
              | "id!=" device_id          every device but this one

An empty selector selects every device. Keys and values obey the label rules of
:mod:`edge_sdk.protocol.labels`, so a selector cannot be ambiguous. A group is a selector
saved under a name (``edgectl groups add``); ``@name`` refers to it where a selector is
taken (:func:`resolve_selector`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from edge_sdk.errors import ConfigError
from edge_sdk.protocol.labels import check_label_key, check_label_value
from edge_sdk.protocol.topics import check_device_id

__all__ = [
    "MAX_SELECTOR_LEN",
    "MAX_TERMS",
    "Selector",
    "Term",
    "check_group_name",
    "parse_selector",
    "resolve_selector",
]

#: Longest selector text.
MAX_SELECTOR_LEN = 2048
#: Most terms in one selector.
MAX_TERMS = 32

Op = Literal["=", "!=", "exists"]


@dataclass(frozen=True)
class Term:
    """One condition on a device.

    Args:
        key: a label key, or ``id`` for the device id.
        op: ``=``, ``!=`` or ``exists``.
        value: the value compared (``""`` for ``exists``).
    """

    key: str
    op: Op
    value: str = ""

    def matches(self, device_id: str, labels: Mapping[str, str]) -> bool:
        """Whether a device with this id and these (effective) labels meets the term."""
        actual = device_id if self.key == "id" else labels.get(self.key)
        if self.op == "exists":
            return actual is not None
        if self.op == "=":
            return actual == self.value
        return actual != self.value

    def __str__(self) -> str:
        return self.key if self.op == "exists" else f"{self.key}{self.op}{self.value}"


@dataclass(frozen=True)
class Selector:
    """A conjunction of terms; matches every device when it has none.

    Build it with :func:`parse_selector`; ``str()`` gives its canonical text back.
    """

    terms: tuple[Term, ...] = ()

    def matches(self, device_id: str, labels: Mapping[str, str]) -> bool:
        """Whether a device with this id and these (effective) labels is selected."""
        return all(t.matches(device_id, labels) for t in self.terms)

    def device_ids(self) -> frozenset[str] | None:
        """The only device ids it can select (from ``id=`` terms), or None when not bounded so."""
        ids = [t.value for t in self.terms if t.key == "id" and t.op == "="]
        if not ids:
            return None
        return frozenset(ids) if len(set(ids)) == 1 else frozenset()

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.terms)


def _term(text: str) -> Term:
    if "!=" in text:
        key, value = text.split("!=", 1)
        op: Op = "!="
    elif "=" in text:
        key, value = text.split("=", 1)
        op = "="
    else:
        key, value, op = text, "", "exists"
    key = key.strip()
    value = value.strip()
    if key == "id":
        if op == "exists":
            raise ConfigError("selector term 'id' needs a device id: id=DEVICE or id!=DEVICE")
        check_device_id(value)
        return Term("id", op, value)
    check_label_key(key)
    if op != "exists":
        check_label_value(key, value)
    return Term(key, op, value)


def parse_selector(text: str) -> Selector:
    """Parse a selector (see the module's grammar).

    Args:
        text: e.g. ``site=depot-3,hw!=pi4,gpu``.

    Returns:
        The selector; an empty text selects every device.

    Raises:
        ConfigError: too long, too many terms, an empty term, or a bad key, value or device id
            (the message names the term).
    """
    if len(text) > MAX_SELECTOR_LEN:
        raise ConfigError(f"selector longer than {MAX_SELECTOR_LEN} characters")
    if not text.strip():
        return Selector()
    parts = text.split(",")
    if len(parts) > MAX_TERMS:
        raise ConfigError(f"selector has {len(parts)} terms; at most {MAX_TERMS} are allowed")
    terms = []
    for part in parts:
        if not part.strip():
            raise ConfigError(f"selector {text[:80]!r} has an empty term (two commas, or one at an end)")
        try:
            terms.append(_term(part.strip()))
        except ConfigError as exc:
            raise ConfigError(f"selector term {part.strip()[:80]!r}: {exc.message}", term=part.strip()[:80]) from exc
    return Selector(tuple(terms))


def check_group_name(name: str) -> str:
    """A group's name: like a label key (lowercase letters, digits, ``. _ - /``).

    Raises:
        ConfigError: not a valid name.
    """
    try:
        return check_label_key(name)
    except ConfigError as exc:
        raise ConfigError(f"bad group name {name!r}: {exc.message.split(': ', 1)[-1]}", group=name) from exc


def resolve_selector(text: str, group: Callable[[str], str | None]) -> Selector:
    """A selector given on the command line: ``@name`` for a saved group, else the selector itself.

    Args:
        text: the argument.
        group: the saved selector text of a group name, or None when there is no such group.

    Returns:
        The selector.

    Raises:
        ConfigError: an unknown group, or a bad selector.
    """
    if text.startswith("@"):
        name = check_group_name(text[1:])
        saved = group(name)
        if saved is None:
            raise ConfigError(f"no group {name!r}: edgectl groups list shows the saved ones", group=name)
        return parse_selector(saved)
    return parse_selector(text)
