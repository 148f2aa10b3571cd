"""A conv-heavy CNN on scikit-learn's digits upsampled to 32x32, with one outlier channel.

The example where INT8 pays off on ONNX Runtime: four 3x3 convs of 32 to 128 channels (trained
with BatchNorm, folded into the convs once trained, so the example is plain convs; quanttune
would fold them itself, in an uploaded torch.export archive too) do ~19M
multiply-adds per image, enough that ONNX Runtime's INT8 kernels (QLinearConv) beat FP32 even at
batch 1 on one thread, where `tuner.examples.digits` (~0.3M) is all call overhead. Trained in about ten seconds
(three epochs, seeded, on one thread whatever the caller's setting, so the weights do not
depend on it) and cached per process.

The images and the split are those of `tuner.examples.digits` (30% held out, stratified),
upsampled once with bilinear `F.interpolate`. After training, the most active output channel of
`fc1` is scaled up by `OUTLIER` and the matching `fc2` input column scaled down by the same
factor, as in `tuner.examples.digits`: the same function, but one weight row of `fc1` and one
input channel of `fc2` far larger than the rest. Naive INT8 (per-tensor weights and ranges) falls
far below a 1% budget; a tuner has something to find.

    build_model()       -> the trained FP32 model (eval mode)
    calibration_data()  -> list of 4 batches of 32 training images, shape [32, 1, 32, 32]
    evaluate(model)     -> top-1 accuracy (%) on 540 held-out images
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from . import digits

SEED = 0
OUTLIER = 200.0
IMAGE_SIZE = 32
EPOCHS = 3


class DigitsConvNet(nn.Module):
    """32x32 -> conv1 32 -> pool -> conv2 64 -> pool -> conv3 128 -> conv4 128 -> pool -> fc1 -> fc2,
    each conv followed by BatchNorm (`batchnorm=True`, for training) or not (BatchNorm folded in)."""

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        widths = [(1, 32), (32, 64), (64, 128), (128, 128)]
        for i, (cin, cout) in enumerate(widths, 1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout) if batchnorm else nn.Identity())
        self.fc1 = nn.Linear(128 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)  # 16x16
        x = F.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)  # 8x8
        x = torch.relu(self.bn3(self.conv3(x)))
        x = F.max_pool2d(torch.relu(self.bn4(self.conv4(x))), 2)  # 4x4
        return torch.relu(self.fc1(torch.flatten(x, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


@functools.cache
def _splits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y, x_test, y_test = digits._splits()
    return _upsample(x), y, _upsample(x_test), y_test


def _upsample(images: torch.Tensor) -> torch.Tensor:
    return F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)


@functools.cache
def _trained_state() -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights whatever the caller's setting (sums split by thread differ)
    try:
        return _train()
    finally:
        torch.set_num_threads(threads)


def _train() -> dict[str, torch.Tensor]:
    x, y, _, _ = _splits()
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = DigitsConvNet(batchnorm=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=EPOCHS * -(-len(y) // 64))
    for _ in range(EPOCHS):
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), 64):
            idx = order[i : i + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            schedule.step()
    model = _fold_batchnorm(model.eval())
    with torch.no_grad():  # plant the outlier channel without changing the function
        channel = int(model.features(x).mean(0).argmax())  # the most active: it sets fc2's input range
        model.fc1.weight[channel] *= OUTLIER
        model.fc1.bias[channel] *= OUTLIER
        model.fc2.weight[:, channel] /= OUTLIER
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fold_batchnorm(trained: DigitsConvNet) -> DigitsConvNet:
    """The same function without BatchNorm: each one folded into its conv's weight and bias."""
    folded = DigitsConvNet()
    folded.load_state_dict({k: v for k, v in trained.state_dict().items() if k.startswith("fc")}, strict=False)
    for i in range(1, 5):
        conv, bn = getattr(trained, f"conv{i}"), getattr(trained, f"bn{i}")
        setattr(folded, f"conv{i}", fuse_conv_bn_eval(conv, bn))
    return folded.eval()


def build_model() -> nn.Module:
    """The trained FP32 model (a fresh copy each call)."""
    model = DigitsConvNet()
    model.load_state_dict(_trained_state())
    return model.eval()


def calibration_data() -> list[torch.Tensor]:
    """The images of `tuner.examples.digits.calibration_data`, upsampled: 4 batches [32, 1, 32, 32]."""
    return [_upsample(batch) for batch in digits.calibration_data()]


def evaluate(model: nn.Module) -> float:
    """Top-1 accuracy (%) on the held-out split."""
    _, _, x, y = _splits()
    return digits.top1(model, x, y)
