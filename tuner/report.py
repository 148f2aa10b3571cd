"""Per-layer error report from the calibration data alone (no user evaluation).

For every quantizable layer and every INT8 setting (activation calibration method x scheme x
weight granularity, plus SmoothQuant), the SQNR of the layer's output when that layer alone is
quantized: signal = FP32 output, noise = FP32 output - simulated INT8 output, accumulated over
the calibration batches in one extra forward pass (the ranges must be known first).
A weight-only layer (an embedding) is measured under its weight settings only (`per_channel`:
one scale per row, `per_tensor`), on the rows it outputs.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .batches import call_model
from .calibrate import Calibration, quantizable_layers
from .errors import InvalidArgumentError
from .histogram import METHODS
from .plan import GRANULARITIES, SCHEMES, LayerConfig, Plan
from .qmodules import quantized_layer

# SmoothQuant strengths measured for every layer (from the same calibration statistics): each
# layer takes the one its output error prefers. Strong outliers (GELU outputs feeding a
# transformer's FFN down-projection) want 0.75-0.85, mild ones 0.5.
SMOOTH_ALPHAS = (0.5, 0.6, 0.75, 0.85, 0.9, 0.95)
# ...but a smoothed Linear takes the strongest strength within this many dB of its best one, and
# no bias correction. A stronger strength moves error from the activations (rounding noise that
# differs for every input) into the weights (one fixed distortion, the same for every input),
# and similarity and ranking metrics pay for the first far more than output SQNR says. Measured
# on MiniLM, full calibration data and 4-5 random 75% subsets of it, at equal output SQNR
# (21-23 dB): 0.95 on every Linear dropped WordSim-353 by -0.46% to -0.98% (better than FP32)
# where each layer's SQNR-best strength dropped it by +0.25% to +1.85%; strongest-within-1-dB
# scored in between; bias correction on top made 9 of 10 paired plans worse. NNCF's transformer
# preset smooths MatMuls at 0.95 too. The window keeps a layer whose weights cannot take the
# outliers at a weaker strength (2 outlier channels x100 of 128: 0.95 loses 7.3 dB, 0.9 is
# taken). Convolutions keep their SQNR-best strength (not measured on convnets' metrics).
STRONGEST_SMOOTHING_WINDOW_DB = 6.0
# 0.95 is for Linears only: a convolution is measured at the others, as before 0.95 existed (on
# MobileNetV2 0.95 won one conv by 0.13 dB and the smoothed plan then missed a 0.25% budget by
# one image, 6 evaluations instead of 3: a change the metric cannot resolve).
LINEAR_ONLY_ALPHAS = (0.95,)
# A smoothed input costs a Div in the deployed graph unless the factors fold into the op that
# produces it (`Calibration.smooth_folds`: a LayerNorm or a Linear whose output only this layer
# reads). A Div between a convolution and the next QuantizeLinear stops ONNX Runtime from fusing
# that convolution into an INT8 kernel (measured: the digits example ran 2x slower than FP32 with
# every layer smoothed), so there smoothing must beat the best unsmoothed setting by this many dB.
SMOOTH_COST_DB = 3.0
# Elsewhere a Div is one elementwise op before the QuantizeLinear: the layer keeps its INT8
# kernel, and the Div costs a small share of the layer's time. Folded, smoothing costs nothing.
SMOOTH_DIV_COST_DB = 1.0
# Bias correction is free at run time, but its gain is measured on the data it was estimated on
# (in-sample, about 1/rows of the noise): it must gain this much to be chosen.
BIAS_CORRECTION_MIN_DB = 0.1
# A symmetric input is quantized to [-127, 127]: the Clip between its QuantizeLinear and
# DequantizeLinear stops ONNX Runtime from fusing the layer into an INT8 kernel (measured on
# MiniLM and on an EfficientNet squeeze-excitation conv: float compute on dequantized weights).
# So a symmetric input, too, must win by this many dB.
SYMMETRIC_COST_DB = 3.0
# Below this output SQNR (error power over 1% of the output's) a layer's best unsmoothed INT8
# setting leaves a large error: outlier channels crushing the others, what SmoothQuant is for (the
# digits example's fc2: 7.7 dB plain, 46.9 dB smoothed). The plain first plan smooths such layers
# only; above it the measured gains did not carry to the metric (MiniLM's layers are at 24-43 dB
# plain, and smoothing them scored worse on all three tasks measured) and cost a Div where the
# factors do not fold (`tuner.space.plan_for`).
NEEDS_SMOOTHING_DB = 20.0
# Beyond this output SQNR a layer's INT8 error is negligible (noise 1e-4 of the signal): higher
# figures are not worth a costlier setting, so the simplest setting above it wins.
ENOUGH_SQNR_DB = 40.0


def all_settings(
    methods: Sequence[str] = METHODS,
    schemes: Sequence[str] = SCHEMES,
    weights: Sequence[str] = GRANULARITIES,
    smooth: bool = True,
    alphas: Sequence[float] = SMOOTH_ALPHAS,
) -> list[LayerConfig]:
    """Every INT8 setting of a layer within the given choices (SmoothQuant at each strength in
    `alphas`). Each is also measured with bias correction (`LayerConfig.bias_correction`)."""
    settings = [LayerConfig("int8", m, s, w) for m, s, w in itertools.product(methods, schemes, weights)]
    if smooth:
        settings += [LayerConfig("int8", "max", s, w, a) for a, s, w in itertools.product(alphas, schemes, weights)]
    return settings


def weight_only_settings(settings: Iterable[LayerConfig]) -> list[LayerConfig]:
    """The settings of a weight-only layer within `settings`: one per weight granularity, the
    input's activation/scheme/smooth left at their defaults (they do not apply)."""
    return [LayerConfig("int8", weights=w) for w in dict.fromkeys(c.weights for c in settings)]


