"""Train vision models on scikit-learn's digits, upsampled, in seconds and deterministically.

The images and the train/test split are those of `tuner.examples.digits` (8x8, scaled to [0, 1],
30% held out, stratified), upsampled with bilinear `F.interpolate` to `image_size` so that
ImageNet-style stems (stride-2 convs, pooling) still have pixels to work on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import digits

SEED = 0


@functools.cache
def _splits(image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y, x_test, y_test = digits._splits()

    def resize(images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] == image_size:
            return images
        return F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)

    return resize(x), y, resize(x_test), y_test


def digits_data(image_size: int = 32, *,
                batch_size: int = 256) -> tuple[list[torch.Tensor], Callable[[nn.Module], float]]:
    """(calibration batches, evaluate): 4 batches of 32 training images [32, 1, image_size, image_size]
    (the same images as `digits.calibration_data`), and evaluate(model) -> top-1 accuracy (%) on the
    540 held-out images, run `batch_size` at a time."""
    x, _, x_test, y_test = _splits(image_size)
    picked = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED + 1))[:128]]
    batches = [picked[i : i + 32] for i in range(0, 128, 32)]

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        correct = sum(int((model(x_test[i : i + batch_size]).argmax(1) == y_test[i : i + batch_size]).sum())
                      for i in range(0, len(y_test), batch_size))
        return 100.0 * correct / len(y_test)

    return batches, evaluate


def train_on_digits(model: nn.Module, *, epochs: int = 8, image_size: int = 32, lr: float = 3e-3,
                    batch_size: int = 64, seed: int = SEED) -> nn.Module:
    """Train `model` (in place) with Adam on the digits training split and return it in eval mode.

    Deterministic for a given initial model and seed. BatchNorm running statistics are recomputed
    over the whole training split at the end (exact averages instead of momentum estimates): with a
    few hundred steps, MobileNetV3's momentum of 0.01 would otherwise leave them far from the data."""
    x, y, _, _ = _splits(image_size)
    torch.manual_seed(seed)  # dropout and stochastic depth
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * -(-len(y) // batch_size))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            schedule.step()
    _recompute_batchnorm(model, x, batch_size)
    return model.eval()


@torch.no_grad()
def _recompute_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i : i + batch_size])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
