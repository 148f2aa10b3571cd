"""Post-processing of the exported ONNX graph with the `onnx` package: tidy names, and find, check
and name every layer's quantization nodes."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import onnx
from onnx import defs, helper, numpy_helper

from .calibrate import Calibration
from .errors import GraphError
from .plan import Plan


class _Index:
    """Producer and consumers of every tensor name in a graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers[name].append(node)
        self.initializers = {init.name: init for init in graph.initializer}
        self.outputs = {o.name for o in graph.output}


def _rename_tensors(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    if not renames:
        return
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for collection in (graph.initializer, graph.input, graph.output, graph.value_info):
        for item in collection:
            item.name = renames.get(item.name, item.name)


def strip_exporter_metadata(proto: onnx.ModelProto, prefix: str = "") -> None:
    """Drop what the exporter writes for its own debugging: per-node metadata (stack traces, FX
    nodes: large, and they leak local paths), its node names (`node_relu_1`: the op type and
    output say as much; `annotate_layers` names the quantization nodes), the graph's
    torch.export signature and range constraints, and intermediate shape annotations (see below); and strip
    `prefix` from initializer names, so that they read like the model's parameters (`conv1.weight`)."""
    graph = proto.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.ClearField("doc_string")  # cleared, not set to "": an empty string is still written
        node.ClearField("name")
    for collection in (graph.input, graph.output, graph.initializer):
        for item in collection:
            del item.metadata_props[:]
    del graph.metadata_props[:]  # ExportedProgram.graph_signature (one line per buffer), range_constraints
    # intermediate shapes: ONNX Runtime infers what it needs. Kept, they let it fuse bias Add +
    # residual Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel made MiniLM
    # take 168 instead of 131 ms at batch 128 (ORT 1.32, measured; README)
    del graph.value_info[:]
    if prefix:
        taken = {init.name for init in graph.initializer}
        renames = {}
        for init in graph.initializer:
            new = init.name[len(prefix):]
            if init.name.startswith(prefix) and new not in taken:
                renames[init.name] = new
        _rename_tensors(graph, renames)


def drop_default_attributes(proto: onnx.ModelProto) -> None:
    """Remove node attributes the exporter spells out at their operator's default value (Conv
    `group=1`, Gemm `alpha=1.0`, QuantizeLinear `axis=1`, ...): the operator schema at the model's
    opset defines them, so readers, ONNX Runtime included, see the same values without them."""
    opsets = {o.domain: o.version for o in proto.opset_import}
    for node in proto.graph.node:
        try:
            schema = defs.get_schema(node.op_type, opsets.get(node.domain, 1), node.domain)
        except defs.SchemaError:  # an operator onnx does not know: leave it as it is
            continue
        keep = [a for a in node.attribute if not _is_default(a, schema.attributes.get(a.name))]
        if len(keep) < len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(keep)


def _is_default(attribute: onnx.AttributeProto, declared: Any) -> bool:
    if declared is None or not declared.default_value.name or attribute.type != declared.default_value.type:
        return False  # no default (a required attribute, or one whose absence means something else)
    return helper.get_attribute_value(attribute) == helper.get_attribute_value(declared.default_value)


def _scalar(index: _Index, name: str) -> float | int | None:
    """The value of a scalar initializer or Constant."""
    if name in index.initializers:
        value = numpy_helper.to_array(index.initializers[name])
    elif name in index.producer and index.producer[name].op_type == "Constant":
        value = numpy_helper.to_array(index.producer[name].attribute[0].t)
    else:
        return None
    return value.item() if value.ndim == 0 else None


def annotate_layers(proto: onnx.ModelProto, plan: Plan, calibration: Calibration) -> dict[str, dict[str, Any]]:
    """Find, check and name every plan layer's nodes; return what the metadata records per layer.

    An INT8 layer must read an int8 weight initializer `<layer>.weight` through DequantizeLinear
    and its input through QuantizeLinear -> DequantizeLinear; an INT8 embedding must Gather rows of
    its int8 `<layer>.weight`, Cast them to float and Mul them by their scales; an FP32 layer must
    keep a float weight. Raises `GraphError` otherwise (that would be an exporter change, not a
    user error).
    """
    index = _Index(proto.graph)
    layers: dict[str, dict[str, Any]] = {}
    for name, info in calibration.layers.items():
        weight = index.initializers.get(f"{name}.weight")
        if plan.config(name).int8 and info.weight_only:
            layers[name] = _int8_embedding(index, name, weight)
        elif plan.config(name).int8:
            layers[name] = _int8_layer(index, name, weight, smoothed=bool(plan.config(name).smooth), named=layers)
        elif weight is not None and weight.data_type != onnx.TensorProto.FLOAT:
            raise GraphError(f"FP32 layer {name!r} has a {onnx.TensorProto.DataType.Name(weight.data_type)} weight.")
        else:
            layers[name] = {"precision": "fp32"}
    return layers


# What the file's metadata stores per layer is the description above without what the file says
# elsewhere: the precision (the plan's, stored once), the weight (always `<layer>.weight`) and
# the empty fields. `unpack_layers` (used by `read_metadata`) fills them back in.
_LAYER_FIELDS = (
    "op", "weight", "weight_axis", "input", "input_divisor", "input_codes", "input_scale", "input_zero_point",
)
_EMBEDDING_FIELDS = ("op", "weight", "weight_axis", "weight_scale", "input")


def pack_layers(layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The `annotate_layers` descriptions as the metadata stores them (an FP32 layer: `{}`)."""
    return {
        name: {k: v for k, v in layer.items() if k not in ("precision", "weight") and v is not None}
        for name, layer in layers.items()
    }


def unpack_layers(stored: dict[str, dict[str, Any]], plan: Plan) -> dict[str, dict[str, Any]]:
    """The `annotate_layers` descriptions back from `pack_layers` and the plan."""
    layers: dict[str, dict[str, Any]] = {}
    for name, layer in stored.items():
        if not plan.config(name).int8:
            layers[name] = {"precision": "fp32"}
            continue
        fields = _EMBEDDING_FIELDS if layer.get("op") == "Gather" else _LAYER_FIELDS
        layers[name] = {"precision": "int8", **{k: layer.get(k) for k in fields}, "weight": f"{name}.weight"}
    return layers


def _int8_layer(index: _Index, name: str, weight: Any, smoothed: bool, named: dict[str, Any]) -> dict[str, Any]:
    """Check one INT8 layer's nodes, name them `<layer>/<role>`, and describe them."""
    if weight is None or weight.data_type != onnx.TensorProto.INT8:
        raise GraphError(f"INT8 layer {name!r} has no int8 weight initializer {name + '.weight'!r} in the graph.")
    # a layer called more than once dequantizes its weight once per call: the first describes it
    weight_dq = next((n for n in index.consumers[weight.name] if n.op_type == "DequantizeLinear"), None)
    compute = index.consumers[weight_dq.output[0]] if weight_dq is not None else []
    if len(compute) != 1 or compute[0].op_type not in ("Conv", "MatMul", "Gemm"):
        raise GraphError(f"INT8 layer {name!r}: its weight does not reach one Conv/Gemm/MatMul through DequantizeLinear.")
    compute = compute[0]
    input_dq = index.producer.get(compute.input[0])
    codes = index.producer.get(input_dq.input[0]) if input_dq is not None else None
    quantize = index.producer.get(codes.input[0]) if codes is not None and codes.op_type == "Clip" else codes
    ops = (getattr(input_dq, "op_type", None), getattr(quantize, "op_type", None))
    if ops != ("DequantizeLinear", "QuantizeLinear"):
        raise GraphError(f"INT8 layer {name!r}: its input is not quantized by QuantizeLinear -> DequantizeLinear.")
    roles = [(quantize, "input_quantize"), (input_dq, "input_dequantize"), (weight_dq, "weight_dequantize"),
             (compute, compute.op_type)]
    if codes is not quantize:
        roles.append((codes, "input_clip"))
    smooth = index.producer.get(quantize.input[0])  # SmoothQuant: Div by the per-channel factors
    if smoothed and smooth is not None and smooth.op_type == "Div" and smooth.input[1] in index.initializers:
        roles.append((smooth, "input_smooth"))
    else:
        smooth = None
    taken = tuple(f"{n}/" for n in named)
    for node, role in roles:
        if not node.name.startswith(taken):  # an input QDQ shared by several layers keeps the first name
            node.name = f"{name}/{role}"
    per_channel = len(weight_dq.input) > 1 and _scalar(index, weight_dq.input[1]) is None
    return {
        "precision": "int8",
        "op": compute.op_type,
        "weight": weight.name,
        "weight_axis": next((a.i for a in weight_dq.attribute if a.name == "axis"), 1) if per_channel else None,
        "input": smooth.input[0] if smooth is not None else quantize.input[0],
        "input_divisor": smooth.input[1] if smooth is not None else None,
        "input_codes": codes.output[0],
        "input_scale": _scalar(index, quantize.input[1]),
        "input_zero_point": _scalar(index, quantize.input[2]),
    }


def _int8_embedding(index: _Index, name: str, weight: Any) -> dict[str, Any]:
    """Check one INT8 embedding's nodes (Gather of int8 rows -> Cast -> Mul by the gathered per-row
    scales or by a scalar), name them `<layer>/<role>`, and describe them."""
    if weight is None or weight.data_type != onnx.TensorProto.INT8:
        raise GraphError(f"INT8 embedding {name!r} has no int8 weight initializer {name + '.weight'!r} in the graph.")
    # an embedding called more than once gathers once per call: the first describes it
    gather = next((n for n in index.consumers[weight.name] if n.op_type == "Gather" and n.input[0] == weight.name), None)
    cast = next((n for n in index.consumers[gather.output[0]] if n.op_type == "Cast"), None) if gather else None
    mul = next((n for n in index.consumers[cast.output[0]] if n.op_type == "Mul"), None) if cast else None
    if mul is None:
        raise GraphError(f"INT8 embedding {name!r}: its int8 table does not reach Gather -> Cast -> Mul.")
    scale_name = next(i for i in mul.input if i != cast.output[0])
    scale_gather = index.producer.get(scale_name)
    roles = [(gather, "gather"), (cast, "cast"), (mul, "dequantize")]
    if scale_gather is not None and scale_gather.op_type == "Gather" and scale_gather.input[0] in index.initializers:
        if scale_gather.input[1] != gather.input[1]:
            raise GraphError(f"INT8 embedding {name!r}: its scales are gathered by other indices than its rows.")
        roles.append((scale_gather, "scale_gather"))
        scale, per_row = scale_gather.input[0], True
    elif _scalar(index, scale_name) is not None:
        scale, per_row = scale_name, False
    else:
        raise GraphError(f"INT8 embedding {name!r}: its gathered rows are not multiplied by their scales.")
    for node, role in roles:
        node.name = f"{name}/{role}"
    return {
        "precision": "int8",
        "op": "Gather",
        "weight": weight.name,
        "weight_axis": 0 if per_row else None,
        "weight_scale": scale,
        "input": gather.input[1],
    }
