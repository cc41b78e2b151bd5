"""The protobuf wire-format helpers, checked against the real ``onnx`` protobuf classes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from edge_sdk.protowire import (
    MODEL_GRAPH,
    WireError,
    append_initializers,
    encode_varint,
    fields,
    read_varint,
    tensor_proto,
)


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_varint_round_trip(value: int) -> None:
    data = encode_varint(value)
    assert read_varint(data, 0) == (value, len(data))


def test_negative_int64_is_twos_complement_like_protobuf() -> None:
    tensor = onnx.TensorProto(dims=[-1])
    assert encode_varint(-1) in tensor.SerializeToString()


@pytest.mark.parametrize("data", [b"\x80", b"\xff" * 11])
def test_truncated_or_overlong_varint_is_refused(data: bytes) -> None:
    with pytest.raises(WireError):
        read_varint(data, 0)


def _model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, producer_name="test")


def test_fields_walk_a_real_model_and_find_its_graph() -> None:
    data = _model().SerializeToString()
    found = list(fields(data))
    assert found[-1].end == len(data)
    graph = [f for f in found if f.number == MODEL_GRAPH]
    assert len(graph) == 1
    parsed = onnx.GraphProto()
    parsed.ParseFromString(bytes(graph[0].payload))
    assert parsed.node[0].op_type == "MatMul"


def test_append_initializers_gives_a_model_onnx_reads_back() -> None:
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    data = append_initializers(_model().SerializeToString(), [tensor_proto("w", 1, w.shape, w.tobytes())])
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.initializer] == ["w"]
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), w)


@pytest.mark.parametrize("cut", [1, 7, -1])
def test_truncated_model_is_refused(cut: int) -> None:
    data = _model().SerializeToString()
    with pytest.raises(WireError):
        append_initializers(data[:cut], [])


def test_bytes_that_are_not_a_model_are_refused() -> None:
    with pytest.raises(WireError, match="graphs"):
        append_initializers(encode_varint(1 << 3) + encode_varint(5), [])
