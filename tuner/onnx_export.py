"""Export a plan as a deployable INT8 ONNX model in QDQ form, with OUR quantization parameters.

    export_onnx(model, plan, calibration, "model.onnx")

Every INT8 layer of the plan becomes, in the graph:

    x ─[Div by SmoothQuant factors]─ QuantizeLinear(s, z) ─[Clip -127..127]─ DequantizeLinear(s, z) ─┐
    int8 weight ─ DequantizeLinear(scales, zero points, axis) ─────────── Conv / Gemm / MatMul ─ (Add bias)

An INT8 embedding (weight-only: its input is indices) gathers the rows of its int8 table and
dequantizes only those rows, so no full-table DequantizeLinear runs per inference:

    indices ─ Gather(int8 table) ─ Cast(float) ─┐
    indices ─ Gather(per-row scales [V, 1]) ────┴ Mul      (per-tensor: Mul by a scalar scale)

with the input scale and zero point the calibration chose (`Calibration.activation_qparams`) and
the weight codes the simulation (`apply_plan`) computes with, so that ONNX Runtime runs the numbers
we measured; nothing is re-calibrated. The optional nodes appear for smoothed layers and for
symmetric inputs (QuantizeLinear saturates at -128, our symmetric INT8 at -127). FP32 layers keep
float weights and float inputs.

The forms are the ones ONNX Runtime's QDQ fusion turns into INT8 kernels: a Conv whose output is
quantized by the next INT8 layer (directly or through ReLU, max-pooling and reshapes) becomes
`QLinearConv`; a Linear on 2-D inputs is a Gemm (-> `QGemm`, float output), on 3-D+ inputs a MatMul
on the transposed weight (-> `MatMulIntegerToFloat`), the bias added after in float.

The graph comes from the torch.export-based exporter (`torch.onnx.export(dynamo=True)`); two
custom ops carry the quantization through tracing and are translated to QuantizeLinear and
DequantizeLinear. Every input dimension the model allows is dynamic (batch, sequence length,
image size). What `load_onnx` needs to call the file like the original model (input names,
positional or keyword, output structure), the plan and the per-layer quantization nodes are stored
in the model's metadata under the key "quanttune"; the exporter's own debugging metadata, node
names and default-valued attributes are dropped.
"""

from __future__ import annotations

import json
import logging
import pathlib
import warnings
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .batches import batch_size, call_model
from .calibrate import Calibration
from .errors import ExportError, InvalidArgumentError, InvalidPlanError
from .export_errors import export_failure, torch_output
from .onnx_io import FlatModel, InputSpec, flatten_output
from .plan import Plan
from .apply import apply_plan
from .qmodules import QuantizedLayer
from .qdq_ops import TRACE_LOCK, qdq_ops, translations
from .quant import quantize

METADATA_KEY = "quanttune"
FORMAT_VERSION = 2  # 1: per-layer descriptions stored in full (precision, weight, null fields)
_TWO_GB = 2**31


# -- the export form of a quantized layer ----------------------------------------------------


