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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .batches import call_model
from .calibrate import Calibration, quantizable_layers
from .errors import InvalidArgumentError
from .histogram import METHODS
from .plan import GRANULARITIES, SCHEMES, LayerConfig, Plan
from .qmodules import QuantizedLayer, quantized_layer

SMOOTH_ALPHA = 0.5
# A smoothed input costs a Div in the deployed graph, and a Div between a convolution and the
# next QuantizeLinear stops ONNX Runtime from fusing that convolution into an INT8 kernel
# (measured: the digits example ran 2x slower than FP32 with every layer smoothed). So smoothing
# is chosen only where it beats the best unsmoothed setting by this many dB.
SMOOTH_COST_DB = 3.0
# A symmetric input is quantized to [-127, 127]: the Clip between its QuantizeLinear and
# DequantizeLinear stops ONNX Runtime from fusing the layer into an INT8 kernel (measured on
# MiniLM and on an EfficientNet squeeze-excitation conv: float compute on dequantized weights).
# So a symmetric input, too, must win by this many dB.
SYMMETRIC_COST_DB = 3.0
# Beyond this output SQNR a layer's INT8 error is negligible (noise 1e-4 of the signal): higher
# figures are not worth a costlier setting, so the simplest setting above it wins.
ENOUGH_SQNR_DB = 40.0


def all_settings(
    methods: Sequence[str] = METHODS,
    schemes: Sequence[str] = SCHEMES,
    weights: Sequence[str] = GRANULARITIES,
    smooth: bool = True,
) -> list[LayerConfig]:
    """Every INT8 setting of a layer within the given choices."""
    settings = [LayerConfig("int8", m, s, w) for m, s, w in itertools.product(methods, schemes, weights)]
    if smooth:
        settings += [LayerConfig("int8", "max", s, w, SMOOTH_ALPHA) for s, w in itertools.product(schemes, weights)]
    return settings


def weight_only_settings(settings: Iterable[LayerConfig]) -> list[LayerConfig]:
    """The settings of a weight-only layer within `settings`: one per weight granularity, the
    input's activation/scheme/smooth left at their defaults (they do not apply)."""
    return [LayerConfig("int8", weights=w) for w in dict.fromkeys(c.weights for c in settings)]


def _settings_of(module: nn.Module, weight_only: bool, settings: list[LayerConfig]) -> list[LayerConfig]:
    """The settings that apply to `module`: weight settings only for an embedding; no SmoothQuant
    for a grouped or depthwise convolution (its weight columns do not line up with its input
    channels, so there is no per-channel factor to move into them)."""
    if weight_only:
        return weight_only_settings(settings)
    if getattr(module, "groups", 1) != 1:
        return [c for c in settings if not c.smooth]
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

    def label(self, config: LayerConfig) -> str:
        """The key of `config` in `sqnr` (for a weight-only layer, its weight granularity)."""
        return config.setting(self.weight_only)

    def sqnr_of(self, config: LayerConfig) -> float:
        return self.sqnr[self.label(config)]

    def best(self, allowed: Iterable[LayerConfig] | None = None) -> LayerConfig:
        """The setting with the highest SQNR among the measured ones `allowed` names (ties: the
        first listed, i.e. the simplest; SQNR counts up to `ENOUGH_SQNR_DB`, and smoothing must win
        by `SMOOTH_COST_DB`, a symmetric input by `SYMMETRIC_COST_DB`). A weight-only layer matches `allowed` on `weights` alone."""
        labels = [self.label(c) for c in allowed] if allowed is not None else list(self.sqnr)
        labels = [label for label in dict.fromkeys(labels) if label in self.sqnr]
        if not labels:
            raise InvalidArgumentError(f"layer {self.name!r} was measured under none of the allowed settings.")

        def merit(label: str) -> float:
            config = self.settings[label]
            cost = (SMOOTH_COST_DB if config.smooth else 0.0) + (SYMMETRIC_COST_DB if config.symmetric else 0.0)
            return min(self.sqnr[label], ENOUGH_SQNR_DB) - cost

        return self.settings[max(labels, key=merit)]

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


def _sum_of_squares(t: torch.Tensor) -> float:
    # float32 elementwise, float64 accumulation: as exact as a double copy, at a fraction of the cost
    return float(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2)


def _subsample(x: torch.Tensor, module: nn.Module, max_rows: int) -> torch.Tensor:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        rows = x.reshape(-1) if isinstance(module, nn.Embedding) else x.reshape(-1, x.shape[-1])
        return rows[:: max(1, -(-rows.shape[0] // max_rows))]
    samples = max(1, max_rows // 32)  # a convolution's sample holds many rows (positions)
    return x[:samples] if x.dim() > module.weight.dim() - 1 else x


@torch.no_grad()
def layer_report(
    model: nn.Module,
    calibration: Calibration,
    settings: Sequence[LayerConfig] | None = None,
    max_batches: int | None = None,
    max_rows: int = 256,
) -> LayerReport:
    """Measure each layer's output SQNR under each setting over the calibration batches.

    Each layer sees at most `max_rows` input rows per batch (tokens for a Linear, samples for a
    convolution): SQNR is a ratio of sums, and a subsample estimates it well at a fraction of the
    cost of running every setting on every row."""
    settings = list(settings) if settings is not None else all_settings()
    model = calibration.prepare(model)  # BatchNorms folded, as calibrated
    modules = {n: m for n, m in quantizable_layers(model).items() if n in calibration.layers}
    layer_settings = {name: _settings_of(m, calibration.layers[name].weight_only, settings) for name, m in modules.items()}
    variants: dict[str, list[tuple[str, QuantizedLayer]]] = {}
    for name, module in modules.items():
        weight_only = calibration.layers[name].weight_only
        variants[name] = [
            (config.setting(weight_only), quantized_layer(module, name, config, calibration))
            for config in layer_settings[name]
        ]
    signal = {name: 0.0 for name in modules}
    noise = {name: {label: 0.0 for label, _ in variants[name]} for name in modules}

    def measure(name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _subsample(args[0], module, max_rows)
        ref = module.forward(x, *args[1:], **kwargs).float()  # .forward: no hooks, no recursion
        signal[name] += _sum_of_squares(ref)
        for label, qlayer in variants[name]:
            noise[name][label] += _sum_of_squares(ref - qlayer(x, *args[1:], **kwargs).float())

    hooks = [
        m.register_forward_pre_hook(lambda mod, a, kw, n=name: measure(n, mod, a, kw), with_kwargs=True)
        for name, m in modules.items()
    ]
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for batch in calibration.batches[:max_batches]:
            call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    layers = {}
    for name in modules:
        info = calibration.layers[name]
        errors = LayerErrors(name, info.kind, info.macs, info.params, weight_only=info.weight_only)
        for config in layer_settings[name]:
            label = errors.label(config)
            n, s = noise[name][label], signal[name]
            errors.sqnr[label] = math.inf if n == 0 else (-math.inf if s == 0 else 10 * math.log10(s / n))
            errors.settings[label] = config
        layers[name] = errors
    return LayerReport(layers, calibration, time.perf_counter() - start)
