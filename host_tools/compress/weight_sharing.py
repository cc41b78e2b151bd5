"""Weight sharing and the packed transport form of a model (Deep Compression, stages 2 and 3).

:class:`WeightSharing` clusters each large weight tensor's nonzero values with k-means
(``2**bits`` clusters, linear initialisation as Han et al. found best) and replaces every
value by its cluster centre. Zeros stay zero, so the sparsity left by pruning survives.
The result is an ordinary float ONNX model: it runs and is measured like any other step,
but each tensor now has at most ``2**bits`` distinct values.

:func:`pack_model` writes such a model in its transport form (see
:mod:`edge_sdk.bundle.weights` for the layout): the ONNX skeleton without the shared
tensors, and per tensor its codebook, bit-packed indices and the gaps between nonzeros,
LZMA-coded. The device rebuilds the ONNX model with
:func:`edge_sdk.bundle.weights.unpack_model`, without the ``onnx`` package.
:func:`pack_model` decodes what it wrote and compares every tensor before returning, so a
packed file that would not rebuild exactly never leaves the host.
"""

from __future__ import annotations

import json
import logging
import lzma
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edge_sdk.bundle.weights import FORMAT_VERSION, LZMA_FILTERS, MAGIC, unpack_model
from edge_sdk.errors import CompressionError, ConfigError

from .passes import PassContext, PassResult

