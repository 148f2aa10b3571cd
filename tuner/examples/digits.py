"""A small CNN on scikit-learn's handwritten digits, with one outlier channel.

Trained in a few seconds, deterministically, and cached per process. After training, output
channel 7 of `fc1` is scaled up by `OUTLIER` and the matching `fc2` input column scaled down by
the same factor: the network computes the same function (ReLU commutes with a positive scale),
but `fc1` now has one weight row far larger than the rest and `fc2`'s input one channel far larger
than the rest, as real CNNs and transformers often do. Naive INT8 (per-tensor weights and
ranges) crushes every other row and channel and falls to ~16% accuracy; per-channel weights
alone still miss a 1% budget; a tuner has something to find.

    build_model()       -> the trained FP32 model (eval mode)
    calibration_data()  -> list of 4 batches of 32 training images, shape [32, 1, 8, 8]
    evaluate(model)     -> top-1 accuracy (%) on 540 held-out images
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

SEED = 0
OUTLIER = 200.0


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


@functools.cache
def _splits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    train, test = train_test_split(np.arange(len(y)), test_size=0.3, random_state=SEED, stratify=digits.target)
    return x[train], y[train], x[test], y[test]


@functools.cache
def _trained_state() -> dict[str, torch.Tensor]:
    x, y, _, _ = _splits()
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), 64):
            idx = order[i : i + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    with torch.no_grad():  # plant the outlier channel without changing the function
        channel = 7
        model.fc1.weight[channel] *= OUTLIER
        model.fc1.bias[channel] *= OUTLIER
        model.fc2.weight[:, channel] /= OUTLIER
    return {k: v.clone() for k, v in model.state_dict().items()}


def build_model() -> nn.Module:
    """The trained FP32 model (a fresh copy each call)."""
    model = DigitsNet()
    model.load_state_dict(_trained_state())
    return model.eval()


def calibration_data() -> list[torch.Tensor]:
    x, _, _, _ = _splits()
    picked = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED + 1))[:128]]
    return [picked[i : i + 32] for i in range(0, 128, 32)]


def evaluate(model: nn.Module) -> float:
    """Top-1 accuracy (%) on the held-out split."""
    _, _, x, y = _splits()
    return top1(model, x, y)


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy (%) of `model` on images `x` with labels `y`."""
    return 100.0 * float((model(x).argmax(1) == y).float().mean())
