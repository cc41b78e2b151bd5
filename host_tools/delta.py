"""Build a delta between two versions of a bundle, for devices that already run the older one.

A device that runs version N holds N's payload files in its slot; version N+1 then needs
to travel only as what changed (:mod:`edge_sdk.bundle.delta` defines the format and
applies it). :func:`build_delta` reads both bundle files and writes the operations that
rebuild N+1's file byte for byte: COPY a range of a base payload file, DATA (literal
bytes), or ZERO. Each payload file of the new bundle is matched against the base's, in
this order:

1. the same bytes as a whole base file (by sha256): one COPY of that file;
2. ONNX models (``*.onnx``): each tensor's data (``raw_data`` or the packed typed
   fields, of initializers, sparse initializers, and tensor attributes, subgraphs
   included) whose bytes equal some tensor's data in a base model (by sha256): a COPY of
   exactly that range. The byte ranges come from the protobuf wire format
   (:mod:`edge_sdk.protowire`, :func:`tensor_data_spans`), so nothing is decoded and
   renamed, reordered or shifted tensors are found wherever they sit;
3. any file: blocks of :attr:`DeltaOptions.block_size` bytes at aligned offsets that
   equal an aligned block of any base file (by hash, then compared), and the longest
   common prefix and suffix with the base file of the same path. This is bounded (one
   index entry per base block, one lookup per new block) and fits how the other
   weight files change (packed weight-shared models, CSR sparse weights, tflite): a
   fine-tune rewrites some tensors in place or changes the length of one and shifts
   the rest, which the prefix and suffix catch;
4. every match is then grown byte by byte into the unmatched bytes on either side (the
   protobuf framing between two unchanged tensors, a tensor's unchanged tail); what is
   left, and everything outside the payload (tar headers, manifest, signatures), is
   DATA, except runs of zero bytes (tar padding, the end of the archive), which are ZERO.

Adjacent COPYs of consecutive ranges of one file merge into one. Every COPY is checked
byte for byte when it is chosen, and the finished plan is replayed once against its
sha256 before anything is written. No delta is written (``None``) when the bundles are
of different names, either is encrypted (the device's slot holds plaintext, the bundle
ciphertext), or the delta would not be smaller than :attr:`DeltaOptions.max_ratio` of
the full file: the full transfer is then the better choice.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from edge_sdk.bundle import Manifest, content_digest
from edge_sdk.bundle.archive import BundleLimits, BundleReader
from edge_sdk.bundle.delta import (
    CopyOp,
    DataOp,
    DeltaHeader,
    DeltaLimits,
    DeltaOp,
    ZeroOp,
    encode_header,
    write_delta,
)
from edge_sdk.errors import ConfigError, FileSetMismatchError, HashMismatchError, StorageError
from edge_sdk.protowire import GRAPH_INITIALIZER, GRAPH_NODE, MODEL_GRAPH, WireError, fields

__all__ = ["DeltaOptions", "DeltaStats", "TensorData", "build_delta", "tensor_data_spans"]

logger = logging.getLogger(__name__)

# TensorProto: name 8; data fields float 4, int32 5, int64 7, raw 9, double 10, uint64 11.
_TENSOR_NAME = 8
_TENSOR_DATA = frozenset({4, 5, 7, 9, 10, 11})
# GraphProto.sparse_initializer; SparseTensorProto values 1, indices 2.
_GRAPH_SPARSE_INITIALIZER = 15
_SPARSE_PARTS = frozenset({1, 2})
# NodeProto.attribute; AttributeProto t 5, g 6, tensors 10, graphs 11.
_NODE_ATTRIBUTE = 5
_ATTR_TENSORS = frozenset({5, 10})
_ATTR_GRAPHS = frozenset({6, 11})
_MAX_GRAPH_DEPTH = 8
_BLOCK_KEY = 16  # bytes of sha256 kept per indexed block (every hit is compared anyway)
_FIRST_STEP, _MAX_STEP = 64, 1 << 20


@dataclass(frozen=True)
class DeltaOptions:
    """How hard :func:`build_delta` looks for matches, and when a delta is worth sending.

    Attributes:
        block_size: bytes per aligned block matched in any payload file (rule 3).
        min_tensor_bytes: ONNX tensors smaller than this are not looked up on their own
            (they are still copied when a neighbouring match grows over them).
        min_copy_bytes: a COPY shorter than this is sent as literal bytes instead (a COPY
            costs up to about 20 bytes in the delta).
        min_zero_run: runs of zero bytes at least this long become a ZERO operation.
        max_ratio: no delta when it would be larger than this fraction of the full file.
        limits: the bounds devices apply (:class:`~edge_sdk.bundle.delta.DeltaLimits`);
            a delta beyond them is not built.
        bundle_limits: the bounds both bundle files are read with.

    Raises:
        ConfigError: a value out of range.
    """

    block_size: int = 4096
    min_tensor_bytes: int = 64
    min_copy_bytes: int = 24
    min_zero_run: int = 24
    max_ratio: float = 0.9
    limits: DeltaLimits = field(default_factory=DeltaLimits)
    bundle_limits: BundleLimits = field(default_factory=BundleLimits)

    def __post_init__(self) -> None:
        for name in ("block_size", "min_tensor_bytes", "min_copy_bytes", "min_zero_run"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"DeltaOptions.{name} must be a positive integer, got {value!r}", key=name)
        if not 0.0 < self.max_ratio <= 1.0:
            raise ConfigError(f"DeltaOptions.max_ratio must be in (0, 1], got {self.max_ratio!r}", key="max_ratio")


@dataclass(frozen=True)
class DeltaStats:
    """What a delta holds, for reports and benchmarks.

    Attributes:
        base_version, target_version: the versions the delta goes between.
        full_bytes: size of the new bundle file (what a full transfer sends).
        delta_bytes: size of the delta file.
        copied_bytes: bytes of the new file that COPY operations take from the base slot.
        literal_bytes: bytes of the new file carried literally (DATA).
        zero_bytes: bytes of the new file written as zeros (ZERO).
        ops: operations in the delta.
        files_copied_whole: payload files equal to a whole base file.
        tensors_copied: ONNX tensors found by their bytes in a base model (rule 2).
        changed_tensor_bytes: bytes of the new bundle's ONNX tensor data that no base
            tensor holds (what a fine-tune changed); ``None`` when the new bundle has
            no ONNX model.
    """

    base_version: int
    target_version: int
    full_bytes: int
    delta_bytes: int
    copied_bytes: int
    literal_bytes: int
    zero_bytes: int
    ops: int
    files_copied_whole: int
    tensors_copied: int
    changed_tensor_bytes: int | None

    @property
    def ratio(self) -> float:
        """Delta size over full size."""
        return self.delta_bytes / self.full_bytes

    @property
    def framing_bytes(self) -> int:
        """Delta bytes beyond the changed tensors' bytes (headers, manifest, signatures, operations)."""
        return self.delta_bytes - (self.changed_tensor_bytes or 0)