class _ExportLayer(nn.Module):
    """A `QuantizedLayer` as the graph should hold it: int8 weight codes plus the quantization
    ops, computing the same numbers as the simulation."""

    def __init__(self, q: QuantizedLayer, name: str, input_rank: int | None = None):
        super().__init__()
        layer, wqp, act = q.layer, q.weight_qparams, q.act_qparams
        if wqp.group_size is not None:
            raise InvalidPlanError(f"layer {name!r}: per-group weights cannot be exported to ONNX QDQ (opset < 21).")
        codes = quantize(layer.weight.detach(), wqp).to(torch.int8)
        self.linear = isinstance(layer, nn.Linear)
        # A Linear on 2-D inputs is exported as Gemm (fused into QGemm by ONNX Runtime; MatMul + Add
        # would first be fused into a float Gemm), otherwise as MatMul on the transposed weight
        # (fused into MatMulIntegerToFloat). The bias is added after, in float, as simulated.
        self.gemm = self.linear and input_rank == 2
        self.axis = 0
        if self.linear and not self.gemm:
            codes, self.axis = codes.t().contiguous(), 1
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", wqp.scale.detach().float().clone())
        self.register_buffer("weight_zero_point", wqp.zero_point.detach().to(torch.int8).clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        if not self.linear:  # the convolution's hyperparameters, for the functional form
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            self.conv_fn = (F.conv1d, F.conv2d, F.conv3d)[layer.weight.dim() - 3]
            mode = layer.padding_mode
            self.pad = None if mode == "zeros" else (layer._reversed_padding_repeated_twice, mode)
        self.scale = float(act.scale)
        self.zero_point = int(act.zero_point)
        self.qmin, self.qmax = act.qmin, act.qmax
        divisor = q.input_divisor
        self.register_buffer("input_divisor", None if divisor is None else divisor.detach().clone())
        self.channel_axis = q.channel_axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = qdq_ops()
        if self.input_divisor is not None:  # SmoothQuant: exactly the simulation's x / s
            shape = [1] * x.dim()
            shape[self.channel_axis] = -1
            x = x / self.input_divisor.reshape(shape)
        x = ops["qdq"](x, self.scale, self.zero_point, self.qmin, self.qmax)
        w = ops["dq"](self.weight, self.weight_scale, self.weight_zero_point, self.axis)
        if self.linear:
            y = F.linear(x, w) if self.gemm else torch.matmul(x, w)
            return y if self.bias is None else y + self.bias
        conv = self.conv
        if self.pad is not None:  # as nn.Conv*d does for padding_mode != "zeros"
            x = F.pad(x, self.pad[0], mode=self.pad[1])
            conv = {**conv, "padding": 0}
        return self.conv_fn(x, w, self.bias, **conv)


class _ExportEmbedding(nn.Module):
    """A weight-only `QuantizedLayer` over an `nn.Embedding`: int8 codes gathered by the indices,
    then cast and multiplied by their rows' scales. Symmetric codes (zero point 0) times the scale
    in float32 is exactly what the simulation's dequantized table holds."""

    def __init__(self, q: QuantizedLayer):
        super().__init__()
        wqp = q.weight_qparams
        self.register_buffer("weight", quantize(q.layer.weight.detach(), wqp).to(torch.int8))
        scale = wqp.scale.detach().float().clone()
        self.register_buffer("weight_scale", scale.reshape(-1, 1) if scale.dim() else scale)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        codes = F.embedding(indices, self.weight).float()
        if self.weight_scale.dim():  # per row: gather the scales of the gathered rows
            return codes * F.embedding(indices, self.weight_scale)
        return codes * self.weight_scale


def _input_ranks(simulated: nn.Module, batch: Any) -> tuple[Any, dict[str, int | None]]:
    """Run the simulated model on `batch`: its output, and the input rank of every quantized layer
    (None where a layer is called with several ranks)."""
    ranks: dict[str, int | None] = {}

    def record(name: str, x: torch.Tensor) -> None:
        ranks[name] = x.dim() if ranks.get(name, x.dim()) == x.dim() else None

    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=name: record(n, args[0]))
        for name, m in simulated.named_modules()
        if isinstance(m, QuantizedLayer)
    ]
    try:
        with torch.no_grad():
            output = call_model(simulated, batch)
    finally:
        for h in hooks:
            h.remove()
    return output, ranks


def _export_form(simulated: nn.Module, ranks: dict[str, int | None]) -> nn.Module:
    """The simulated model (a private copy made by `apply_plan`) with each QuantizedLayer
    replaced, in place, by its export form."""
    exported = simulated
    for name, module in list(exported.named_modules()):
        if isinstance(module, QuantizedLayer):
            parent, _, child = name.rpartition(".")
            export_layer = _ExportEmbedding(module) if module.weight_only else _ExportLayer(module, name, ranks.get(name))
            export_layer._forward_hooks.update(module._forward_hooks)  # an output quantizer stays
            setattr(exported.get_submodule(parent) if parent else exported, child, export_layer)
    return exported.eval()


# -- inputs, dynamic dimensions --------------------------------------------------------------


def _example_tensors(spec: InputSpec, example: Any) -> list[torch.Tensor]:
    tensors = spec.tensors_of(example)
    for name, t in zip(spec.tensors, tensors):
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(
                f"input {name!r} of the example batch must be a tensor, but got {type(t).__name__}."
            )
    n = batch_size(example)
    if n == 1:  # torch.export specialises size-1 dimensions: show it a batch of 2
        tensors = [torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in tensors]
    return tensors


def _dynamic_shapes(tensors: list[torch.Tensor]) -> tuple:
    """Every dimension of every input is `Dim.AUTO`: dynamic unless the model needs it fixed
    (torch.export then keeps the example's size). Calibration batches need not show every size
    the model will see (padded sequence lengths, image sizes), so none is assumed fixed."""
    auto = torch.export.Dim.AUTO
    return (tuple({d: auto for d in range(t.dim())} for t in tensors),)


