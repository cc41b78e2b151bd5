"""Lazy package exports (PEP 562): a package's public names load their module on first use.

A package's ``__init__`` keeps a map from each exported name to the submodule that defines
it, imports the names for type checkers only (``if TYPE_CHECKING``), and ends with::

    __getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)

so that ``from edge_sdk.protocol import TOPIC_ROOT`` does not import the codec and the keys.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, homes: Mapping[str, str], names: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``.

    Args:
        package: the package's ``__name__``.
        homes: exported name -> submodule (relative to ``package``) that defines it.
        names: what ``dir()`` lists (the package's ``__all__``).

    Returns:
        ``(__getattr__, __dir__)``; the first caches each value on the package once loaded.
    """
    listed = sorted(names)

    def getattr_(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def dir_() -> list[str]:
        return listed

    return getattr_, dir_
