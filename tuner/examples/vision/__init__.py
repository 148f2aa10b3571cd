"""Vision models in the style of torchvision, trained in seconds on scikit-learn's digits.

Faithful copies of torchvision's classes (same modules, same attribute names, so the same qualified
layer names), with `in_channels` and `num_classes` arguments: PyPI's torchvision wheel is built
against CUDA torch and does not import with the CPU torch quanttune pins.

    resnet18(width=64)                   ResNet BasicBlocks: BatchNorm, residual adds
    mobilenet_v2(width_mult=1.0)         depthwise convs, ReLU6, inverted residuals
    mobilenet_v3_small(width_mult=1.0)   Hardswish, squeeze-excitation with Hardsigmoid
    efficientnet_b0(width_mult, depth_mult)  MBConv with SiLU, squeeze-excitation, stochastic depth
    densenet(growth_rate, block_config, ...) concatenation, BatchNorm before each conv
    shufflenet_v2(stages_repeats, stages_out_channels)  channel split, concat, channel shuffle

    model = trained_model("mobilenet_v2", width_mult=0.25)   # trained, cached per process
    batches, evaluate = digits_data(image_size=32)         # calibration batches, top-1 accuracy (%)
    train_on_digits(resnet18(in_channels=1, num_classes=10), epochs=4)   # any model, in place
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .densenet import DenseNet, densenet
from .efficientnet import EfficientNet, efficientnet_b0
from .mobilenetv2 import MobileNetV2, mobilenet_v2
from .mobilenetv3 import MobileNetV3, mobilenet_v3_small
from .resnet import ResNet, resnet18
from .shufflenetv2 import ShuffleNetV2, shufflenet_v2
from .training import SEED, digits_data, train_on_digits

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
    "efficientnet_b0": efficientnet_b0,
    "densenet": densenet,
    "shufflenet_v2": shufflenet_v2,
}

__all__ = [
    "ARCHITECTURES",
    "DenseNet",
    "EfficientNet",
    "MobileNetV2",
    "MobileNetV3",
    "ResNet",
    "ShuffleNetV2",
    "build_model",
    "densenet",
    "digits_data",
    "efficientnet_b0",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "resnet18",
    "shufflenet_v2",
    "train_on_digits",
    "trained_model",
]


def build_model(name: str, **config) -> nn.Module:
    """Architecture `name` for the digits (1 input channel, 10 classes), initialised from SEED."""
    if name not in ARCHITECTURES:
        raise ValueError(f"`name` must be one of {sorted(ARCHITECTURES)}, but got {name!r}.")
    torch.manual_seed(SEED)
    return ARCHITECTURES[name](in_channels=1, num_classes=10, **config)


@functools.cache
def _trained_state(name: str, image_size: int, epochs: int, config: tuple) -> dict[str, torch.Tensor]:
    model = train_on_digits(build_model(name, **dict(config)), epochs=epochs, image_size=image_size)
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_model(name: str, *, image_size: int = 32, epochs: int = 8, **config) -> nn.Module:
    """Architecture `name` (configured by `config`, e.g. width_mult=0.25) trained on the digits at
    `image_size`: a fresh copy in eval mode each call, trained once per process."""
    model = build_model(name, **config)
    model.load_state_dict(_trained_state(name, image_size, epochs, tuple(sorted(config.items()))))
    return model.eval()