@dataclass(frozen=True)
class TensorData:
    """Where one tensor's element bytes lie in a serialized ONNX model.

    Attributes:
        name: the tensor's name (``""`` when it has none).
        offset: offset of the first data byte in the model file.
        length: bytes of data (the ``raw_data`` field's payload, or a packed typed field's).
    """

    name: str
    offset: int
    length: int


def _tensor(view: memoryview, base: int, out: list[TensorData]) -> None:
    name = ""
    found: list[tuple[int, int]] = []
    for f in fields(view):
        if f.payload is None:
            continue
        if f.number == _TENSOR_NAME:
            name = bytes(f.payload).decode("utf-8", "replace")
        elif f.number in _TENSOR_DATA and len(f.payload):
            found.append((base + f.end - len(f.payload), len(f.payload)))
    out.extend(TensorData(name, offset, length) for offset, length in found)


def _graph(view: memoryview, base: int, out: list[TensorData], depth: int) -> None:
    if depth > _MAX_GRAPH_DEPTH:
        return
    for f in fields(view):
        if f.payload is None:
            continue
        start = base + f.end - len(f.payload)
        if f.number == GRAPH_INITIALIZER:
            _tensor(f.payload, start, out)
        elif f.number == _GRAPH_SPARSE_INITIALIZER:
            for part in fields(f.payload):
                if part.number in _SPARSE_PARTS and part.payload is not None:
                    _tensor(part.payload, start + part.end - len(part.payload), out)
        elif f.number == GRAPH_NODE:
            for attr in fields(f.payload):
                if attr.number != _NODE_ATTRIBUTE or attr.payload is None:
                    continue
                attr_start = start + attr.end - len(attr.payload)
                for value in fields(attr.payload):
                    if value.payload is None:
                        continue
                    value_start = attr_start + value.end - len(value.payload)
                    if value.number in _ATTR_TENSORS:
                        _tensor(value.payload, value_start, out)
                    elif value.number in _ATTR_GRAPHS:
                        _graph(value.payload, value_start, out, depth + 1)