def _settings_of(module: nn.Module, weight_only: bool, settings: list[LayerConfig]) -> list[LayerConfig]:
    """The settings that apply to `module`: weight settings only for an embedding; no SmoothQuant
    for a grouped or depthwise convolution (its weight columns do not line up with its input
    channels, so there is no per-channel factor to move into them); `LINEAR_ONLY_ALPHAS` for a
    Linear only."""
    if weight_only:
        return weight_only_settings(settings)
    if getattr(module, "groups", 1) != 1:
        return [c for c in settings if not c.smooth]
    if not isinstance(module, nn.Linear):
        return [c for c in settings if c.smooth not in LINEAR_ONLY_ALPHAS]
    return settings


@dataclass
class LayerErrors:
    """One layer's measured output SQNR (dB) under each setting; higher is better."""

    name: str
    kind: str
    macs: int
    params: int
    sqnr: dict[str, float] = field(default_factory=dict)  # setting label -> dB
    settings: dict[str, LayerConfig] = field(default_factory=dict)
    weight_only: bool = False  # an embedding: only the `weights` of a setting matter
    smooth_cost_db: float = SMOOTH_COST_DB  # what a smoothed input costs here (0: the factors fold)

    @property
    def linear(self) -> bool:
        """An nn.Linear (or a subclass): where `STRONGEST_SMOOTHING_WINDOW_DB` applies."""
        return "Linear" in self.kind

    def label(self, config: LayerConfig) -> str:
        """The key of `config` in `sqnr` (for a weight-only layer, its weight granularity)."""
        return config.setting(self.weight_only)

    def sqnr_of(self, config: LayerConfig) -> float:
        return self.sqnr[self.label(config)]

    def cost(self, config: LayerConfig) -> float:
        """What a setting must gain (dB) to be preferred to a plain one."""
        return ((self.smooth_cost_db if config.smooth else 0.0) + (SYMMETRIC_COST_DB if config.symmetric else 0.0)
                + (BIAS_CORRECTION_MIN_DB if config.bias_correction else 0.0))

    def best(self, allowed: Iterable[LayerConfig] | None = None) -> LayerConfig:
        """The setting with the highest SQNR among the measured ones `allowed` names, each also
        with bias correction (ties: the first listed, i.e. the simplest; SQNR counts up to
        `ENOUGH_SQNR_DB`, less the setting's `cost`). A weight-only layer matches `allowed` on
        `weights` alone."""
        labels = [self.label(c) for c in allowed] if allowed is not None else list(self.sqnr)
        labels = [x for label in labels for x in (label, f"{label}/bc")]  # the bias-corrected twin
        labels = [label for label in dict.fromkeys(labels) if label in self.sqnr]
        if not labels:
            raise InvalidArgumentError(f"layer {self.name!r} was measured under none of the allowed settings.")

        def merit(label: str) -> float:
            return min(self.sqnr[label], ENOUGH_SQNR_DB) - self.cost(self.settings[label])

        best = self.settings[max(labels, key=merit)]
        return self._strongest_smoothing(best, labels) if best.smooth and self.linear else best

    def _strongest_smoothing(self, chosen: LayerConfig, labels: Iterable[str]) -> LayerConfig:
        """The strongest smoothing among `labels` like `chosen` (scheme, weights), without bias
        correction, within `STRONGEST_SMOOTHING_WINDOW_DB` of the best of them."""
        alike = {label: self.settings[label] for label in labels if self.settings[label].smooth
                 and self.settings[label] == replace(chosen, smooth=self.settings[label].smooth, bias_correction=False)}
        floor = max((self.sqnr[label] for label in alike), default=math.inf) - STRONGEST_SMOOTHING_WINDOW_DB
        near = [config for label, config in alike.items() if self.sqnr[label] >= floor]
        return max(near, key=lambda c: c.smooth, default=chosen)

    def recovery(self, config: LayerConfig) -> dict[str, Any]:
        """What kept this layer's error down under `config`, in dB of output SQNR: SmoothQuant
        (against the best unsmoothed setting) and bias correction (against the same setting
        uncorrected)."""
        found: dict[str, Any] = {}
        if not config.int8 or self.weight_only:
            return found
        if config.smooth:
            plain = [v for label, v in self.sqnr.items() if not self.settings[label].smooth]
            found["smoothquant"] = {"alpha": config.smooth, "gain_db": _gain(self.sqnr_of(config), max(plain, default=None))}
        if config.bias_correction:
            twin = self.sqnr.get(self.label(replace(config, bias_correction=False)))
            found["bias_correction"] = {"gain_db": _gain(self.sqnr_of(config), twin)}
        return found

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "macs": self.macs,
            "params": self.params,
            "weight_only": self.weight_only,
            "sqnr_db": {k: (round(v, 3) if math.isfinite(v) else v) for k, v in self.sqnr.items()},
        }


