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


# --- nodes and graph rewrites --------------------------------------------------------

from edge_sdk.protowire import Node, graph_nodes, node_proto, parse_node, rewrite_model  # noqa: E402


def test_parse_node_reads_what_onnx_writes() -> None:
    node = helper.make_node(
        "Gemm",
        ["a", "", "c"],
        ["y"],
        name="fc",
        domain="ai.onnx",
        transB=1,
        transA=0,
        alpha=0.5,
        axis=-3,
        perm=[1, 0],
        mode="x",
    )
    got = parse_node(node.SerializeToString())
    assert (got.op_type, got.domain, got.name, got.inputs, got.outputs) == (
        "Gemm",
        "ai.onnx",
        "fc",
        ("a", "", "c"),
        ("y",),
    )
    assert got.attributes == {"transB": 1, "transA": 0, "alpha": 0.5, "axis": -3}  # lists and strings left out


def test_node_proto_is_a_node_onnx_reads_back() -> None:
    data = node_proto("DynamicQuantizeMatMul", ["x", "w", "s", ""], ["y"], name="n", domain="com.microsoft")
    node = onnx.NodeProto()
    node.ParseFromString(data)
    assert (node.op_type, node.domain, node.name, list(node.input), list(node.output)) == (
        "DynamicQuantizeMatMul",
        "com.microsoft",
        "n",
        ["x", "w", "s", ""],
        ["y"],
    )
    assert parse_node(data) == Node("DynamicQuantizeMatMul", "com.microsoft", "n", ("x", "w", "s", ""), ("y",))
    plain = onnx.NodeProto()
    plain.ParseFromString(node_proto("Relu", ["a"], ["b"]))
    assert (plain.name, plain.domain) == ("", "")


def _two_nodes() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="first"), helper.make_node("Neg", ["h"], ["y"], name="second")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])


def test_graph_nodes_lists_the_graph_in_order() -> None:
    assert [(n.op_type, n.name) for n in graph_nodes(_two_nodes().SerializeToString())] == [
        ("Relu", "first"),
        ("Neg", "second"),
    ]


def test_rewrite_model_replaces_nodes_in_place_and_imports_opsets_once() -> None:
    w = np.ones((3, 3), np.float32)
    data = rewrite_model(
        _two_nodes().SerializeToString(),
        nodes={0: [node_proto("MatMul", ["x", "w"], ["m"]), node_proto("Abs", ["m"], ["h"])]},
        initializers=[tensor_proto("w", 1, w.shape, w.tobytes())],
        opsets={"com.microsoft": 1, "": 99},
    )
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Abs", "Neg"]
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17), ("com.microsoft", 1)}
    again = rewrite_model(data, opsets={"com.microsoft": 1})
    assert len(onnx.load_from_string(again).opset_import) == 2


def test_rewrite_model_refuses_a_node_position_beyond_the_graph() -> None:
    with pytest.raises(WireError, match="beyond"):
        rewrite_model(_two_nodes().SerializeToString(), nodes={2: []})


def test_a_node_name_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(WireError, match="UTF-8"):
        parse_node(node_proto("Relu", ["x"], ["y"]).replace(b"Relu", b"R\xffel"))