def tensor_data_spans(model: bytes | memoryview) -> list[TensorData]:
    """Every tensor's data bytes in a serialized ONNX ``ModelProto``, by position in the file.

    Covers the graph's initializers and sparse initializers and tensor-valued node
    attributes (``Constant``), in subgraphs too, read from the protobuf wire format
    without decoding anything else.

    Args:
        model: the model file's bytes.

    Returns:
        One entry per non-empty data field, in file order.

    Raises:
        WireError: the bytes are not a protobuf message.
    """
    view = memoryview(model)
    out: list[TensorData] = []
    for f in fields(view):
        if f.number == MODEL_GRAPH and f.payload is not None:
            _graph(f.payload, f.end - len(f.payload), out, 0)
    return out


# --- reading both bundles ----------------------------------------------------------------


class _MappedBundle:
    """A bundle file checked by :class:`BundleReader` and mapped read-only into memory."""

    def __init__(self, path: Path, limits: BundleLimits) -> None:
        self.path = Path(path)
        with contextlib.ExitStack() as opened:
            self.reader = opened.enter_context(BundleReader(self.path, limits))
            self.manifest = Manifest.from_bytes(
                self.reader.manifest_bytes, limits.max_manifest_bytes, limits.max_manifest_depth
            )
            declared, present = {f.path for f in self.manifest.files}, set(self.reader.payload)
            if declared != present:
                raise FileSetMismatchError(
                    f"{self.path.name}: payload files differ from the manifest's "
                    f"({', '.join(sorted(declared ^ present))})"
                )
            try:
                with open(self.path, "rb") as fh:
                    self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise StorageError(f"cannot map {self.path}: {exc}", path=str(self.path)) from exc
            self.view = memoryview(self._map)
            opened.pop_all()

    def member(self, rel: str) -> memoryview:
        offset, size = self.reader.member_span(rel)
        return self.view[offset : offset + size]

    def checked_members(self) -> dict[str, memoryview]:
        """Every payload file, each checked against the manifest's sha256 and size.

        Raises:
            HashMismatchError: a file differs from what the manifest declares.
        """
        members = {}
        for entry in self.manifest.files:
            data = self.member(entry.path)
            if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
                raise HashMismatchError(
                    f"{self.path.name}: file {entry.path!r} does not match its manifest", path=entry.path
                )
            members[entry.path] = data
        return members

    def close(self) -> None:
        self.reader.close()
        # Views handed out (and still referenced, say by a traceback) keep the map
        # alive; the garbage collector closes it then.
        with contextlib.suppress(BufferError):
            self.view.release()
            self._map.close()

    def __enter__(self) -> _MappedBundle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _is_onnx(path: str) -> bool:
    return path.lower().endswith(".onnx")


def _spans(path: str, data: memoryview) -> list[TensorData]:
    if not _is_onnx(path):
        return []
    try:
        return tensor_data_spans(data)
    except WireError:
        logger.info("%s does not parse as an ONNX model; matched by blocks only", path)
        return []


# --- matching ----------------------------------------------------------------------------


@dataclass
class _Copy:
    """``length`` bytes at ``start`` of a new payload file equal those at ``offset`` of base file ``path``."""

    start: int
    length: int
    path: str
    offset: int

    @property
    def end(self) -> int:
        return self.start + self.length


def _common_prefix(a: memoryview, b: memoryview) -> int:
    """How many leading bytes ``a`` and ``b`` share (compared in growing chunks)."""
    n = min(len(a), len(b))
    pos, step = 0, _FIRST_STEP
    while pos < n:
        end = min(n, pos + step)
        if a[pos:end] != b[pos:end]:
            import numpy as np  # here: a deploy imports this module, and most deploys build no delta

            diff = np.frombuffer(a[pos:end], np.uint8) != np.frombuffer(b[pos:end], np.uint8)
            return pos + int(np.argmax(diff))
        pos, step = end, min(step * 4, _MAX_STEP)
    return n