@contextmanager
def _quiet():
    """The exporter is chatty (progress lines, deprecation and registration warnings)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_registries: dict[Any, Any] = {}  # torch.onnx's ATen -> ONNX function table, by the arguments it was built with


@contextmanager
def _one_export_at_a_time():
    """Exports in this process run one at a time, and no eager simulation runs our custom op
    meanwhile (`qdq_ops.TRACE_LOCK`): torch.export and torch.onnx keep process-wide state (two
    worker threads exporting at once failed in the ONNX decomposition step).

    Meanwhile torch.onnx.export's table of ATen -> ONNX functions is built once per process:
    torch rebuilds it from onnxscript on every call (about 0.9 s here, half of a small model's
    export, and the deployed check exports twice), and it is the same each time, so each export
    gets a copy of the one built first (the export adds our custom ops to its copy). Where torch's
    internals differ (another version), exports just build it as before."""
    with TRACE_LOCK:
        try:
            from torch.onnx._internal.exporter import _registration

            original = _registration.ONNXRegistry.__dict__["from_torchlib"]
            build = original.__func__
        except (ImportError, KeyError, AttributeError):
            yield
            return

        def from_torchlib(cls, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN001
            key = (cls, args, tuple(sorted(kwargs.items())))
            if key not in _registries:
                _registries[key] = build(cls, *args, **kwargs)
            registry = cls.__new__(cls)
            registry.__dict__.update(_registries[key].__dict__)
            registry.functions = {op: list(overloads) for op, overloads in _registries[key].functions.items()}
            return registry

        _registration.ONNXRegistry.from_torchlib = classmethod(from_torchlib)
        try:
            yield
        finally:
            _registration.ONNXRegistry.from_torchlib = original


# -- the public verb -------------------------------------------------------------------------


def export_onnx(
    model: nn.Module, plan: Plan, calibration: Calibration, path: str | pathlib.Path, *, example: Any = None
) -> pathlib.Path:
    """Write `plan` applied to `model` as an ONNX QDQ model to `path` and return the path.

    `calibration` (from `tuner.calibrate`) supplies the quantization parameters; `example` is one
    batch shaped like the model's inputs (a tensor, a tuple of positional inputs or a dict of
    keyword inputs; default: the first calibration batch). The caller's model is not modified.
    """
    import onnx

    from .onnx_graph import annotate_layers, drop_default_attributes, pack_layers, strip_exporter_metadata

    path = pathlib.Path(path)
    if not isinstance(plan, Plan):
        raise InvalidArgumentError(f"`plan` must be a tuner.Plan, but got {type(plan).__name__}.")
    if not isinstance(calibration, Calibration):
        raise InvalidArgumentError(f"`calibration` must be a tuner.Calibration, but got {type(calibration).__name__}.")
    example = calibration.batches[0] if example is None else example
    simulated = apply_plan(model, plan, calibration)
    spec = InputSpec.from_batch(model, example)
    tensors = _example_tensors(spec, example)
    output, ranks = _input_ranks(simulated, spec.rebuild(tensors))
    outputs, tree = flatten_output(output)
    exported = _export_form(simulated, ranks)
    if not outputs:
        raise ExportError(f"{type(model).__name__} returned no tensor on the example batch: nothing to export.")

    flat = FlatModel(exported, spec).eval()
    try:
        with _one_export_at_a_time(), _quiet(), torch_output() as captured, torch.no_grad():
            program = torch.onnx.export(
                flat,
                tuple(tensors),
                dynamo=True,
                input_names=list(spec.tensors),
                output_names=[f"output_{i}" for i in range(len(outputs))],
                dynamic_shapes=_dynamic_shapes(tensors),
                custom_translation_table=translations(),
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # torch.export or the ONNX translation: one message, torch's output in a log file
        raise ExportError("torch.onnx.export failed: " + export_failure(exc, model, captured.getvalue(),
                                                                          factory_hint=False)) from exc

    proto = program.model_proto
    strip_exporter_metadata(proto, prefix="model.")
    drop_default_attributes(proto)
    layers = annotate_layers(proto, plan, calibration)
    meta = {
        "format": FORMAT_VERSION,
        "inputs": spec.to_dict(),
        "outputs": tree,
        "output_names": [o.name for o in proto.graph.output],
        "plan": plan.to_dict(),
        "layers": pack_layers(layers),  # read_metadata unpacks them with the plan
    }
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, separators=(",", ":"))
    proto.producer_name = "quanttune"
    path.parent.mkdir(parents=True, exist_ok=True)
    if proto.ByteSize() >= _TWO_GB:
        onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(proto, str(path))
    return path
