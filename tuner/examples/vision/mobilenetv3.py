"""MobileNetV3-Small (torchvision.models.mobilenetv3).

`features` = stem (Hardswish), 11 InvertedResidual blocks (`features.<i>.block.<j>`: expand,
depthwise, squeeze-excitation with Hardsigmoid in 9 of them, project; ReLU in the first three,
Hardswish after), a 1x1 conv; `classifier` = Linear, Hardswish, Dropout, Linear.
`mobilenet_v3_small(width_mult=0.25)` is a tiny one.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ._ops import Conv2dNormActivation, SqueezeExcitation, _make_divisible, init_mobilenet


class InvertedResidualConfig:
    """One MobileNetV3 block: kernel, expanded and output channels, SE or not, Hardswish ("HS") or ReLU."""

    def __init__(self, input_channels: int, kernel: int, expanded_channels: int, out_channels: int, use_se: bool,
                 activation: str, stride: int, dilation: int, width_mult: float) -> None:
        self.input_channels = self.adjust_channels(input_channels, width_mult)
        self.kernel = kernel
        self.expanded_channels = self.adjust_channels(expanded_channels, width_mult)
        self.out_channels = self.adjust_channels(out_channels, width_mult)
        self.use_se = use_se
        self.use_hs = activation == "HS"
        self.stride = stride
        self.dilation = dilation

    @staticmethod
    def adjust_channels(channels: int, width_mult: float) -> int:
        return _make_divisible(channels * width_mult, 8)


class InvertedResidual(nn.Module):
    """Expand, depthwise, squeeze-excitation with Hardsigmoid, project; the input added back in place
    when shapes allow."""

    def __init__(self, cnf: InvertedResidualConfig, norm_layer) -> None:
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        activation_layer = nn.Hardswish if cnf.use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(Conv2dNormActivation(cnf.input_channels, cnf.expanded_channels, kernel_size=1,
                                               norm_layer=norm_layer, activation_layer=activation_layer))
        stride = 1 if cnf.dilation > 1 else cnf.stride
        layers.append(Conv2dNormActivation(cnf.expanded_channels, cnf.expanded_channels, kernel_size=cnf.kernel,
                                           stride=stride, dilation=cnf.dilation, groups=cnf.expanded_channels,
                                           norm_layer=norm_layer, activation_layer=activation_layer))
        if cnf.use_se:
            squeeze_channels = _make_divisible(cnf.expanded_channels // 4, 8)
            layers.append(SqueezeExcitation(cnf.expanded_channels, squeeze_channels, scale_activation=nn.Hardsigmoid))
        layers.append(Conv2dNormActivation(cnf.expanded_channels, cnf.out_channels, kernel_size=1,
                                           norm_layer=norm_layer, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    def __init__(self, inverted_residual_setting: list[InvertedResidualConfig], last_channel: int,
                 num_classes: int = 1000, dropout: float = 0.2, in_channels: int = 3) -> None:
        super().__init__()
        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)  # torchvision's V3 norm settings
        first = inverted_residual_setting[0].input_channels
        layers: list[nn.Module] = [Conv2dNormActivation(in_channels, first, kernel_size=3, stride=2,
                                                        norm_layer=norm_layer, activation_layer=nn.Hardswish)]
        layers += [InvertedResidual(cnf, norm_layer) for cnf in inverted_residual_setting]
        lastconv_input = inverted_residual_setting[-1].out_channels
        lastconv_output = 6 * lastconv_input
        layers.append(Conv2dNormActivation(lastconv_input, lastconv_output, kernel_size=1, norm_layer=norm_layer,
                                           activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(lastconv_output, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        init_mobilenet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def mobilenet_v3_small(*, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0) -> MobileNetV3:
    """MobileNetV3-Small: 11 blocks, 9 with squeeze-excitation, Hardswish in the last 8."""
    conf = partial(InvertedResidualConfig, width_mult=width_mult)
    setting = [
        conf(16, 3, 16, 16, True, "RE", 2, 1),
        conf(16, 3, 72, 24, False, "RE", 2, 1),
        conf(24, 3, 88, 24, False, "RE", 1, 1),
        conf(24, 5, 96, 40, True, "HS", 2, 1),
        conf(40, 5, 240, 40, True, "HS", 1, 1),
        conf(40, 5, 240, 40, True, "HS", 1, 1),
        conf(40, 5, 120, 48, True, "HS", 1, 1),
        conf(48, 5, 144, 48, True, "HS", 1, 1),
        conf(48, 5, 288, 96, True, "HS", 2, 1),
        conf(96, 5, 576, 96, True, "HS", 1, 1),
        conf(96, 5, 576, 96, True, "HS", 1, 1),
    ]
    last_channel = InvertedResidualConfig.adjust_channels(1024, width_mult)
    return MobileNetV3(setting, last_channel, num_classes=num_classes, in_channels=in_channels)