def _common_suffix(a: memoryview, b: memoryview) -> int:
    """How many trailing bytes ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    la, lb = len(a), len(b)
    done, step = 0, _FIRST_STEP
    while done < n:
        size = min(n - done, step)
        ca, cb = a[la - done - size : la - done], b[lb - done - size : lb - done]
        if ca != cb:
            import numpy as np

            diff = (np.frombuffer(ca, np.uint8) != np.frombuffer(cb, np.uint8))[::-1]
            return done + int(np.argmax(diff))
        done, step = done + size, min(step * 4, _MAX_STEP)
    return n


@dataclass
class _Index:
    """What the base offers: its files, their hashes, tensor data and aligned blocks."""

    files: dict[str, memoryview]
    by_sha: dict[str, str]
    tensors: dict[bytes, tuple[str, int, int]]
    blocks: dict[bytes, tuple[str, int]]
    block_size: int

    @classmethod
    def build(cls, base: _MappedBundle, files: dict[str, memoryview], block_size: int) -> _Index:
        by_sha = {f.sha256: f.path for f in base.manifest.files if f.size}
        tensors: dict[bytes, tuple[str, int, int]] = {}
        blocks: dict[bytes, tuple[str, int]] = {}
        for path, data in files.items():
            for span in _spans(path, data):
                key = hashlib.sha256(data[span.offset : span.offset + span.length]).digest()
                tensors.setdefault(key, (path, span.offset, span.length))
            for offset in range(0, len(data) - block_size + 1, block_size):
                key = hashlib.sha256(data[offset : offset + block_size]).digest()[:_BLOCK_KEY]
                blocks.setdefault(key, (path, offset))
        return cls(files, by_sha, tensors, blocks, block_size)


@dataclass
class _Tally:
    files_whole: int = 0
    tensors_copied: int = 0
    changed_tensor_bytes: int | None = None


def _tensor_anchors(path: str, data: memoryview, index: _Index, options: DeltaOptions, tally: _Tally) -> list[_Copy]:
    spans = _spans(path, data)
    if _is_onnx(path) and spans:
        tally.changed_tensor_bytes = tally.changed_tensor_bytes or 0
    anchors = []
    for span in spans:
        piece = data[span.offset : span.offset + span.length]
        hit = index.tensors.get(hashlib.sha256(piece).digest())
        if hit is None:
            tally.changed_tensor_bytes = (tally.changed_tensor_bytes or 0) + span.length
            continue
        base_path, base_offset, length = hit
        same = length == span.length and index.files[base_path][base_offset : base_offset + length] == piece
        if same and span.length >= options.min_tensor_bytes:
            anchors.append(_Copy(span.offset, span.length, base_path, base_offset))
            tally.tensors_copied += 1
    return anchors


def _block_anchors(data: memoryview, index: _Index, anchors: list[_Copy]) -> list[_Copy]:
    import numpy as np

    size = index.block_size
    count = len(data) // size
    covered = np.zeros(count, dtype=bool)
    for a in anchors:  # blocks wholly inside a match found already need no lookup
        first, last = -(-a.start // size), a.end // size
        if first < last:
            covered[first:last] = True
    found = []
    for k in np.flatnonzero(~covered).tolist():
        piece = data[k * size : (k + 1) * size]
        hit = index.blocks.get(hashlib.sha256(piece).digest()[:_BLOCK_KEY])
        if hit is not None and index.files[hit[0]][hit[1] : hit[1] + size] == piece:
            found.append(_Copy(k * size, size, hit[0], hit[1]))
    return found


def _same_path_anchors(path: str, data: memoryview, index: _Index) -> list[_Copy]:
    base = index.files.get(path)
    if base is None:
        return []
    anchors = []
    prefix = _common_prefix(data, base)
    if prefix:
        anchors.append(_Copy(0, prefix, path, 0))
    suffix = _common_suffix(data, base)
    if suffix and suffix < len(data):
        anchors.append(_Copy(len(data) - suffix, suffix, path, len(base) - suffix))
    return anchors


def _select(anchors: list[_Copy]) -> list[_Copy]:
    """Non-overlapping matches in file order: earliest first, the longest among equals; overlaps trimmed."""
    chosen: list[_Copy] = []
    cursor = 0
    for a in sorted(anchors, key=lambda c: (c.start, -c.length)):
        if a.end <= cursor:
            continue
        cut = max(0, cursor - a.start)
        chosen.append(_Copy(a.start + cut, a.length - cut, a.path, a.offset + cut))
        cursor = a.end
    return chosen


def _grow(chosen: list[_Copy], data: memoryview, index: _Index) -> None:
    """Grow each match into the unmatched bytes on either side, where the base continues the same."""
    for i in range(len(chosen) + 1):
        left = chosen[i - 1] if i else None
        right = chosen[i] if i < len(chosen) else None
        lo = left.end if left else 0
        hi = right.start if right else len(data)
        if left is not None and lo < hi:
            base = index.files[left.path]
            grown = _common_prefix(data[lo:hi], base[left.offset + left.length :])
            left.length += grown
            lo += grown
        if right is not None and lo < hi:
            base = index.files[right.path]
            grown = _common_suffix(data[lo:hi], base[: right.offset])
            right.start -= grown
            right.offset -= grown
            right.length += grown


def _merge(chosen: list[_Copy], min_copy: int) -> list[_Copy]:
    """Join matches that continue each other in both files; drop those too short to pay off."""
    merged: list[_Copy] = []
    for c in chosen:
        last = merged[-1] if merged else None
        if last is not None and last.path == c.path and last.end == c.start and last.offset + last.length == c.offset:
            last.length += c.length
        elif c.length:
            merged.append(c)
    return [c for c in merged if c.length >= min_copy]


def _match_file(
    path: str, data: memoryview, sha256: str, index: _Index, options: DeltaOptions, tally: _Tally
) -> list[_Copy]:
    """The COPY ranges of one new payload file, in order, non-overlapping."""
    if not len(data):
        return []
    whole = index.by_sha.get(sha256)
    if whole is not None:
        tally.files_whole += 1
        _tensor_anchors(path, data, index, options, tally)  # its tensors count as unchanged
        return [_Copy(0, len(data), whole, 0)]
    anchors = _tensor_anchors(path, data, index, options, tally)
    anchors += _same_path_anchors(path, data, index)
    anchors += _block_anchors(data, index, anchors)
    chosen = _select(anchors)
    _grow(chosen, data, index)
    return _merge(chosen, options.min_copy_bytes)


# --- writing the operations --------------------------------------------------------------


class _Plan:
    """Operations that write the new file in order; literal runs split around zero runs."""

    def __init__(self, view: memoryview, min_zero_run: int) -> None:
        self.view = view
        self.ops: list[DeltaOp] = []
        self.files: list[str] = []
        self._file_index: dict[str, int] = {}
        self._zero_run = re.compile(rb"\x00{%d,}" % min_zero_run)
        self._literal_from = 0
        self.pos = 0

    def skip_to(self, end: int) -> None:
        """Bytes up to ``end`` are literal."""
        self.pos = end

    def copy(self, path: str, offset: int, length: int) -> None:
        self._flush()
        index = self._file_index.setdefault(path, len(self.files))
        if index == len(self.files):
            self.files.append(path)
        last = self.ops[-1] if self.ops else None
        if isinstance(last, CopyOp) and last.file == index and last.offset + last.length == offset:
            self.ops[-1] = CopyOp(index, last.offset, last.length + length)
        else:
            self.ops.append(CopyOp(index, offset, length))
        self.pos += length
        self._literal_from = self.pos

    def finish(self) -> list[DeltaOp]:
        self.pos = len(self.view)
        self._flush()
        return self.ops

    def _flush(self) -> None:
        start, end = self._literal_from, self.pos
        if start >= end:
            return
        pos = start
        for run in self._zero_run.finditer(self.view[start:end]):
            if run.start() + start > pos:
                self.ops.append(DataOp(self.view[pos : start + run.start()]))
            self.ops.append(ZeroOp(run.end() - run.start()))
            pos = start + run.end()
        if pos < end:
            self.ops.append(DataOp(self.view[pos:end]))
        self._literal_from = end


def _plan(view: memoryview, copies: list[tuple[int, _Copy]], options: DeltaOptions) -> _Plan:
    """The operations; zero runs are split off the literal bytes, and less eagerly if that
    would take more operations than devices accept (data with many short zero runs)."""
    zero_run = options.min_zero_run
    for _attempt in range(4):
        plan = _Plan(view, zero_run)
        for start, c in copies:
            plan.skip_to(start + c.start)
            plan.copy(c.path, c.offset, c.length)
        plan.finish()
        if len(plan.ops) <= options.limits.max_ops:
            break
        zero_run *= 16
    return plan


def _replay_sha256(ops: list[DeltaOp], files: list[str], index: _Index) -> str:
    digest = hashlib.sha256()
    for op in ops:
        if isinstance(op, CopyOp):
            digest.update(index.files[files[op.file]][op.offset : op.offset + op.length])
        elif isinstance(op, DataOp):
            digest.update(op.data)
        else:
            digest.update(bytes(op.length))
    return digest.hexdigest()


def _build(base: _MappedBundle, new: _MappedBundle, out_path: Path, options: DeltaOptions) -> DeltaStats | None:
    bm, nm = base.manifest, new.manifest
    if bm.name != nm.name:
        logger.info("no delta: the bundles are %s and %s", bm.name, nm.name)
        return None
    if bm.encryption is not None or nm.encryption is not None:
        logger.info("no delta: %s v%d or v%d is encrypted", nm.name, bm.version, nm.version)
        return None
    index = _Index.build(base, base.checked_members(), options.block_size)
    new_files = new.checked_members()
    tally = _Tally()
    copies: list[tuple[int, _Copy]] = []  # (where the file starts in the new bundle, a match in it)
    for entry in sorted(new.manifest.files, key=lambda f: new.reader.member_span(f.path)[0]):
        start, _size = new.reader.member_span(entry.path)
        matches = _match_file(entry.path, new_files[entry.path], entry.sha256, index, options, tally)
        copies.extend((start, c) for c in matches)
    plan = _plan(new.view, copies, options)
    ops = plan.ops
    target_sha256 = hashlib.sha256(new.view).hexdigest()
    header = DeltaHeader(
        base_name=bm.name,
        base_version=bm.version,
        base_content=content_digest(bm.files),
        target_sha256=target_sha256,
        target_size=len(new.view),
        target_name=nm.name,
        target_version=nm.version,
        files=tuple(plan.files),
        ops=len(ops),
    )
    delta_bytes = len(encode_header(header)) + sum(op.encoded_size for op in ops)
    full = len(new.view)
    if delta_bytes > options.max_ratio * full or len(ops) > options.limits.max_ops:
        logger.info(
            "no delta for %s v%d -> v%d: %d bytes in %d operations, the full file is %d bytes",
            nm.name,
            bm.version,
            nm.version,
            delta_bytes,
            len(ops),
            full,
        )
        return None
    if _replay_sha256(ops, plan.files, index) != target_sha256:
        logger.error(
            "delta for %s v%d -> v%d does not replay; sending the full bundle", nm.name, bm.version, nm.version
        )
        return None
    written = write_delta(out_path, header, ops, options.limits)
    stats = DeltaStats(
        base_version=bm.version,
        target_version=nm.version,
        full_bytes=full,
        delta_bytes=written,
        copied_bytes=sum(op.length for op in ops if isinstance(op, CopyOp)),
        literal_bytes=sum(op.length for op in ops if isinstance(op, DataOp)),
        zero_bytes=sum(op.length for op in ops if isinstance(op, ZeroOp)),
        ops=len(ops),
        files_copied_whole=tally.files_whole,
        tensors_copied=tally.tensors_copied,
        changed_tensor_bytes=tally.changed_tensor_bytes,
    )
    logger.info(
        "delta %s v%d -> v%d: %d of %d bytes (%.1f%%), %d copied, %d literal, %d operations",
        nm.name,
        bm.version,
        nm.version,
        stats.delta_bytes,
        full,
        100 * stats.ratio,
        stats.copied_bytes,
        stats.literal_bytes,
        stats.ops,
    )
    return stats


def build_delta(
    base_bundle: Path, new_bundle: Path, out_path: Path, options: DeltaOptions | None = None
) -> DeltaStats | None:
    """Write the delta that rebuilds ``new_bundle`` on a device that runs ``base_bundle``.

    Neither bundle's signatures are checked here (the device checks the rebuilt file);
    both are read as hostile archives, and every payload file must match its manifest.

    Args:
        base_bundle: the bundle file of the version the device runs.
        new_bundle: the bundle file of the version to send.
        out_path: where the delta file appears (atomically), if one is built.
        options: matching and size thresholds.

    Returns:
        What the delta holds, or ``None`` when no delta is worth sending: different
        bundle names, an encrypted bundle, or a delta not smaller than
        ``options.max_ratio`` of the full file (nothing is written then).

    Raises:
        BundleFormatError, ManifestError: a bundle file is not a well-formed bundle.
        FileSetMismatchError, HashMismatchError: its payload differs from its manifest.
        StorageError: a file cannot be read or the delta written.
    """
    options = options or DeltaOptions()
    with (
        _MappedBundle(Path(base_bundle), options.bundle_limits) as base,
        _MappedBundle(Path(new_bundle), options.bundle_limits) as new,
    ):
        return _build(base, new, Path(out_path), options)
