"""Calibration: ONE forward pass over the calibration data gathers, for every quantizable layer,
the statistics of its input (min/max + bounded histogram) and its compute (MACs). Every
calibration method's range, and so every plan, is derived from them without running the model
again. An `nn.Embedding` is a weight-only layer: its input is integer indices (nothing to
calibrate) and it computes no multiply-accumulate; only its calls and its table are recorded."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .batches import as_batches, batch_size, call_model
from .errors import CalibrationError, InvalidPlanError
from .functional import hook_functional
from .graph import PRODUCT_OPS, ConvOutput, ModelGraph, fold_batchnorm, read_graph
from .histogram import TensorStats
from .plan import LayerConfig, Plan
from .quant import INT8, UINT8, QParams, compute_qparams, fake_quantize, weight_qparams
from .smoothing import verify_folds

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
WEIGHT_ONLY = (nn.Embedding,)  # integer inputs: only the weight is quantized


def is_weight_only(module: nn.Module) -> bool:
    return isinstance(module, WEIGHT_ONLY)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module for every layer quanttune can run in INT8: nn.Linear,
    nn.Conv1d/2d/3d and nn.Embedding (weight-only). An embedding with `max_norm` is left out: its
    forward renormalizes the table in place."""
    return {
        name: m for name, m in model.named_modules()
        if name and isinstance(m, QUANTIZABLE) and not (isinstance(m, nn.Embedding) and m.max_norm is not None)
    }