__all__ = ["WeightSharing", "PackedModel", "pack_model", "kmeans_1d"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def kmeans_1d(values: np.ndarray, clusters: int, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars, centres initialised evenly between min and max.

    Linear initialisation keeps centres on the rare large weights, which matter most
    (Han et al., 2016, section 3.2). In one dimension the nearest centre is found by a
    binary search over the midpoints of the sorted centres.

    Args:
        values: 1-D values to cluster.
        clusters: number of centres (at most the number of values is used).
        iterations: Lloyd iterations at most; stops early when assignments settle.

    Returns:
        ``(centres, assignment)``: sorted float64 centres and, per value, its centre's index.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    k = max(1, min(clusters, len(np.unique(values))))
    centres = np.linspace(values.min(), values.max(), k)
    assignment = np.zeros(len(values), dtype=np.int64)
    for _ in range(iterations):
        new = np.searchsorted((centres[1:] + centres[:-1]) / 2, values)
        sums = np.bincount(new, weights=values, minlength=k)
        counts = np.bincount(new, minlength=k)
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        settled = np.array_equal(new, assignment) and np.allclose(moved, centres)
        assignment, centres = new, moved
        order = np.argsort(centres)
        if not np.all(order == np.arange(k)):
            centres = centres[order]
            assignment = np.argsort(order)[assignment]
        if settled:
            break
    used = np.unique(assignment)
    remap = np.zeros(k, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return centres[used], remap[assignment]


@dataclass(frozen=True)
class WeightSharing:
    """Cluster each large float weight tensor into ``2**bits`` shared values.

    Args:
        bits: index width; ``2**bits`` clusters per tensor (Deep Compression used 8 for
            convolutions and 5 for fully connected layers).
        min_params: leave tensors with fewer values than this alone (biases, small layers).
        float16_codebook: round the centres to float16, so the codebook costs half.

    Raises:
        ConfigError: ``bits`` outside 1..8 or ``min_params`` below 1.
    """

    bits: int = 5
    min_params: int = 1024
    float16_codebook: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ConfigError(f"weight sharing bits must be 1..8, not {self.bits}", key="bits")
        if self.min_params < 1:
            raise ConfigError("min_params must be at least 1", key="min_params")

    @property
    def name(self) -> str:
        """The pass name."""
        return f"weight-share-{self.bits}bit"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Replace every eligible tensor's values by their cluster centres.

        Args:
            model: the model, modified in place.
            ctx: progress only.

        Returns:
            The model; notes give per tensor the clusters used and, for the whole model,
            the size of its packed transport form.

        Raises:
            CompressionError: no float weight tensor has ``min_params`` values or more.
        """
        targets = [i for i in model.graph.initializer if _eligible(i, self.min_params)]
        if not targets:
            raise CompressionError(
                f"weight sharing: no float weight tensor with at least {self.min_params} values",
                min_params=self.min_params,
            )
        layers: dict[str, int] = {}
        for done, tensor in enumerate(targets):
            ctx.report(self.name, "cluster", done, len(targets))
            values = numpy_helper.to_array(tensor)
            flat = values.ravel().astype(np.float64)
            nonzero = flat != 0
            if not nonzero.any():
                continue
            centres, assignment = kmeans_1d(flat[nonzero], 1 << self.bits)
            if self.float16_codebook:
                centres = centres.astype(np.float16).astype(np.float64)
            shared = np.zeros_like(flat)
            shared[nonzero] = centres[assignment]
            tensor.CopyFrom(numpy_helper.from_array(shared.reshape(values.shape).astype(values.dtype), tensor.name))
            layers[tensor.name] = len(centres)
        packed = pack_model(model)
        return PassResult(
            model,
            changed=bool(layers),
            notes={
                "bits": self.bits,
                "clusters": layers,
                "packed_bytes": packed.size_bytes,
                "onnx_bytes": model.ByteSize(),
            },
        )


def _eligible(tensor: onnx.TensorProto, min_params: int) -> bool:
    return tensor.data_type in _FLOAT_TYPES and len(tensor.dims) >= 2 and int(np.prod(tensor.dims)) >= min_params


@dataclass(frozen=True)
class PackedModel:
    """A model in its transport form.

    Attributes:
        data: the packed file's bytes (``edge_sdk.bundle.weights`` format).
        shared_tensors: names of the tensors coded with a codebook.
        onnx_bytes: size of the ONNX model it rebuilds.
    """

    data: bytes
    shared_tensors: tuple[str, ...]
    onnx_bytes: int

    @property
    def size_bytes(self) -> int:
        """Bytes on the wire."""
        return len(self.data)


class _Streams:
    """The data region: appends streams and records where each one is."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.offset = 0

    def add(self, raw: bytes, *, compress: bool = True, **extra: Any) -> dict[str, Any]:
        coded, codec = raw, "raw"
        if compress and raw:
            packed = lzma.compress(raw, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
            if len(packed) < len(raw):
                coded, codec = packed, "lzma"
        spec = {"offset": self.offset, "length": len(coded), "codec": codec, "size": len(raw), **extra}
        self.chunks.append(coded)
        self.offset += len(coded)
        return spec

    def smallest(self, candidates: list[tuple[bytes, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Add the candidate encoding that codes smallest; returns its spec and its extra fields."""
        best = None
        for raw, extra in candidates:
            size = len(lzma.compress(raw, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)) if raw else 0
            if best is None or size < best[0]:
                best = (size, raw, extra)
        assert best is not None
        _, raw, extra = best
        stream_extra = {k: v for k, v in extra.items() if k == "packing"}
        return self.add(raw, **stream_extra), extra


def pack_model(model: onnx.ModelProto, max_codebook: int = 256) -> PackedModel:
    """Write a model in the packed transport form and check that it decodes exactly.

    Float tensors of rank >= 2 with at most ``max_codebook`` distinct nonzero values are
    coded as codebook + indices (+ nonzero positions when that is smaller); everything
    else stays in the LZMA-coded skeleton as it is.

    Args:
        model: the model (typically after :class:`WeightSharing`); not modified.
        max_codebook: largest codebook (at most 256: indices are at most 8 bits).

    Returns:
        The packed bytes and what was coded.

    Raises:
        ConfigError: ``max_codebook`` outside 2..256.
        CompressionError: the packed form did not decode to the same tensors.
    """
    if not 2 <= max_codebook <= 256:
        raise ConfigError(f"max_codebook must be 2..256, not {max_codebook}", key="max_codebook")
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    streams = _Streams()
    entries: list[dict[str, Any]] = []
    kept: list[onnx.TensorProto] = []
    expected: dict[str, np.ndarray] = {}
    for tensor in skeleton.graph.initializer:
        values = numpy_helper.to_array(tensor) if tensor.data_type in _FLOAT_TYPES and len(tensor.dims) >= 2 else None
        entry = _encode_tensor(tensor, values, max_codebook, streams) if values is not None else None
        if entry is None:
            kept.append(tensor)
        else:
            entries.append(entry)
            expected[tensor.name] = values  # type: ignore[assignment]
    del skeleton.graph.initializer[:]
    skeleton.graph.initializer.extend(kept)
    skeleton_spec = streams.add(skeleton.SerializeToString())
    header = json.dumps(
        {"format": FORMAT_VERSION, "skeleton": skeleton_spec, "tensors": entries}, separators=(",", ":")
    ).encode("utf-8")
    data = MAGIC + struct.pack("<I", len(header)) + header + b"".join(streams.chunks)
    rebuilt = unpack_model(data)
    _check_round_trip(rebuilt, expected)
    logger.info("packed %d of %d tensors: %d bytes (ONNX %d)", len(entries), len(model.graph.initializer), len(data), model.ByteSize())
    return PackedModel(data, tuple(e["name"] for e in entries), len(rebuilt))


def _encode_tensor(tensor: onnx.TensorProto, values: np.ndarray, max_codebook: int, streams: _Streams) -> dict[str, Any] | None:
    flat = values.ravel()
    nonzero = flat != 0
    codebook_values = np.unique(flat[nonzero])
    if len(codebook_values) + 1 > max_codebook or flat.size < 16:
        return None
    # Sparse: code nonzeros only, positions separately. Dense: zero is one more codeword.
    sparse_cost = np.count_nonzero(nonzero) * 1.0 + flat.size / 8
    dense = sparse_cost > flat.size  # rough pre-choice; positions cost about a bit per value
    codebook = codebook_values if not dense else np.unique(flat)
    coded = flat if dense else flat[nonzero]
    indices = np.searchsorted(codebook, coded).astype(np.uint8)
    bits = max(1, int(np.ceil(np.log2(max(2, len(codebook))))))
    dtype = values.dtype.newbyteorder("<")
    entry: dict[str, Any] = {
        "name": tensor.name,
        "data_type": int(tensor.data_type),
        "dims": [int(d) for d in tensor.dims],
        "bits": bits,
        "layout": "dense" if dense else "sparse",
        "count": int(len(coded)),
        "codebook": streams.add(codebook.astype(dtype).tobytes(), compress=False),
    }
    bitpacked = np.packbits(
        ((indices[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8).ravel(), bitorder="little"
    ).tobytes()
    entry["indices"], _ = streams.smallest([(indices.tobytes(), {"packing": "bytes"}), (bitpacked, {"packing": "bits"})])
    if dense:
        entry["positions"], entry["position_coding"] = None, None
        return entry
    positions = np.flatnonzero(nonzero)
    gaps = np.diff(positions, prepend=0)
    gaps[0] = positions[0] if len(positions) else 0
    gap_coding = "gaps-u1" if gaps.max(initial=0) < 1 << 8 else "gaps-u2" if gaps.max() < 1 << 16 else "gaps-u4"
    gap_dtype = {"gaps-u1": "u1", "gaps-u2": "<u2", "gaps-u4": "<u4"}[gap_coding]
    bitmask = np.packbits(nonzero.astype(np.uint8), bitorder="little").tobytes()
    entry["positions"], chosen = streams.smallest(
        [
            (gaps.astype(gap_dtype).tobytes(), {"position_coding": gap_coding}),
            (bitmask, {"position_coding": "bitmask"}),
        ]
    )
    entry["position_coding"] = chosen["position_coding"]
    return entry


def _check_round_trip(rebuilt: bytes, expected: dict[str, np.ndarray]) -> None:
    model = onnx.load_model_from_string(rebuilt)
    got = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, values in expected.items():
        if name not in got or got[name].shape != values.shape or not np.array_equal(got[name], values):
            raise CompressionError(f"packed model does not rebuild tensor {name!r} exactly", tensor=name)
