"""A bounds-checked cursor over the bytes of the bundle's binary weight formats."""

from __future__ import annotations

import numpy as np

from edge_sdk.errors import BundleFormatError
from edge_sdk.protowire import WireError, read_varint


class ByteReader:
    """Reads varints, byte runs and arrays; every overrun is a :class:`BundleFormatError`.

    Args:
        view: the file's bytes.
        context: put in front of every error message (``"sparse weights: "``, say).
    """

    def __init__(self, view: memoryview, context: str = "") -> None:
        self.view, self.pos, self.context = view, 0, context

    def varint(self, what: str) -> int:
        try:
            value, self.pos = read_varint(self.view, self.pos)
        except WireError as exc:
            raise BundleFormatError(f"{self.context}{what}: truncated or overlong varint") from exc
        return value

    def take(self, length: int, what: str) -> memoryview:
        if length < 0 or self.pos + length > len(self.view):
            raise BundleFormatError(f"{self.context}{what}: {length} bytes wanted, the file ends first")
        out = self.view[self.pos : self.pos + length]
        self.pos += length
        return out

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def chunk(self, what: str) -> memoryview:
        """A length-prefixed run of bytes."""
        return self.take(self.varint(what), what)

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype)

    def trailing(self) -> int:
        """Bytes left after the cursor."""
        return len(self.view) - self.pos
