"""The building blocks torchvision's models share (torchvision.ops.misc and friends), rewritten here
because PyPI's torchvision wheel is built against CUDA torch and fails to import with CPU torch.

Module structure and attribute names follow torchvision, so that qualified layer names (what a plan
names) are the ones a torchvision user sees: `features.1.conv.0.0`, `layer1.0.conv1`, ...
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """`v` rounded to a multiple of `divisor` (at least `min_value`) and never more than 10% below
    `v`: how MobileNet and EfficientNet scale their channel counts by a width multiplier."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * v else rounded


class Conv2dNormActivation(nn.Sequential):
    """Conv2d -> norm -> activation as one Sequential (torchvision.ops.Conv2dNormActivation): the conv
    is `<name>.0`, the norm `<name>.1`, the activation `<name>.2`. The conv has no bias when a norm
    follows it (the norm's shift makes it redundant)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] | None = nn.ReLU,
        dilation: int = 1,
        inplace: bool | None = True,
        bias: bool | None = None,
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation if padding is None else padding
        bias = norm_layer is None if bias is None else bias
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, groups=groups,
                      bias=bias)
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            layers.append(activation_layer(**({} if inplace is None else {"inplace": inplace})))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (torchvision.ops.SqueezeExcitation): global average pool, two 1x1 convs
    `fc1`/`fc2` (convs, not Linears, as in torchvision), then the input scaled channel-wise by
    `scale_activation` of the result (Sigmoid; Hardsigmoid in MobileNetV3)."""

    def __init__(
        self,
        input_channels: int,
        squeeze_channels: int,
        activation: Callable[..., nn.Module] = nn.ReLU,
        scale_activation: Callable[..., nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(input))))
        return self.scale_activation(scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._scale(input) * input


class StochasticDepth(nn.Module):
    """Drops whole residual branches per sample while training (torchvision.ops.StochasticDepth,
    "row" mode), scaling the survivors by 1 / (1 - p); the identity in eval mode, which is what a
    quantizer sees."""

    def __init__(self, p: float, mode: str = "row") -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0 or mode not in ("row", "batch"):
            raise ValueError(f"`0 <= p <= 1` and `mode in ('row', 'batch')` must hold, but got {p=} and {mode=}.")
        self.p, self.mode = p, mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return input
        survival = 1.0 - self.p
        size = [input.shape[0]] + [1] * (input.ndim - 1) if self.mode == "row" else [1] * input.ndim
        noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival)
        return input * (noise / survival if survival > 0.0 else noise)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


def init_mobilenet(model: nn.Module) -> None:
    """torchvision's MobileNet initialisation (it decides how fast a short training converges)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
