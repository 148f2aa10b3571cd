"""Simulated INT8 layers and `apply_plan`, which builds a new model from a plan.

A `QuantizedLayer` quantize-dequantizes its input with the plan's activation parameters and runs
the wrapped layer with quantize-dequantized weights: the numbers an INT8 runtime computes with.
It keeps the integer parameters (`act_qparams`, `weight_qparams`) for the ONNX exporter. An
embedding is weight-only: its input is indices, so only its table is quantized (`act_qparams`
is None).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .calibrate import Calibration
from .plan import LayerConfig, Plan
from .quant import QParams


class QuantizedLayer(nn.Module):
    """A Linear/Conv layer whose input activation and weights are quantized (simulated), or an
    Embedding whose table is quantized (`act_qparams=None`: weight-only)."""

    def __init__(self, layer: nn.Module, config: LayerConfig, act_qparams: QParams | None, weight_qparams: QParams,
                 fake_weight: torch.Tensor, input_divisor: torch.Tensor | None = None):
        super().__init__()
        inner = copy.copy(layer)  # shares everything but the weight and the hooks with `layer`
        for attr, value in vars(layer).items():
            if "hooks" in attr and isinstance(value, dict):
                setattr(inner, attr, type(value)())
        inner._parameters = dict(layer._parameters)
        inner._parameters["weight"] = nn.Parameter(fake_weight, requires_grad=False)
        self.layer = inner
        self.config = config
        self.act_qparams = act_qparams
        self.weight_qparams = weight_qparams
        self.weight_only = act_qparams is None
        self.register_buffer("act_scale", None if self.weight_only else act_qparams.scale.reshape(()).clone(),
                             persistent=False)
        self.register_buffer("act_zero_point", None if self.weight_only else act_qparams.zero_point.reshape(()).clone(),
                             persistent=False)
        # SmoothQuant: x / s per input channel (the weight columns were multiplied by s)
        self.channel_axis = -1 if isinstance(layer, nn.Linear) else 1
        self.register_buffer("input_divisor", input_divisor, persistent=False)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.input_divisor is not None:
            shape = [1] * x.dim()
            shape[self.channel_axis] = -1
            x = x / self.input_divisor.reshape(shape)
        if not self.weight_only and x.is_floating_point():
            x = torch.fake_quantize_per_tensor_affine(
                x.float(), self.act_scale, self.act_zero_point, self.act_qparams.qmin, self.act_qparams.qmax
            ).to(x.dtype)
        return self.layer(x, *args, **kwargs)

    def __getattr__(self, name: str):
        # code that reads the wrapped layer's attributes (weight, in_features, ...) keeps working
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer":
                raise
            return getattr(self._modules["layer"], name)

    def extra_repr(self) -> str:
        return self.config.short(self.weight_only)


def quantized_layer(module: nn.Module, name: str, config: LayerConfig, calibration: Calibration) -> QuantizedLayer:
    """`module` (the layer called `name`) simulated under the INT8 `config`."""
    wqp, fake_weight = calibration.weight(name, config.weights, config.smooth)
    if calibration.layers[name].weight_only:  # an embedding: its input is indices
        return QuantizedLayer(module, config, None, wqp, fake_weight)
    act = calibration.activation_qparams(name, config.activation, config.symmetric, config.smooth)
    divisor = calibration.smoothing_factors(name, config.smooth) if config.smooth else None
    return QuantizedLayer(module, config, act, wqp, fake_weight, divisor)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def apply_plan(model: nn.Module, plan: Plan, calibration: Calibration, *, share_weights: bool = False) -> nn.Module:
    """A new model running `plan`: INT8 layers simulated, every other layer untouched FP32.

    The caller's `model` is never modified. With `share_weights=True` the new model shares the
    caller's FP32 parameter tensors instead of copying them (fast; for throw-away trial models).
    """
    calibration.check_plan(plan)
    memo = {id(p): p for p in model.parameters()} if share_weights else {}
    new = copy.deepcopy(model, memo)
    for name in plan.int8_layers:
        _set_submodule(new, name, quantized_layer(new.get_submodule(name), name, plan.layers[name], calibration))
    return new.eval()
