"""ONNX <-> torch for the model families the training passes support.

Fine-tuning and distillation train in torch, but models travel as ONNX. Rather than
round-trip through ``torch.onnx.export`` (whose default exporter in torch 2.13 needs
``onnxscript``, and whose legacy one is deprecated), this module:

- runs an ONNX graph as a torch module (:func:`graph_module`): one parameter per float
  weight and bias initializer, the nodes interpreted in order with ``torch.nn.functional``;
- writes the trained values back into a copy of the same graph (:meth:`to_onnx`), so
  the structure, names and opset stay exactly as they were;
- builds ONNX from an ``nn.Sequential`` of common layers (:func:`module_to_onnx`) with
  ``onnx.helper``, for a student or a fine-tuned model the user made in torch.

Supported ops: ``Gemm``, ``MatMul``, ``Add``/``Sub``/``Mul``/``Div``, ``Relu``,
``LeakyRelu``, ``Sigmoid``, ``Tanh``, ``Softmax``, ``Conv`` (1-D/2-D), ``MaxPool``,
``AveragePool``, ``GlobalAveragePool``, ``Flatten``, ``Reshape``, ``BatchNormalization``
(inference form), ``Dropout``, ``Identity``. Anything else raises a
:class:`~edge_sdk.errors.CompressionError` naming the node.

torch is optional (``pip install 'edge-sdk[train]'``) and imported only when a function
here is called; :func:`require_torch` turns its absence into a clear error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.errors import CompressionError, RuntimeUnavailableError

from ..layers import node_attributes
from ..model_file import build_model

__all__ = ["SUPPORTED_OPS", "TRAIN_EXTRA_HINT", "graph_module", "module_to_onnx", "require_torch"]

logger = logging.getLogger(__name__)

TRAIN_EXTRA_HINT = "pip install 'edge-sdk[train]'"

SUPPORTED_OPS = frozenset(
    {
        "Gemm",
        "MatMul",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Softmax",
        "Conv",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Flatten",
        "Reshape",
        "BatchNormalization",
        "Dropout",
        "Identity",
    }
)
"""ONNX ops :func:`graph_module` can run and train."""

_TRAINABLE_SLOTS = {"Gemm": (1, 2), "MatMul": (1,), "Conv": (1, 2), "Add": (0, 1), "BatchNormalization": (1, 2)}
"""Which inputs of which ops are trained when they are float initializers."""


def require_torch(purpose: str) -> Any:
    """Import torch or explain how to get it.

    Args:
        purpose: what needs it, for the message (e.g. ``"fine-tuning"``).

    Returns:
        The ``torch`` module.

    Raises:
        RuntimeUnavailableError: torch is not installed; names the extra to install.
    """
    try:
        import torch
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"{purpose} needs torch, which is not installed: {TRAIN_EXTRA_HINT}", runtime="torch"
        ) from exc
    return torch


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def graph_module(model: onnx.ModelProto) -> Any:
    """A torch module that computes ``model``'s first output from its single input.

    Args:
        model: a float ONNX model of the supported ops (see :data:`SUPPORTED_OPS`).

    Returns:
        A ``torch.nn.Module`` with ``to_onnx()`` (the trained model as ONNX) and
        ``weight_names`` (parameter name -> initializer name).

    Raises:
        RuntimeUnavailableError: torch is not installed.
        CompressionError: an unsupported op or attribute (names the node), or a model
            without exactly one non-constant input.
    """
    torch = require_torch("training an ONNX model")
    return _graph_module_class(torch)(model)


_CLASS_CACHE: dict[str, type] = {}


def _graph_module_class(torch: Any) -> type:
    if "graph" in _CLASS_CACHE:
        return _CLASS_CACHE["graph"]
    nn = torch.nn
    functional = torch.nn.functional

    class GraphModule(nn.Module):  # type: ignore[name-defined,misc]  # torch is imported lazily: Any here
        """An ONNX graph run by torch; parameters are its float weights and biases."""

        def __init__(self, model: onnx.ModelProto) -> None:
            super().__init__()
            self._source = onnx.ModelProto()
            self._source.CopyFrom(model)
            graph = model.graph
            inits = {init.name: init for init in graph.initializer}
            for node in graph.node:
                _check_node(node)
            inputs = [i.name for i in graph.input if i.name not in inits]
            if len(inputs) != 1 or not graph.output:
                raise CompressionError(
                    f"training needs a model with one input and an output; this one has inputs {inputs}",
                    inputs=inputs,
                )
            self._input = inputs[0]
            self._output = graph.output[0].name
            trainable: set[str] = set()
            for node in graph.node:
                for slot in _TRAINABLE_SLOTS.get(node.op_type, ()):
                    if slot < len(node.input) and node.input[slot] in inits:
                        trainable.add(node.input[slot])
            self.params = nn.ParameterDict()
            self.weight_names: dict[str, str] = {}
            self._consts: dict[str, Any] = {}
            self._key: dict[str, str] = {}
            for name, init in inits.items():
                values = numpy_helper.to_array(init)
                if name in trainable and init.data_type == TensorProto.FLOAT:
                    key = _safe_key(name, self.weight_names)
                    self.params[key] = nn.Parameter(torch.from_numpy(np.array(values, dtype=np.float32)))
                    self.weight_names[key] = name
                    self._key[name] = key
                else:
                    self._consts[name] = torch.from_numpy(np.array(values))
            self._nodes = [
                (n.op_type, list(n.input), list(n.output), node_attributes(n), _label(n)) for n in graph.node
            ]

        def _value(self, env: dict[str, Any], name: str) -> Any:
            if not name:
                return None
            if name in env:
                return env[name]
            if name in self._key:
                return self.params[self._key[name]]
            return self._consts[name]

        def forward(self, x: Any) -> Any:
            env: dict[str, Any] = {self._input: x}
            for op, ins, outs, attrs, label in self._nodes:
                args = [self._value(env, n) for n in ins]
                env[outs[0]] = _run_op(torch, functional, op, args, attrs, label)
            return env[self._output]

        def to_onnx(self) -> onnx.ModelProto:
            """A copy of the source graph with the current parameter values."""
            model = onnx.ModelProto()
            model.CopyFrom(self._source)
            for index, init in enumerate(model.graph.initializer):
                key = self._key.get(init.name)
                if key is not None:
                    values = self.params[key].detach().cpu().numpy().astype(np.float32)
                    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(values, init.name))
            return model

    _CLASS_CACHE["graph"] = GraphModule
    return GraphModule


def _safe_key(name: str, taken: dict[str, str]) -> str:
    key = re.sub(r"\W", "_", name) or "p"
    while key in taken:
        key += "_"
    return key


def _check_node(node: onnx.NodeProto) -> None:
    label = _label(node)
    if node.domain not in ("", "ai.onnx"):
        raise CompressionError(
            f"node {label!r} is {node.domain}.{node.op_type}; training supports standard ops only", node=label
        )
    if node.op_type not in SUPPORTED_OPS:
        raise CompressionError(
            f"node {label!r} is a {node.op_type}, which the torch bridge does not support; "
            f"supported: {sorted(SUPPORTED_OPS)}",
            node=label,
            op_type=node.op_type,
        )
    attrs = node_attributes(node)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in ("NOTSET", "VALID"):
        raise CompressionError(f"node {label!r}: auto_pad={auto_pad} is not supported; use explicit pads", node=label)


def _padding(attrs: dict[str, Any], spatial: int, label: str) -> tuple[int, ...]:
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    begin, end = pads[:spatial], pads[spatial:]
    if begin != end:
        raise CompressionError(f"node {label!r}: asymmetric pads {pads} are not supported", node=label)
    return tuple(int(p) for p in begin)


def _run_op(torch: Any, functional: Any, op: str, args: list[Any], attrs: dict[str, Any], label: str) -> Any:
    x = args[0]
    if op == "Gemm":
        a = x.t() if attrs.get("transA", 0) else x
        b = args[1].t() if attrs.get("transB", 0) else args[1]
        y = attrs.get("alpha", 1.0) * (a @ b)
        if len(args) > 2 and args[2] is not None:
            y = y + attrs.get("beta", 1.0) * args[2]
        return y
    if op == "MatMul":
        return torch.matmul(x, args[1])
    if op in ("Add", "Sub", "Mul", "Div"):
        return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](x, args[1])
    if op == "Relu":
        return functional.relu(x)
    if op == "LeakyRelu":
        return functional.leaky_relu(x, attrs.get("alpha", 0.01))
    if op == "Sigmoid":
        return torch.sigmoid(x)
    if op == "Tanh":
        return torch.tanh(x)
    if op == "Softmax":
        return torch.softmax(x, dim=attrs.get("axis", -1))
    if op in ("Dropout", "Identity"):
        return x
    if op == "Flatten":
        axis = attrs.get("axis", 1)
        lead = int(np.prod(x.shape[:axis])) if axis else 1
        return x.reshape(lead, -1)
    if op == "Reshape":
        shape = [int(v) for v in args[1].tolist()]
        shape = [x.shape[i] if v == 0 and not attrs.get("allowzero", 0) else v for i, v in enumerate(shape)]
        return x.reshape(shape)
    if op == "BatchNormalization":
        return functional.batch_norm(
            x, args[3], args[4], args[1], args[2], training=False, eps=attrs.get("epsilon", 1e-5)
        )
    spatial = x.dim() - 2
    if op == "GlobalAveragePool":
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
    if spatial not in (1, 2):
        raise CompressionError(f"node {label!r}: {op} on {spatial}-D data is not supported", node=label)
    padding = _padding(attrs, spatial, label)
    if op == "Conv":
        conv = functional.conv2d if spatial == 2 else functional.conv1d
        bias = args[2] if len(args) > 2 else None
        return conv(
            x,
            args[1],
            bias,
            stride=tuple(attrs.get("strides", [1] * spatial)),
            padding=padding,
            dilation=tuple(attrs.get("dilations", [1] * spatial)),
            groups=attrs.get("group", 1),
        )
    kernel = tuple(attrs["kernel_shape"])
    strides = tuple(attrs.get("strides", [1] * spatial))
    ceil = bool(attrs.get("ceil_mode", 0))
    if op == "MaxPool":
        if any(d != 1 for d in attrs.get("dilations", [1] * spatial)):
            raise CompressionError(f"node {label!r}: dilated MaxPool is not supported", node=label)
        pool = functional.max_pool2d if spatial == 2 else functional.max_pool1d
        return pool(x, kernel, strides, padding, ceil_mode=ceil)
    pool = functional.avg_pool2d if spatial == 2 else functional.avg_pool1d
    return pool(x, kernel, strides, padding, ceil_mode=ceil, count_include_pad=bool(attrs.get("count_include_pad", 0)))


# --- torch -> ONNX for nn.Sequential ------------------------------------------------------


def module_to_onnx(
    module: Any,
    input_shape: Sequence[int],
    *,
    input_name: str = "input",
    output_name: str = "logits",
    opset: int = 17,
) -> onnx.ModelProto:
    """Export a trained torch model to ONNX without ``torch.onnx``.

    A module made by :func:`graph_module` is written back into its own graph. Otherwise
    the module must be an ``nn.Sequential`` (nesting allowed) of ``Linear``, ``Conv2d``
    (no padding modes other than zeros), ``ReLU``, ``LeakyReLU``, ``Sigmoid``, ``Tanh``,
    ``MaxPool2d``, ``AvgPool2d``, ``AdaptiveAvgPool2d(1)``, ``Flatten``, ``BatchNorm1d/2d``,
    ``Dropout`` and ``Identity``.

    Args:
        module: the torch module (put in eval mode; not otherwise changed).
        input_shape: one sample's shape without the batch axis, e.g. ``(64,)``.
        input_name: the graph input's name.
        output_name: the graph output's name.
        opset: the ONNX opset.

    Returns:
        The checked model, batch axis dynamic (``"N"``).

    Raises:
        RuntimeUnavailableError: torch is not installed.
        CompressionError: a layer type that is not supported (names it and its path).
    """
    torch = require_torch("exporting a torch model")
    module.eval()
    if hasattr(module, "to_onnx") and isinstance(getattr(module, "weight_names", None), dict):
        exported: onnx.ModelProto = module.to_onnx()
        return exported
    nn = torch.nn
    builder = _SequentialBuilder(input_name)
    builder.add(module, "", nn)
    last = builder.current
    nodes = builder.nodes
    nodes.append(helper.make_node("Identity", [last], [output_name], name="output"))
    with torch.no_grad():
        out_shape = list(module(torch.zeros((1, *input_shape))).shape[1:])
    graph = helper.make_graph(
        nodes,
        "student",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", *out_shape])],
        initializer=builder.inits,
    )
    return build_model(graph, opset)


class _SequentialBuilder:
    def __init__(self, input_name: str) -> None:
        self.current = input_name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def _const(self, name: str, tensor: Any) -> str:
        self.inits.append(numpy_helper.from_array(tensor.detach().cpu().numpy().astype(np.float32), name))
        return name

    def _node(self, op: str, name: str, extra: Sequence[str] = (), **attrs: Any) -> None:
        out = f"{name}.out"
        self.nodes.append(helper.make_node(op, [self.current, *extra], [out], name=name, **attrs))
        self.current = out

    def add(self, module: Any, path: str, nn: Any) -> None:
        name = path or "layer"
        kind = type(module).__name__
        if isinstance(module, nn.Sequential):
            for child_name, child in module.named_children():
                self.add(child, f"{path}.{child_name}" if path else child_name, nn)
        elif isinstance(module, nn.Linear):
            extra = [self._const(f"{name}.weight", module.weight)]
            if module.bias is not None:
                extra.append(self._const(f"{name}.bias", module.bias))
            self._node("Gemm", name, extra, transB=1)
        elif isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise CompressionError(
                    f"layer {name!r}: Conv2d padding {module.padding!r}/{module.padding_mode} is not supported",
                    layer=name,
                )
            extra = [self._const(f"{name}.weight", module.weight)]
            if module.bias is not None:
                extra.append(self._const(f"{name}.bias", module.bias))
            pads = list(module.padding) * 2
            self._node(
                "Conv",
                name,
                extra,
                kernel_shape=list(module.kernel_size),
                strides=list(module.stride),
                pads=pads,
                dilations=list(module.dilation),
                group=module.groups,
            )
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            extra = [
                self._const(f"{name}.weight", module.weight),
                self._const(f"{name}.bias", module.bias),
                self._const(f"{name}.running_mean", module.running_mean),
                self._const(f"{name}.running_var", module.running_var),
            ]
            self._node("BatchNormalization", name, extra, epsilon=float(module.eps))
        elif isinstance(module, nn.ReLU):
            self._node("Relu", name)
        elif isinstance(module, nn.LeakyReLU):
            self._node("LeakyRelu", name, alpha=float(module.negative_slope))
        elif isinstance(module, nn.Sigmoid):
            self._node("Sigmoid", name)
        elif isinstance(module, nn.Tanh):
            self._node("Tanh", name)
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            kernel = _pair(module.kernel_size)
            stride = _pair(module.stride or module.kernel_size)
            pads = list(_pair(module.padding)) * 2
            if isinstance(module, nn.MaxPool2d):
                if _pair(module.dilation) != [1, 1]:
                    raise CompressionError(f"layer {name!r}: dilated MaxPool2d is not supported", layer=name)
                self._node(
                    "MaxPool", name, kernel_shape=kernel, strides=stride, pads=pads, ceil_mode=int(module.ceil_mode)
                )
            else:
                self._node(
                    "AveragePool",
                    name,
                    kernel_shape=kernel,
                    strides=stride,
                    pads=pads,
                    ceil_mode=int(module.ceil_mode),
                    count_include_pad=int(module.count_include_pad),
                )
        elif isinstance(module, nn.AdaptiveAvgPool2d) and _pair(module.output_size) == [1, 1]:
            self._node("GlobalAveragePool", name)
        elif isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise CompressionError(f"layer {name!r}: only Flatten(1, -1) is supported", layer=name)
            self._node("Flatten", name, axis=1)
        elif isinstance(module, (nn.Dropout, nn.Identity)):
            return
        else:
            raise CompressionError(
                f"layer {name!r} is a {kind}, which cannot be exported without torch.onnx; use an nn.Sequential of "
                "supported layers, or export it yourself and pass the ONNX model",
                layer=name,
                module_type=kind,
            )


def _pair(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value), int(value)]