@dataclass
class LayerReport:
    """The error report of every layer, and the figures of a plan."""

    layers: dict[str, LayerErrors]
    calibration: Calibration
    seconds: float

    @property
    def convolutional(self) -> bool:
        """Whether the model has convolutions (then a Div can cost a layer its INT8 kernel)."""
        return any(e.kind.startswith("Conv") for e in self.layers.values())

    def best_plan(self, allowed: Iterable[LayerConfig] | None = None) -> Plan:
        """Every layer INT8 with its own best-measured setting."""
        allowed = list(allowed) if allowed is not None else None
        return Plan({name: errors.best(allowed) for name, errors in self.layers.items()})

    def coverage(self, plan: Plan) -> dict[str, float]:
        return self.calibration.coverage(plan)

    def table(self, plan: Plan | None = None) -> list[dict[str, Any]]:
        """Rows for printing: per layer, its best setting and SQNR, and its state in `plan`."""
        rows = []
        total_macs = sum(e.macs for e in self.layers.values()) or 1
        for name, errors in self.layers.items():
            best = errors.best()
            rows.append({
                "layer": name,
                "kind": errors.kind,
                "macs_share": errors.macs / total_macs,
                "best_setting": errors.label(best),
                "best_sqnr_db": errors.sqnr_of(best),
                "worst_sqnr_db": min(errors.sqnr.values()),
                "plan": plan.config(name).short(errors.weight_only) if plan is not None else None,
            })
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "layers": [e.to_dict() for e in self.layers.values()]}


