"""The runtime is the judge: which planned INT8 layers ONNX Runtime really runs in INT8 kernels.

    check = check_kernels("model.onnx", macs={"conv1": 1179648, ...})
    check.running_int8, check.planned_int8, check.int8_macs_running
    check.layers["conv2"].reason      # why a planned INT8 layer runs in float

ONNX Runtime turns a QDQ layer into an INT8 kernel (QLinearConv, QGemm, MatMulIntegerToFloat, ...)
only when its fusion rules match: a Conv needs its input from DequantizeLinear <- QuantizeLinear and
its output straight into QuantizeLinear (a ReLU in between is folded); a Gemm/MatMul needs its input
from DequantizeLinear <- QuantizeLinear. Otherwise it keeps a float Conv/Gemm/MatMul on the weight
dequantized at every call: a smaller file, no faster, often slower than FP32.

So the check does not trust the plan: it builds a session with all graph optimizations, saves the
optimized graph (`SessionOptions.optimized_model_filepath`) and looks at what consumes each INT8
layer's int8 weight initializer `<layer>.weight` (following only nodes that keep it int8: Transpose,
Reshape, ...). An INT8 kernel there means the layer runs INT8; a DequantizeLinear means it runs in
float, and the reason is read from the exported graph around the layer (what its input comes from,
what its output feeds). An INT8 embedding runs INT8 when its table is gathered as int8 rows.
"""

from __future__ import annotations

import pathlib
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

# Operators that compute on int8/uint8 data (ONNX and com.microsoft contrib ops)
INT8_KERNELS = frozenset({
    "QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "ConvInteger", "QAttention", "DynamicQuantizeLSTM", "QEmbedLayerNormalization", "MatMulNBits",
})
# Operators that move int8 data without converting it: the weight stays int8 through them
_KEEP_INT8 = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Expand"})
_FLOAT_DEQUANTIZE = "its weight dequantized at every call"


@dataclass(frozen=True)
class LayerKernel:
    """What ONNX Runtime runs for one plan layer. `kernel` is the operator consuming its weight in
    the optimized graph (None when not found); `int8` whether that is an INT8 kernel (for an
    embedding: an int8 Gather); `reason` says why a planned INT8 layer runs in float."""

    layer: str
    planned: str  # "int8" | "fp32"
    op: str | None = None  # the layer's operator in the exported graph: Conv, Gemm, MatMul, Gather
    kernel: str | None = None
    int8: bool = False
    macs: int | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "layer"}


