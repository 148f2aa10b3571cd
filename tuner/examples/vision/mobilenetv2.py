"""MobileNetV2 (torchvision.models.mobilenetv2).

`features` = stem, 17 InvertedResidual blocks (1x1 expand, 3x3 depthwise, 1x1 project; the first two
are Conv2dNormActivation with ReLU6: `features.<i>.conv.<j>.0`), a 1x1 conv to 1280 channels;
`classifier` = Dropout, Linear. `mobilenet_v2()` is torchvision's (width_mult=1.0) but for
`in_channels` and `num_classes`; `mobilenet_v2(width_mult=0.25)` is a tiny one.
"""

from __future__ import annotations

import torch
from torch import nn

from ._ops import Conv2dNormActivation, _make_divisible, init_mobilenet

# t (expansion), c (channels), n (blocks), s (stride of the first block): torchvision's table
V2_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


class InvertedResidual(nn.Module):
    """MobileNetV2 block: optional 1x1 expansion, 3x3 depthwise conv (groups = channels), linear 1x1
    projection; the input is added back when stride and channels allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6))
        layers += [
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, activation_layer=nn.ReLU6),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, inverted_residual_setting=None,
                 round_nearest: int = 8, dropout: float = 0.2, in_channels: int = 3) -> None:
        super().__init__()
        setting = V2_SETTING if inverted_residual_setting is None else inverted_residual_setting
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [
            Conv2dNormActivation(in_channels, input_channel, stride=2, activation_layer=nn.ReLU6)
        ]
        for t, c, n, s in setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, expand_ratio=t))
                input_channel = output_channel
        features.append(
            Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1, activation_layer=nn.ReLU6)
        )
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        init_mobilenet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(*, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0, **kwargs) -> MobileNetV2:
    """MobileNetV2; at width_mult=1.0: 52 convolutions (17 depthwise), 52 BatchNorms, 10 residual adds."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, in_channels=in_channels, **kwargs)