def _gain(db: float, before: float | None) -> float | None:
    return round(db - before, 3) if before is not None and math.isfinite(db) and math.isfinite(before) else None


def _sum_of_squares(t: torch.Tensor) -> float:
    # float32 elementwise, float64 accumulation: as exact as a double copy, at a fraction of the cost
    return float(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2)


def _subsample(x: torch.Tensor, module: nn.Module, max_rows: int) -> torch.Tensor:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        rows = x.reshape(-1) if isinstance(module, nn.Embedding) else x.reshape(-1, x.shape[-1])
        return rows[:: max(1, -(-rows.shape[0] // max_rows))]
    samples = max(1, max_rows // 32)  # a convolution's sample holds many rows (positions)
    return x[:samples] if x.dim() > module.weight.dim() - 1 else x


@dataclass
class _Sums:
    """One layer's accumulators over the calibration rows it saw."""

    signal: float = 0.0
    rows: int = 0  # output rows (tokens, or positions x samples) per output channel
    noise: dict[str, float] = field(default_factory=dict)  # label -> sum of squared error
    shift: dict[str, torch.Tensor] = field(default_factory=dict)  # label -> per-channel sum of the error


@torch.no_grad()
def _measure(model: nn.Module, calibration: Calibration, layer_settings: dict[str, list[LayerConfig]],
             max_batches: int | None, max_rows: int) -> dict[str, _Sums]:
    """One pass over the calibration batches: per layer and setting, the squared output error and
    its per-output-channel sum when that layer alone is INT8 (`model` as calibrated)."""
    modules = {n: m for n, m in quantizable_layers(model).items() if n in layer_settings}
    variants = {
        name: [(config.setting(calibration.layers[name].weight_only), quantized_layer(module, name, config, calibration))
               for config in layer_settings[name]]
        for name, module in modules.items()
    }
    sums = {name: _Sums() for name in modules}

    def measure(name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _subsample(args[0], module, max_rows)
        ref = module.forward(x, *args[1:], **kwargs).float()  # .forward: no hooks, no recursion
        acc, axis = sums[name], (-1 if isinstance(module, (nn.Linear, nn.Embedding)) else 1)
        acc.signal += _sum_of_squares(ref)
        acc.rows += ref.numel() // ref.shape[axis]
        for label, qlayer in variants[name]:
            diff = qlayer(x, *args[1:], **kwargs).float() - ref
            acc.noise[label] = acc.noise.get(label, 0.0) + _sum_of_squares(diff)
            if not calibration.layers[name].weight_only:
                total = diff.movedim(axis, -1).reshape(-1, diff.shape[axis]).sum(0, dtype=torch.float64)
                acc.shift[label] = acc.shift[label] + total if label in acc.shift else total

    hooks = [
        m.register_forward_pre_hook(lambda mod, a, kw, n=name: measure(n, mod, a, kw), with_kwargs=True)
        for name, m in modules.items()
    ]
    was_training = model.training
    model.eval()
    try:
        for batch in calibration.batches[:max_batches]:
            call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sums


def _db(signal: float, noise: float) -> float:
    return math.inf if noise <= 0 else (-math.inf if signal == 0 else 10 * math.log10(signal / noise))


def measure_shifts(model: nn.Module, calibration: Calibration, wanted: dict[str, list[LayerConfig]],
                   max_batches: int | None = None, max_rows: int = 256) -> None:
    """Measure the output shifts bias correction needs for the (layer, setting) pairs in `wanted`
    that `layer_report` has not measured (a plan written by hand or loaded from a file)."""
    wanted = {name: [replace(c, bias_correction=False) for c in configs if calibration.bias_shift(name, c) is None]
              for name, configs in wanted.items()}
    wanted = {name: configs for name, configs in wanted.items() if configs}
    if not wanted:
        return
    sums = _measure(calibration.prepare(model), calibration, wanted, max_batches, max_rows)
    for name, acc in sums.items():
        for label, total in acc.shift.items():
            calibration.layers[name].output_shift[label] = (total / max(acc.rows, 1)).float()


def layer_report(
    model: nn.Module,
    calibration: Calibration,
    settings: Sequence[LayerConfig] | None = None,
    max_batches: int | None = None,
    max_rows: int = 256,
) -> LayerReport:
    """Measure each layer's output SQNR under each setting over the calibration batches, and the
    same with bias correction: the mean output shift per output channel that a setting causes is
    measured in the same pass (kept in `calibration.layers[name].output_shift`, for `apply_plan`),
    and removing it leaves the error's variance (sum of squares less rows x squared means).

    Each layer sees at most `max_rows` input rows per batch (tokens for a Linear, samples for a
    convolution): SQNR is a ratio of sums, and a subsample estimates it well at a fraction of the
    cost of running every setting on every row."""
    settings = [c for c in (settings if settings is not None else all_settings()) if not c.bias_correction]
    model = calibration.prepare(model)  # BatchNorms folded, as calibrated
    modules = {n: m for n, m in quantizable_layers(model).items() if n in calibration.layers}
    layer_settings = {name: _settings_of(m, calibration.layers[name].weight_only, settings) for name, m in modules.items()}
    start = time.perf_counter()
    sums = _measure(model, calibration, layer_settings, max_batches, max_rows)
    costs = smooth_costs(calibration)
    layers = {}
    for name in modules:
        info, acc = calibration.layers[name], sums[name]
        errors = LayerErrors(name, info.kind, info.macs, info.params, weight_only=info.weight_only,
                             smooth_cost_db=costs[name])
        for config in layer_settings[name]:
            label = errors.label(config)
            errors.sqnr[label], errors.settings[label] = _db(acc.signal, acc.noise[label]), config
        for config in layer_settings[name]:
            label = errors.label(config)
            if label not in acc.shift:
                continue
            mean = acc.shift[label] / max(acc.rows, 1)
            info.output_shift[label] = mean.float()
            corrected = replace(config, bias_correction=True)
            noise = max(acc.noise[label] - acc.rows * float(torch.sum(mean * mean)), 0.0)
            errors.sqnr[errors.label(corrected)], errors.settings[errors.label(corrected)] = _db(acc.signal, noise), corrected
        layers[name] = errors
    return LayerReport(layers, calibration, time.perf_counter() - start)


def smooth_costs(calibration: Calibration) -> dict[str, float]:
    """What smoothing each layer's input costs at run time, in dB it must gain: nothing where the
    factors fold into the producing op; `SMOOTH_COST_DB` where the Div would sit after a
    convolution's output, or where the input arrives quantized (a residual Add's or a Concat's
    INT8 output: smoothing dequantizes it, divides and quantizes it again; measured on MobileNetV2:
    two such layers left it 3% slower than ONNX Runtime's own quantizer at batch 32), or where the
    graph is unknown; else `SMOOTH_DIV_COST_DB`."""
    graph = calibration.graph
    folds = getattr(calibration, "smooth_folds", {})
    if graph is None:
        return {name: 0.0 if name in folds else SMOOTH_COST_DB for name in calibration.layers}
    after_conv = {layer for out in graph.conv_outputs.values() for layer in out.consumers}
    quantized = calibration.output_sites(calibration.uniform_plan())  # the tensors an all-INT8 plan quantizes
    requantized = {layer for site in quantized for layer in graph.direct_inputs.get(site, ())}
    return {name: 0.0 if name in folds else SMOOTH_COST_DB if name in after_conv | requantized else SMOOTH_DIV_COST_DB
            for name in calibration.layers}