@dataclass(frozen=True)
class KernelCheck:
    """Per plan layer, what ONNX Runtime runs; and the summary: layers planned INT8, layers running
    INT8, and (with MACs per layer) the share of MACs planned INT8 and the share that RUN in INT8."""

    layers: dict[str, LayerKernel]
    seconds: float = 0.0
    optimized_ops: dict[str, int] = field(default_factory=dict)  # operator counts of the optimized graph

    @property
    def planned_int8(self) -> list[str]:
        return [n for n, k in self.layers.items() if k.planned == "int8"]

    @property
    def running_int8(self) -> list[str]:
        return [n for n, k in self.layers.items() if k.planned == "int8" and k.int8]

    @property
    def running_float(self) -> list[str]:
        """Layers the plan keeps INT8 that ONNX Runtime runs in float."""
        return [n for n, k in self.layers.items() if k.planned == "int8" and not k.int8]

    def _share(self, names: list[str]) -> float | None:
        if any(k.macs is None for k in self.layers.values()):
            return None
        total = sum(k.macs for k in self.layers.values())
        return sum(self.layers[n].macs for n in names) / total if total else None

    @property
    def int8_macs_planned(self) -> float | None:
        return self._share(self.planned_int8)

    @property
    def int8_macs_running(self) -> float | None:
        return self._share(self.running_int8)

    def to_dict(self) -> dict[str, Any]:
        return {
            "planned_int8": len(self.planned_int8), "running_int8": len(self.running_int8),
            "int8_macs_planned": self.int8_macs_planned, "int8_macs_running": self.int8_macs_running,
            "running_float": self.running_float, "seconds": round(self.seconds, 3),
            "layers": {n: k.to_dict() for n, k in self.layers.items()}, "optimized_ops": self.optimized_ops,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KernelCheck:
        layers = {n: LayerKernel(layer=n, **k) for n, k in data["layers"].items()}
        return cls(layers, data.get("seconds", 0.0), dict(data.get("optimized_ops", {})))


class _Graph:
    """Producer and consumers of every tensor of an ONNX graph."""

    def __init__(self, graph: Any):
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.nodes = list(graph.node)
        self.initializers = {i.name: i for i in graph.initializer}
        self.outputs = {o.name for o in graph.output}


def optimized_graph(path: str | pathlib.Path, directory: str | pathlib.Path, *, external: bool = False) -> Any:
    """The graph ONNX Runtime (CPU provider, all optimizations) runs for the file at `path`, as an
    `onnx.ModelProto` without its weights' bytes (saved to `directory` through
    `SessionOptions.optimized_model_filepath`; `external`: the model keeps its weights in a
    separate file, over 2 GB, and so does the saved graph)."""
    import onnx
    import onnxruntime as ort

    from .onnx_runtime import session_options

    options = session_options(threads=1)
    saved = pathlib.Path(directory) / "optimized.onnx"
    options.optimized_model_filepath = str(saved)
    if external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.onnx.data")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(saved), load_external_data=False)


def check_kernels(path: str | pathlib.Path, macs: Mapping[str, int] | None = None, *,
                  layers: Mapping[str, Mapping[str, Any]] | None = None) -> KernelCheck:
    """Which layers of the quanttune-exported ONNX file at `path` ONNX Runtime runs in INT8.

    `macs` (layer -> multiply-accumulates, e.g. `{n: i.macs for n, i in calibration.layers.items()}`)
    adds the MAC shares; `layers` (layer -> `{"precision", "op", "weight"}`) defaults to the file's
    metadata (`tuner.onnx_runtime.read_metadata`)."""
    import onnx

    start = time.perf_counter()
    if layers is None:
        from .onnx_runtime import read_metadata

        layers = read_metadata(path)["layers"]
    exported_proto = onnx.load(str(path), load_external_data=False)
    exported = _Graph(exported_proto.graph)
    external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in exported_proto.graph.initializer)
    with tempfile.TemporaryDirectory() as tmp:
        optimized_proto = optimized_graph(path, tmp, external=external)
    optimized = _Graph(optimized_proto.graph)
    ops: dict[str, int] = defaultdict(int)
    for node in optimized_proto.graph.node:
        ops[node.op_type] += 1
    found = {}
    for name, layer in layers.items():
        layer_macs = None if macs is None else int(macs.get(name, 0))
        if layer.get("precision") != "int8":
            found[name] = LayerKernel(name, "fp32", macs=layer_macs)
            continue
        found[name] = _judge(name, layer, exported, optimized, layer_macs)
    return KernelCheck(found, time.perf_counter() - start, dict(sorted(ops.items())))


def _judge(name: str, layer: Mapping[str, Any], exported: _Graph, optimized: _Graph, macs: int | None) -> LayerKernel:
    op, weight = layer.get("op"), layer.get("weight") or f"{name}.weight"
    if weight not in optimized.initializers:  # renamed or repacked: ONNX Runtime keeps the layer's node names
        named = [n for n in optimized.nodes if n.name.startswith(f"{name}/") and n.op_type in INT8_KERNELS]
        if named:
            return LayerKernel(name, "int8", op, named[0].op_type, True, macs)
        return LayerKernel(name, "int8", op, None, False, macs,
                           f"its int8 weight {weight!r} is not in ONNX Runtime's optimized graph")
    users = _weight_users(optimized, weight)
    if op == "Gather":  # weight-only embedding: int8 rows gathered, then dequantized
        gathers = [u for u in users if u.op_type == "Gather" and u.input[0] in _int8_names(optimized, weight)]
        if gathers and len(gathers) == len(users):
            return LayerKernel(name, "int8", op, "Gather", True, macs)
        kernel = users[0].op_type if users else None
        return LayerKernel(name, "int8", op, kernel, False, macs,
                           f"its int8 table is read by {kernel or 'nothing'}, not gathered as int8 rows")
    int8_users = [u for u in users if u.op_type in INT8_KERNELS]
    if users and len(int8_users) == len(users):
        return LayerKernel(name, "int8", op, int8_users[0].op_type, True, macs)
    float_users = [u for u in users if u.op_type not in INT8_KERNELS]
    kernel = _float_kernel(optimized, float_users[0]) if float_users else None
    return LayerKernel(name, "int8", op, kernel, False, macs, _why_float(op, weight, kernel, exported))