@dataclass
class LayerInfo:
    """What calibration learned about one layer."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    params: int
    macs: int = 0  # multiply-accumulates over the whole calibration set (0 for an embedding)
    calls: int = 0
    weight_only: bool = False  # an embedding: integer input, no input statistics
    input: TensorStats = field(default_factory=TensorStats)
    channel_min: torch.Tensor | None = None  # per input channel, for SmoothQuant
    channel_max: torch.Tensor | None = None
    # per INT8 setting (its label without "/bc"): the mean output shift per output channel it
    # causes, INT8 minus FP32, measured by `layer_report` on the calibration data (bias correction)
    output_shift: dict[str, torch.Tensor] = field(default_factory=dict)

    def update_channels(self, x: torch.Tensor, axis: int) -> None:
        x = x.detach().float().movedim(axis, -1).reshape(-1, x.shape[axis])
        lo, hi = x.amin(0), x.amax(0)
        if self.channel_min is None:
            self.channel_min, self.channel_max = lo, hi
        else:
            self.channel_min, self.channel_max = torch.minimum(self.channel_min, lo), torch.maximum(self.channel_max, hi)


class Calibration:
    """Per-layer statistics from one pass, and the quantization parameters derived from them.

    `model` is the model as simulated and exported: the caller's model with its BatchNorms
    folded (`graph.folds`), or the caller's model itself when nothing was folded. `graph` is its
    dataflow (None when torch.export could not capture it) and `tensors` the statistics of every
    tensor the runtime may need quantized beyond layer inputs (by site: the module returning it).
    """

    def __init__(self, model: nn.Module, layers: dict[str, LayerInfo], batches: list[Any], seconds: float,
                 *, source: nn.Module | None = None, graph: ModelGraph | None = None,
                 tensors: dict[str, TensorStats] | None = None, smooth_folds: dict[str, str] | None = None):
        source = model if source is None else source
        self.model = model
        self.source = source
        self.graph = graph
        self.tensors = tensors or {}
        # layer -> the LayerNorm/Linear its SmoothQuant factors fold into (no Div; `tuner.smoothing`)
        self.smooth_folds = smooth_folds or {}
        self.layers = layers
        self.batches = batches
        self.seconds = seconds
        self.samples = sum(batch_size(b) for b in batches)
        self.model_params = sum(p.numel() for p in source.parameters())
        self.model_bytes = sum(p.numel() * p.element_size() for p in source.parameters()) + sum(
            b.numel() * b.element_size() for b in source.buffers()
        )
        self._weights: dict[tuple[str, str, float], tuple[QParams, torch.Tensor]] = {}
        self._modules = quantizable_layers(model)

    def prepare(self, model: nn.Module) -> nn.Module:
        """`model` as calibrated: BatchNorms folded like the calibrated model's (the calibrated
        copy itself when `model` is the one calibrated)."""
        if self.graph is None or not self.graph.folds:
            return model
        return self.model if model is self.source else fold_batchnorm(model, self.graph.folds)

    # -- tensors beyond layer inputs -----------------------------------------------------------

    def output_sites(self, plan: Plan) -> dict[str, str]:
        """The tensors `plan` needs quantized beyond its layers' inputs, so that the runtime runs
        its INT8 convolutions (and residual Adds / Concats) as INT8 kernels: site -> why."""
        graph, int8 = self.graph, set(plan.int8_layers)
        if graph is None:
            return {site: "set by the plan" for site, p in plan.tensors.items() if p == "int8"}
        plain = self.div_free(plan)  # an unfolded smoothed input starts with a float Div
        active: dict[str, str] = {}
        quantized: set[str] = set()
        for name, out in graph.conv_outputs.items():
            if name not in int8 or out.site is None or out.site not in self.tensors:
                continue
            quantized.add(name)
            readers = _float_readers(out, plain)
            if readers:
                active.setdefault(out.site, f"output of INT8 conv {name} (read by {', '.join(dict.fromkeys(readers))})")
        for join in graph.joins:  # in graph order: a join fed by a quantized join is quantized too
            sites = [*join.inputs, join.output]
            fed = [p in quantized for p in join.producers]  # a product only when all its inputs are INT8 anyway
            if (all(fed) if join.op in PRODUCT_OPS else any(fed)) and all(s in self.tensors for s in sites):
                quantized.add(join.node)
                for site in sites:
                    active.setdefault(site, f"{'input' if site != join.output else 'output'} of {join.op} {join.node}")
        for site, precision in plan.tensors.items():  # data moved from a tensor the plan keeps float stays float
            if precision == "fp32":
                active.pop(site, None)
        for site, source in graph.moves.items():  # in graph order: data movement between quantized tensors
            if source in active and site in self.tensors:
                active.setdefault(site, f"moves data of {source} (one scale: ONNX Runtime moves uint8 data)")
        for site, precision in plan.tensors.items():  # the plan's own say
            if precision == "fp32":
                active.pop(site, None)
            else:
                active.setdefault(site, "set by the plan")
        return active

    def div_free(self, plan: Plan) -> set[str]:
        """The INT8 layers of `plan` whose input is quantized with no Div before it: unsmoothed, or
        smoothed with the factors folded into the producing op (FP32, or INT8 with per-channel
        weights: `tuner.apply._fold_smoothing`). Their input quantizer is the producer's output
        quantizer as far as ONNX Runtime is concerned."""
        def folds(name: str) -> bool:
            producer = self.smooth_folds.get(name)
            if producer is None:
                return False
            config = plan.config(producer)
            return not config.int8 or (config.weights == "per_channel" and not self.layers[producer].weight_only)

        return {n for n in plan.int8_layers if not plan.config(n).smooth or folds(n)}

    def quantized_silus(self, plan: Plan, sites: dict[str, str]) -> list[str]:
        """The nn.SiLU modules that run on uint8 data under `plan`: their input is quantized (a site
        in `sites`, from `output_sites`) and so is their output (a site too, or read only by plain
        INT8 layers, which quantize it)."""
        plain = self.div_free(plan)
        return [site for site, call in (self.graph.silus.items() if self.graph is not None else ())
                if call.source in sites and (site in sites or (
                    call.consumers and not call.others and all(c in plain for c in call.consumers)))]

    def tensor_qparams(self, site: str, plan: Plan) -> QParams:
        """A site's quantization: the scale of the INT8 layer reading it directly when there is one
        (one tensor, one scale), else its own range ('max', affine UINT8: what QLinearAdd takes).
        Sites that only move data from one another (`graph.same_scale`) share one scale."""
        graph = self.graph
        if graph is None:
            lo, hi = self.tensors[site].range("max", False)
            return compute_qparams(lo, hi, symmetric=False, qtype=UINT8)

        def root(s: str) -> str:
            return root(graph.same_scale[s]) if s in graph.same_scale else s

        group = [s for s in self.tensors if root(s) == root(site)]
        for member in ([] if graph.parts & set(group) else group):  # a layer reading one piece: not its range
            for layer in graph.direct_inputs.get(member, []):
                config = plan.config(layer)
                if config.int8 and not config.smooth and not config.symmetric and not self.layers[layer].weight_only:
                    return self.activation_qparams(layer, config.activation, False)
        lo, hi = self.tensors[root(site)].range("max", False)
        return compute_qparams(lo, hi, symmetric=False, qtype=UINT8)

    def shared_input(self, name: str, plan: Plan, sites: dict[str, str]) -> QParams | None:
        """The quantization of layer `name`'s input when that input is a quantized site (`sites`,
        from `output_sites`) that the layer reads directly: the site's, so that every reader of one
        tensor uses one scale (ONNX Runtime then requantizes nothing between them)."""
        config = plan.config(name)
        if self.graph is None or config.smooth or config.symmetric or self.layers[name].weight_only:
            return None
        for site, readers in self.graph.direct_inputs.items():
            if name in readers and site in sites:
                return self.tensor_qparams(site, plan)
        return None

    def runs_float(self, plan: Plan) -> dict[str, str]:
        """INT8 layers of `plan` that ONNX Runtime would still run in float, and why."""
        slow = {
            name: ("its input is symmetric INT8 [-127, 127]: the Clip between QuantizeLinear and "
                   "DequantizeLinear stops ONNX Runtime's INT8 kernel fusion")
            for name in plan.int8_layers if plan.config(name).symmetric and not self.layers[name].weight_only
        }
        plain = self.div_free(plan)
        for name, out in (self.graph.conv_outputs.items() if self.graph is not None else ()):
            placed = out.site in self.tensors and plan.tensors.get(out.site) != "fp32"
            if name in plan.int8_layers and name not in slow and _float_readers(out, plain) and not placed:
                slow[name] = out.reason or "its output cannot be quantized where a module returns it"
        return slow
    # -- quantization parameters -------------------------------------------------------------

    def activation_qparams(self, name: str, method: str, symmetric: bool, smooth: float = 0.0) -> QParams:
        info = self.layers[name]
        if info.weight_only:
            raise InvalidPlanError(f"layer {name!r} ({info.kind}) is weight-only: its input is indices, it has no activation range.")
        if smooth:  # the smoothed input x / s: its exact range follows from the per-channel min/max
            s = self.smoothing_factors(name, smooth)
            lo, hi = (info.channel_min / s).min().item(), (info.channel_max / s).max().item()
            if symmetric:
                lo, hi = -max(-lo, hi), max(-lo, hi)
        else:
            lo, hi = info.input.range(method, symmetric)
        return compute_qparams(lo, hi, symmetric=symmetric, qtype=INT8 if symmetric else UINT8)

    @functools.lru_cache(maxsize=None)  # noqa: B019  (the calibration lives as long as its cache should)
    def smoothing_factors(self, name: str, alpha: float) -> torch.Tensor:
        """SmoothQuant's per-input-channel divisors s_j = max|x_j|^a / max|W[:, j]|^(1 - a)."""
        info = self.layers[name]
        if info.weight_only:
            raise InvalidPlanError(f"layer {name!r} ({info.kind}) is weight-only: `smooth` does not apply to it.")
        act = torch.maximum(-info.channel_min, info.channel_max).clamp(min=1e-5)
        w = self._modules[name].weight.detach().float()
        w_cols = w.transpose(0, 1).reshape(w.shape[1], -1).abs().amax(1)
        if w_cols.numel() != act.numel():  # grouped convolutions: channels do not line up
            raise InvalidPlanError(f"layer {name!r} cannot be smoothed: its weight columns do not match its input channels.")
        return (act.pow(alpha) / w_cols.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)

    def weight(self, name: str, granularity: str, smooth: float = 0.0) -> tuple[QParams, torch.Tensor]:
        """The layer's weight quantization parameters and its quantize-dequantized weight (cached:
        plans that share a setting share the tensor). A smoothed weight has its input columns
        multiplied by the smoothing factors."""
        key = (name, granularity, smooth)
        if key not in self._weights:
            w = self._modules[name].weight.detach()
            if smooth:
                s = self.smoothing_factors(name, smooth)
                w = w * s.reshape(1, -1, *([1] * (w.dim() - 2)))
            qp = weight_qparams(w, granularity)
            self._weights[key] = (qp, fake_quantize(w, qp))
        return self._weights[key]

    def bias_shift(self, name: str, config: LayerConfig) -> torch.Tensor | None:
        """The measured mean output shift per output channel of layer `name` under `config` (the
        bias correction subtracts it), or None when `layer_report` has not measured it."""
        return self.layers[name].output_shift.get(replace(config, bias_correction=False).setting())

    # -- plans -------------------------------------------------------------------------------

    def check_plan(self, plan: Plan) -> None:
        _check_known(plan.layers, self.layers, "plan names layers that are not quantizable layers of this model")
        _check_known(plan.tensors, self.tensors,
                     "plan `tensors` names sites that are not tensors quanttune can quantize in this model")
        for name, config in plan.layers.items():
            if config.int8 and (config.smooth or config.bias_correction) and self.layers[name].weight_only:
                raise InvalidPlanError(
                    f"layer {name!r} is an {self.layers[name].kind}, a weight-only layer (its input is "
                    f"indices): `smooth` and `bias_correction` do not apply to it, but got "
                    f"smooth={config.smooth}, bias_correction={config.bias_correction}."
                )

    def uniform_plan(self, config: LayerConfig = LayerConfig()) -> Plan:
        return Plan.uniform(self.layers, config)

    def coverage(self, plan: Plan) -> dict[str, float]:
        """Share of MACs and of parameters in INT8, and the INT8 model's size in bytes."""
        total_macs = sum(info.macs for info in self.layers.values()) or 1
        int8 = [self.layers[n] for n in plan.int8_layers if n in self.layers]
        # a weight tied between layers (an embedding and its output head) is counted once
        unique = {_storage_key(self._modules[info.name].weight): info for info in int8}.values()
        int8_params = sum(info.params for info in unique)
        # int8 weights take one byte; each keeps a float scale per output channel / embedding row (upper bound)
        scales = sum(4 * info.weight_shape[0] for info in unique)
        slow = self.runs_float(plan)
        return {
            "macs": sum(info.macs for info in int8 if info.name not in slow) / total_macs,
            "planned_macs": sum(info.macs for info in int8) / total_macs,
            "params": int8_params / max(self.model_params, 1),
            "int8_bytes": self.model_bytes - 3 * int8_params + scales,
            "fp32_bytes": self.model_bytes,
        }


