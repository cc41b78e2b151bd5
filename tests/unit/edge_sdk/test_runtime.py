"""edge_sdk.runtime against the real onnxruntime and LiteRT, with models built here."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edge_sdk.runtime as rt
from edge_sdk.errors import (
    ConfigError,
    ModelError,
    ModelLoadError,
    RuntimeUnavailableError,
)
from edge_sdk.runtime import SessionOptions, TensorSpec, open_session, sample_feeds
from edge_sdk.runtime._onnx import onnx_op_types, resolve_providers
from tests.tflite_models import (
    QuantParams,
    add_model,
    fully_connected_model,
    quantized_add_model,
)

OPSET = 17


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def gemm_relu_model(weights: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """y = relu(x @ weights + bias), batch dimension dynamic."""
    features, units = weights.shape
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W", "B"], ["h"]),
            helper.make_node("Relu", ["h"], ["y"]),
        ],
        "gemm_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", units])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def qdq_model() -> onnx.ModelProto:
    """A float-in, float-out graph with a QuantizeLinear/DequantizeLinear pair."""
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[
            numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s"),
            numpy_helper.from_array(np.array(0, dtype=np.int8), "z"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


@pytest.fixture
def weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(5).astype(np.float32)


@pytest.fixture
def gemm_path(tmp_path: Path, weights: tuple[np.ndarray, np.ndarray]) -> Path:
    return _save(gemm_relu_model(*weights), tmp_path / "gemm.onnx")


# --- facade ------------------------------------------------------------------------------


def test_public_names_are_exactly_the_intended_ones() -> None:
    assert sorted(rt.__all__) == sorted(
        [
            "PRECISIONS",
            "RUNTIMES",
            "InferenceSession",
            "SessionOptions",
            "StandInSession",
            "TensorSpec",
            "available_runtimes",
            "open_session",
            "open_sparse_session",
            "preload",
            "sample_feeds",
        ]
    )


def test_import_does_not_load_any_runtime() -> None:
    code = (
        "import sys, edge_sdk.runtime, edge_sdk.metrics\n"
        "heavy = [m for m in ('onnxruntime', 'ai_edge_litert', 'tflite_runtime', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_available_runtimes_lists_installed_versions() -> None:
    found = rt.available_runtimes()
    assert found["onnxruntime"]
    assert found["litert"]
    assert set(found) <= set(rt.RUNTIMES)


def test_unknown_runtime_is_a_config_error(gemm_path: Path) -> None:
    with pytest.raises(ConfigError, match="tensorflow"):
        open_session(gemm_path, "tensorflow")


def test_unknown_precision_hint_is_a_config_error(gemm_path: Path) -> None:
    with pytest.raises(ConfigError, match="int3"):
        open_session(gemm_path, "onnxruntime", precision_hint="int3")


@pytest.mark.parametrize("threads", [0, -1, True, 1.5])
def test_session_options_reject_bad_threads(threads: object) -> None:
    with pytest.raises(ConfigError):
        SessionOptions(threads=threads)  # type: ignore[arg-type]


def test_sample_feeds_match_specs() -> None:
    specs = [
        TensorSpec("x", (None, 3), "float32"),
        TensorSpec("ids", (2, None), "int64"),
        TensorSpec("q", (4,), "int8"),
        TensorSpec("m", (2,), "bool"),
    ]
    feeds = sample_feeds(specs, np.random.default_rng(1))
    assert feeds["x"].shape == (1, 3) and feeds["x"].dtype == np.float32
    assert feeds["ids"].shape == (2, 1) and feeds["ids"].dtype == np.int64
    assert feeds["ids"].min() >= 0
    assert feeds["q"].dtype == np.int8
    assert feeds["m"].dtype == np.bool_
    again = sample_feeds(specs, np.random.default_rng(1))
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)


def test_sample_feeds_rejects_unknown_dtype() -> None:
    with pytest.raises(ConfigError, match="nosuchtype"):
        sample_feeds([TensorSpec("x", (1,), "nosuchtype")], np.random.default_rng(0))


# --- onnxruntime -------------------------------------------------------------------------


def test_onnx_gemm_relu_matches_numpy(gemm_path: Path, weights: tuple[np.ndarray, np.ndarray]) -> None:
    w, b = weights
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    with open_session(gemm_path, "onnxruntime", SessionOptions(threads=2)) as session:
        assert isinstance(session, rt.InferenceSession)
        assert session.runtime == "onnxruntime"
        assert session.threads == 2
        assert session.providers[-1] == "CPUExecutionProvider"
        assert session.precision == "fp32"
        assert session.inputs() == [TensorSpec("x", (None, 3), "float32")]
        assert session.outputs() == [TensorSpec("y", (None, 5), "float32")]
        (y,) = session.run({"x": x})
    np.testing.assert_allclose(y, np.maximum(x @ w + b, 0), rtol=1e-5, atol=1e-6)


def test_onnx_session_runs_sample_feeds(gemm_path: Path) -> None:
    with open_session(gemm_path, "onnxruntime") as session:
        (y,) = session.run(sample_feeds(session.inputs(), np.random.default_rng(0)))
    assert y.shape == (1, 5)


def test_onnx_closed_session_and_bad_feeds_are_model_errors(gemm_path: Path) -> None:
    session = open_session(gemm_path, "onnxruntime")
    with pytest.raises(ModelError, match="missing"):
        session.run({"nope": np.zeros((1, 3), np.float32)})
    with pytest.raises(ModelError, match=r"gemm\.onnx"):
        session.run({"x": np.zeros((1, 7), np.float32)})  # wrong width
    session.close()
    with pytest.raises(ModelError, match="closed"):
        session.run({"x": np.zeros((1, 3), np.float32)})


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: b"\x00garbage, not a model" * 20, lambda b: b""],
    ids=["truncated", "garbage", "empty"],
)
def test_onnx_refused_model_is_model_load_error_naming_file(gemm_path: Path, damage) -> None:
    bad = gemm_path.with_name("broken-model.onnx")
    bad.write_bytes(damage(gemm_path.read_bytes()))
    with pytest.raises(ModelLoadError, match=r"broken-model\.onnx") as info:
        open_session(bad, "onnxruntime")
    assert info.value.__cause__ is not None
    assert info.value.details["model"] == str(bad)


def test_missing_model_file_is_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"absent\.onnx"):
        open_session(tmp_path / "absent.onnx", "onnxruntime")


def test_onnx_in_memory_model_runs_like_the_file(gemm_path: Path, weights: tuple[np.ndarray, np.ndarray]) -> None:
    w, b = weights
    x = np.random.default_rng(4).standard_normal((3, 3)).astype(np.float32)
    with open_session(gemm_path.read_bytes(), "onnxruntime") as session:
        assert session.runtime == "onnxruntime"
        assert session.precision == "fp32"
        assert session.inputs() == [TensorSpec("x", (None, 3), "float32")]
        assert "<in-memory model>" in repr(session)
        (y,) = session.run({"x": x})
        with pytest.raises(ModelError, match="<in-memory model>") as info:
            session.run({"x": np.zeros((1, 7), np.float32)})  # wrong width
        assert info.value.details["model"] == "<in-memory model>"
    np.testing.assert_allclose(y, np.maximum(x @ w + b, 0), rtol=1e-5, atol=1e-6)


def test_onnx_in_memory_model_precision_comes_from_its_ops() -> None:
    data = bytearray(qdq_model().SerializeToString())  # any bytes-like
    with open_session(data, "onnxruntime") as session:
        assert session.precision == "int8"


@pytest.mark.parametrize(
    "data",
    [b"\x00garbage, not a model" * 20, b"\x08\x07garbage", b""],
    ids=["garbage", "short-garbage", "empty"],
)
def test_onnx_refused_in_memory_model_is_model_load_error(data: bytes) -> None:
    with pytest.raises(ModelLoadError, match="<in-memory model>") as info:
        open_session(data, "onnxruntime")
    assert info.value.details["model"] == "<in-memory model>"


def test_model_neither_path_nor_bytes_is_config_error() -> None:
    with pytest.raises(ConfigError, match="path or bytes"):
        open_session(12, "onnxruntime")  # type: ignore[arg-type]


def test_unknown_provider_is_config_error_listing_available(gemm_path: Path) -> None:
    with pytest.raises(ConfigError, match="NoSuchExecutionProvider") as info:
        open_session(gemm_path, "onnxruntime", SessionOptions(providers=("NoSuchExecutionProvider",)))
    assert "CPUExecutionProvider" in str(info.value)


def test_resolve_providers_prefers_accelerators_and_keeps_cpu_last() -> None:
    available = ["CPUExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider", "TensorrtExecutionProvider"]
    assert resolve_providers(None, available) == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    assert resolve_providers(None, ["AzureExecutionProvider", "CPUExecutionProvider"]) == ("CPUExecutionProvider",)
    assert resolve_providers(("CPUExecutionProvider", "CUDAExecutionProvider"), available) == (
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    with pytest.raises(ConfigError, match="ROCMExecutionProvider"):
        resolve_providers(("ROCMExecutionProvider",), available)


def test_onnx_precision_from_qdq_ops_and_from_hint(tmp_path: Path, gemm_path: Path) -> None:
    path = _save(qdq_model(), tmp_path / "qdq.onnx")
    with open_session(path, "onnxruntime") as session:
        assert session.precision == "int8"
        (y,) = session.run({"x": np.array([[0.12, -0.3, 1.0, 20.0]], np.float32)})
    np.testing.assert_allclose(y, [[0.1, -0.3, 1.0, 12.7]], rtol=1e-6)
    with open_session(gemm_path, "onnxruntime", precision_hint="fp16") as session:
        assert session.precision == "fp16"


def test_onnx_op_types_agrees_with_onnx_including_subgraphs(weights) -> None:
    model = gemm_relu_model(*weights)
    assert onnx_op_types(model.SerializeToString()) == {"Gemm", "Relu"}
    branch = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])],
        "then",
        [],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [1])],
    )
    node = helper.make_node("If", ["cond"], ["c"], then_branch=branch, else_branch=branch)
    outer = helper.make_graph([node], "outer", [], [])
    assert onnx_op_types(helper.make_model(outer).SerializeToString()) == {"If", "MatMulInteger"}
    assert onnx_op_types(b"\xff\xff\xff") is None


# --- LiteRT ------------------------------------------------------------------------------


def test_litert_fully_connected_matches_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3)).astype(np.float32)  # [units, features]
    b = rng.standard_normal(4).astype(np.float32)
    path = tmp_path / "fc.tflite"
    path.write_bytes(fully_connected_model(w, b, batch=2))
    x = rng.standard_normal((2, 3)).astype(np.float32)
    with open_session(path, "litert", SessionOptions(threads=2)) as session:
        assert session.runtime == "litert"
        assert session.providers == ("cpu",)
        assert session.threads == 2
        assert session.precision == "fp32"
        assert session.inputs() == [TensorSpec("x", (2, 3), "float32")]
        assert session.outputs() == [TensorSpec("y", (2, 4), "float32")]
        (y,) = session.run({"x": x})
    np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-5, atol=1e-5)


def test_litert_add_matches_numpy(tmp_path: Path) -> None:
    path = tmp_path / "add.tflite"
    path.write_bytes(add_model((1, 4)))
    a = np.arange(4, dtype=np.float32).reshape(1, 4)
    with open_session(path, "litert") as session:
        (y,) = session.run({"a": a, "b": a * 10})
    np.testing.assert_allclose(y, a * 11)


def test_litert_quantizes_float_feeds_and_dequantizes_outputs(tmp_path: Path) -> None:
    qa, qb, qout = QuantParams(0.05, 0), QuantParams(0.05, 3), QuantParams(0.1, -2)
    path = tmp_path / "qadd.tflite"
    path.write_bytes(quantized_add_model((1, 4), qa, qb, qout))
    a = np.array([[0.05, 0.1, 0.15, -0.2]], np.float32)
    b = np.array([[0.5, 1.0, 1.5, 2.0]], np.float32)
    with open_session(path, "litert") as session:
        assert session.precision == "int8"
        assert [s.dtype for s in session.inputs()] == ["int8", "int8"]
        (y_float,) = session.run({"a": a, "b": b})
        (y_raw,) = session.run({"a": qa.quantize(a), "b": qb.quantize(b)})
    assert y_float.dtype == np.float32
    assert y_raw.dtype == np.int8
    np.testing.assert_allclose(y_float, a + b, atol=0.1)
    np.testing.assert_array_equal(y_float, qout.dequantize(y_raw))


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: b"not a flatbuffer" * 10, lambda b: b""],
    ids=["truncated", "garbage", "empty"],
)
def test_litert_refused_model_is_model_load_error_naming_file(tmp_path: Path, damage) -> None:
    path = tmp_path / "broken-model.tflite"
    path.write_bytes(damage(add_model()))
    with pytest.raises(ModelLoadError, match=r"broken-model\.tflite") as info:
        open_session(path, "litert")
    assert info.value.__cause__ is not None


def test_litert_in_memory_model_runs_and_refusals_name_it() -> None:
    a = np.arange(4, dtype=np.float32).reshape(1, 4)
    with open_session(add_model((1, 4)), "litert") as session:
        assert "<in-memory model>" in repr(session)
        (y,) = session.run({"a": a, "b": a * 10})
    np.testing.assert_allclose(y, a * 11)
    for data in (b"not a flatbuffer" * 10, b""):
        with pytest.raises(ModelLoadError, match="<in-memory model>"):
            open_session(data, "litert")


def test_litert_rejects_accelerator_providers(tmp_path: Path) -> None:
    path = tmp_path / "add.tflite"
    path.write_bytes(add_model())
    with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
        open_session(path, "litert", SessionOptions(providers=("CUDAExecutionProvider",)))


def test_litert_falls_back_to_tflite_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ai_edge_litert.interpreter import Interpreter

    fake_pkg = types.ModuleType("tflite_runtime")
    fake_interp = types.ModuleType("tflite_runtime.interpreter")
    fake_interp.Interpreter = Interpreter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", fake_pkg)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake_interp)
    path = tmp_path / "add.tflite"
    path.write_bytes(add_model())
    with open_session(path, "litert") as session:
        assert session.runtime == "tflite-runtime"
        (y,) = session.run({"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.float32)})
    np.testing.assert_allclose(y, 2.0)


def test_missing_runtime_packages_are_runtime_unavailable(
    tmp_path: Path, gemm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "add.tflite"
    path.write_bytes(add_model())
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RuntimeUnavailableError, match="pip install ai-edge-litert"):
        open_session(path, "litert")
    with pytest.raises(RuntimeUnavailableError, match="pip install onnxruntime"):
        open_session(gemm_path, "onnxruntime")


def test_litert_resizes_dynamic_batch(tmp_path: Path) -> None:
    path = tmp_path / "add.tflite"
    path.write_bytes(add_model((1, 4)))
    with open_session(path, "litert") as session:
        for batch in (3, 1, 5):
            a = np.full((batch, 4), 2.0, np.float32)
            (y,) = session.run({"a": a, "b": a})
            assert y.shape == (batch, 4)
            np.testing.assert_allclose(y, 4.0)


def test_preload_imports_the_backend_and_names_unknown_runtimes() -> None:
    rt.preload("onnxruntime")
    assert "onnxruntime" in sys.modules
    with pytest.raises(ConfigError, match="unknown runtime"):
        rt.preload("tensorflow")


def test_a_missing_litert_names_the_extra_the_readme_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text(encoding="utf-8")
    extra = "pip install 'edge-sdk[litert]'"
    assert extra in readme
    path = tmp_path / "add.tflite"
    path.write_bytes(add_model())
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    with pytest.raises(RuntimeUnavailableError) as opened:
        open_session(path, "litert")
    assert extra in opened.value.message and "tflite-runtime" in opened.value.message
    monkeypatch.setattr(rt.importlib.util, "find_spec", lambda name: None)  # neither package is installed
    with pytest.raises(RuntimeUnavailableError) as preloaded:
        rt.preload("litert")
    assert extra in preloaded.value.message and "tflite-runtime" in preloaded.value.message