def _int8_names(graph: _Graph, weight: str) -> set[str]:
    """The weight's name and the names of the int8 tensors it flows into unchanged."""
    names, todo = {weight}, [weight]
    while todo:
        for node in graph.consumers.get(todo.pop(), []):
            if node.op_type in _KEEP_INT8 and node.output[0] not in names:
                names.add(node.output[0])
                todo.append(node.output[0])
    return names


def _weight_users(graph: _Graph, weight: str) -> list[Any]:
    """The nodes reading the int8 weight, through nodes that keep it int8."""
    names = _int8_names(graph, weight)
    return [n for name in names for n in graph.consumers.get(name, []) if n.op_type not in _KEEP_INT8]


def _float_kernel(graph: _Graph, user: Any) -> str:
    """What computes with a dequantized weight: the consumer of the DequantizeLinear (FusedConv,
    Conv, Gemm, MatMul, ...), or the op itself when it is not a DequantizeLinear."""
    if user.op_type != "DequantizeLinear":
        return user.op_type
    compute = graph.consumers.get(user.output[0], [])
    return compute[0].op_type if compute else user.op_type


def _why_float(op: str | None, weight: str, kernel: str | None, exported: _Graph) -> str:
    """Why ONNX Runtime did not fuse the layer: read in the exported graph around it."""
    runs = f"runs as a float {kernel or op}, {_FLOAT_DEQUANTIZE}"
    weight_dq = next((n for n in exported.consumers.get(weight, []) if n.op_type == "DequantizeLinear"), None)
    computes = exported.consumers.get(weight_dq.output[0], []) if weight_dq is not None else []
    if not computes:
        return f"{runs} (its weight does not reach a Conv/Gemm/MatMul through DequantizeLinear)"
    compute = computes[0]
    source = exported.producer.get(compute.input[0])
    if source is None or source.op_type != "DequantizeLinear":
        origin = source.op_type if source is not None else "a graph input"
        return f"{runs}: its input comes from {origin}, not from DequantizeLinear"
    codes = exported.producer.get(source.input[0])
    if codes is not None and codes.op_type == "Clip":
        return (f"{runs}: a Clip sits between its input's QuantizeLinear and DequantizeLinear (a symmetric input "
                "in [-127, 127]), which blocks ONNX Runtime's fusion (an affine input would run INT8)")
    if codes is None or codes.op_type != "QuantizeLinear":
        return f"{runs}: its input's DequantizeLinear reads {codes.op_type if codes else 'a graph input'}, not QuantizeLinear"
    if compute.op_type == "Conv":
        output = _output_problem(compute, exported)
        if output:
            return f"{runs}: {output}"
    return f"{runs}: ONNX Runtime's QDQ fusion did not match it"


def _output_problem(compute: Any, graph: _Graph) -> str | None:
    """Why a Conv's output is not quantized the way QLinearConv needs: straight into one
    QuantizeLinear, or through a ReLU (or ReLU6's Clip) whose only consumer is one."""
    tensor, path = compute.output[0], [compute.op_type]
    while True:
        users = graph.consumers.get(tensor, [])
        if tensor in graph.outputs:
            return f"its {compute.op_type}'s output is a graph output (ONNX Runtime has no INT8 {compute.op_type} " \
                   "with a float output)"
        if len(users) == 1 and users[0].op_type == "QuantizeLinear":
            return None
        if len(users) == 1 and users[0].op_type in ("Relu", "Clip") and len(path) == 1:  # ReLU / ReLU6: folded
            path.append(users[0].op_type)
            tensor = users[0].output[0]
            continue
        others = " and ".join(sorted({u.op_type for u in users if u.op_type != "QuantizeLinear"})) or "nothing"
        quantized = any(u.op_type == "QuantizeLinear" for u in users)
        what = f"its {compute.op_type}'s output" + (f" (after {path[1]})" if len(path) > 1 else "")
        return f"{what} feeds {others}{' besides' if quantized else ', not'} QuantizeLinear"