def _float_readers(out: ConvOutput, plain_int8: set[str]) -> list[str]:
    """What reads a conv's output other than the plain (unsmoothed) INT8 layers: each is a reason
    to quantize that output, or ONNX Runtime runs the conv in float."""
    return [*out.others, *(c for c in out.consumers if c not in plain_int8)]


def _check_known(named: Any, known: Any, what: str) -> None:
    unknown = sorted(set(named) - set(known))
    if unknown:
        some = ", ".join(list(known)[:8]) + (" ..." if len(known) > 8 else "")
        raise InvalidPlanError(f"{what}: {unknown}; the model's are: {some or 'none'}")


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.data_ptr(), tuple(t.shape), t.stride())


@torch.no_grad()
def calibrate(model: nn.Module, calibration: Any, *, max_bins: int = 4096) -> Calibration:
    """Run `model` once over `calibration` (an iterable of batches) and gather per-layer stats."""
    batches = as_batches(calibration)
    names = set(quantizable_layers(model))
    if not names:
        raise CalibrationError(
            f"{type(model).__name__} has no quantizable layer (nn.Linear, nn.Conv1d/2d/3d, nn.Embedding) below its root."
        )
    source, was_training = model, model.training
    model.eval()
    try:
        graph = read_graph(model, batches[0], names)
    finally:
        model.train(was_training)
    model = fold_batchnorm(model, graph.folds) if graph is not None and graph.folds else model
    modules = quantizable_layers(model)
    layers = {
        name: LayerInfo(name, type(m).__name__, tuple(m.weight.shape), m.weight.numel(),
                        weight_only=is_weight_only(m), input=TensorStats(max_bins))
        for name, m in modules.items()
    }

    def record(name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        info = layers[name]
        if info.weight_only:  # a table lookup: no input range, no multiply-accumulate
            info.calls += 1
            return
        info.input.update(args[0])
        info.update_channels(args[0], axis=-1 if isinstance(module, nn.Linear) else 1)
        info.calls += 1
        # MACs = output elements x multiply-adds per output element
        per_output = module.weight[0].numel() if isinstance(module, nn.modules.conv._ConvNd) else module.in_features
        info.macs += output.numel() * per_output

    tensors = {site: TensorStats(max_bins) for site in (graph.sites if graph is not None else [])}
    functional = graph.functional if graph is not None else {}

    def record_tensor(site: str, output: Any) -> Any:
        pieces = output if isinstance(output, (tuple, list)) and site in graph.parts else [output]
        if site in tensors and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in pieces):
            for t in pieces:
                tensors[site].update(t)
        else:  # not a float tensor: this site cannot be quantized
            tensors.pop(site, None)
        return output

    hooks = [m.register_forward_hook(lambda mod, a, out, n=name: record(n, mod, a, out)) for name, m in modules.items()]
    hooks += [model.get_submodule(site).register_forward_hook(lambda mod, a, out, s=site: record_tensor(s, out))
              for site in tensors if site not in functional]
    hooks += hook_functional(model, functional, {
        site: functools.partial(record_tensor, site) for site in tensors if site in functional})
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        for i, batch in enumerate(batches):
            try:
                call_model(model, batch)
            except Exception as exc:  # the user's data or model: say which batch and why
                raise CalibrationError(f"calibration batch {i} could not be run through the model: {exc}") from exc
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    unused = [n for n, info in layers.items() if info.calls == 0]
    for name in unused:  # a layer the forward never reaches cannot be calibrated: leave it out
        del layers[name]
    tensors = {site: stats for site, stats in tensors.items() if stats.count}
    folds = verify_folds(model, {k: v for k, v in graph.smooth_producers.items() if k in layers}, batches[0]) if graph else {}
    return Calibration(model, layers, batches, time.perf_counter() - start, source=source, graph=graph,
                       tensors=tensors, smooth_folds=folds)
