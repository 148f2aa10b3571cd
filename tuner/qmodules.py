"""Simulated INT8 layers and output quantizers (`tuner.apply.apply_plan` builds a model from them).

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
from .errors import InvalidPlanError
from .plan import LayerConfig
from .qdq_ops import quantize_dequantize
from .quant import QParams


class QuantizedLayer(nn.Module):
    """A Linear/Conv layer whose input activation and weights are quantized (simulated), or an
    Embedding whose table is quantized (`act_qparams=None`: weight-only)."""

    def __init__(self, layer: nn.Module, config: LayerConfig, act_qparams: QParams | None, weight_qparams: QParams,
                 fake_weight: torch.Tensor, input_divisor: torch.Tensor | None = None,
                 bias_shift: torch.Tensor | None = None):
        super().__init__()
        inner = copy.copy(layer)  # shares everything but the weight and the hooks with `layer`
        for attr, value in vars(layer).items():
            if "hooks" in attr and isinstance(value, dict):
                setattr(inner, attr, type(value)())
        inner._parameters = dict(layer._parameters)
        inner._parameters["weight"] = nn.Parameter(fake_weight, requires_grad=False)
        if bias_shift is not None:  # bias correction: the measured mean output shift taken out
            bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(bias_shift)
            inner._parameters["bias"] = nn.Parameter((bias - bias_shift.to(bias.dtype)).clone(), requires_grad=False)
        if act_qparams is not None and not isinstance(layer, nn.Linear) and inner.bias is not None:
            inner._parameters["bias"] = nn.Parameter(runtime_bias(inner.bias.detach(), act_qparams, weight_qparams),
                                                     requires_grad=False)
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
        self.folded_into: str | None = None  # the op its smoothing factors were folded into, if any

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


def runtime_bias(bias: torch.Tensor, act: QParams, weight: QParams) -> torch.Tensor:
    """A convolution's bias as the INT8 runtime adds it: to the int32 accumulator, in steps of input
    scale x weight scale (ONNX Runtime quantizes a QDQ Conv's float bias so when it fuses the conv
    into QLinearConv). Simulating that rounding took MobileNetV2's simulated logits from 0.032 to
    0.003 mean |difference| from the deployed ones, and its simulated score to the deployed one."""
    step = act.scale.reshape(()).float() * weight.scale.reshape(-1).float()
    if step.numel() not in (1, bias.numel()):  # per-group weights: no single step per channel
        return bias
    codes = torch.round(bias.float() / step).clamp(-(2**31), 2**31 - 1)
    return (codes * step).to(bias.dtype)


class OutputQuantizer:
    """A forward hook that quantize-dequantizes its module's output: a tensor the INT8 runtime
    needs quantized (a conv output feeding a residual Add, an Add's output ...). A hook, not a
    wrapper, so that module names (and so weight names in the export) stay the model's own. The
    same op runs in the simulation and in the export, so both compute the same numbers."""

    def __init__(self, qparams: QParams, why: str = ""):
        self.qparams = qparams
        self.scale, self.zero_point = float(qparams.scale), int(qparams.zero_point)
        self.why = why

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.quantize(output)

    def quantize(self, output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The quantize-dequantized tensor (each piece, with one scale, for a split's pieces)."""
        if isinstance(output, (tuple, list)):
            return type(output)(self.quantize(t) for t in output)
        return quantize_dequantize(output, self.scale, self.zero_point, self.qparams.qmin, self.qparams.qmax)

    def __repr__(self) -> str:
        return f"OutputQuantizer(scale={self.scale:.4g}, zero_point={self.zero_point}, why={self.why!r})"


class QuantizedSiLU(nn.Module):
    """SiLU as x * sigmoid(x) with the sigmoid's output quantized to uint8 on [0, 1] (a sigmoid's
    range, so no calibration). With the SiLU's input and output quantized as well, ONNX Runtime runs
    it as QLinearSigmoid + QLinearMul on uint8 data instead of a float Sigmoid and Mul between a
    DequantizeLinear and a QuantizeLinear (`Calibration.quantized_silus` says where)."""

    SCALE, ZERO_POINT, QMIN, QMAX = 1 / 255, 0, 0, 255

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * quantize_dequantize(torch.sigmoid(x), self.SCALE, self.ZERO_POINT, self.QMIN, self.QMAX)


def quantize_output(module: nn.Module, qparams: QParams, why: str = "") -> None:
    """Quantize `module`'s output from now on (`module.output_quantizer` tells how and why)."""
    module.output_quantizer = OutputQuantizer(qparams, why)
    module.register_forward_hook(module.output_quantizer)


def quantized_layer(module: nn.Module, name: str, config: LayerConfig, calibration: Calibration,
                    act: QParams | None = None) -> QuantizedLayer:
    """`module` (the layer called `name`) simulated under the INT8 `config`; `act` overrides its
    input's quantization (an input tensor quantized once, with one scale, for every reader)."""
    wqp, fake_weight = calibration.weight(name, config.weights, config.smooth)
    if calibration.layers[name].weight_only:  # an embedding: its input is indices
        return QuantizedLayer(module, config, None, wqp, fake_weight)
    act = act or calibration.activation_qparams(name, config.activation, config.symmetric, config.smooth)
    divisor = calibration.smoothing_factors(name, config.smooth) if config.smooth else None
    shift = None
    if config.bias_correction:
        shift = calibration.bias_shift(name, config)
        if shift is None:
            raise InvalidPlanError(f"layer {name!r}: the output shift for bias correction under "
                                   f"{config.setting()} was not measured (layer_report or apply_plan measure it).")
    return QuantizedLayer(module, config, act, wqp, fake_weight, divisor, shift)
