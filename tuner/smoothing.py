"""Folding SmoothQuant factors into the op that produces a layer's input, instead of a `Div`.

A smoothed layer computes `(x / s) @ (W * s)`. When `x` is the output of a LayerNorm, a Linear or a
convolution (its BatchNorm folded in; through ops that carry each channel on its own and scale with
it: ReLU, max pooling, reshapes, an attention's value path) and nothing else reads that output,
dividing the producer's weight and bias per output channel by `s` gives the layer `x / s` directly:
the deployed graph holds no Div, and the layer's QuantizeLinear reads the producer's output as
before. For conv -> ReLU -> conv that is cross-layer equalization with data-aware factors.

`tuner.graph.fold_candidates` finds such producers in the torch.export graph; `verify_folds` checks them on
one calibration batch (scale the producer by 1/s and the layer's weight columns by s for random s:
the model's output must not change), so a path the graph walk misjudges is simply not folded.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .batches import call_model, first_samples, output_tensors

FOLD_TOLERANCE = 1e-4  # relative change of the model output that still counts as "unchanged"
VERIFY_SAMPLES = 4  # the check runs on this many samples of one batch: no second pass over the data


def scale_output_channels(module: nn.Module, factors: torch.Tensor) -> bool:
    """Divide `module`'s output channels by `factors` (new parameters: shared tensors are left
    alone). False when it cannot (a LayerNorm without affine weights, channels that do not match)."""
    weight = getattr(module, "weight", None)
    if not isinstance(module, (nn.LayerNorm, nn.Linear, nn.modules.conv._ConvNd)) or weight is None:
        return False
    if weight.shape[0] != factors.numel() or (isinstance(module, nn.LayerNorm) and weight.dim() != 1):
        return False
    shape = (-1, *([1] * (weight.dim() - 1)))
    module.weight = nn.Parameter((weight.detach() / factors.reshape(shape)).to(weight.dtype), requires_grad=False)
    if module.bias is not None:
        module.bias = nn.Parameter((module.bias.detach() / factors).to(module.bias.dtype), requires_grad=False)
    return True


def scale_input_channels(module: nn.Module, factors: torch.Tensor) -> None:
    weight = module.weight
    shape = (1, -1, *([1] * (weight.dim() - 2)))
    module.weight = nn.Parameter((weight.detach() * factors.reshape(shape)).to(weight.dtype), requires_grad=False)


@torch.no_grad()
def verify_folds(model: nn.Module, candidates: dict[str, str], batch: Any, seed: int = 0) -> dict[str, str]:
    """The candidates whose fold leaves the model's output unchanged on the first samples of
    `batch` (random factors in [0.5, 2]); all at once first, one by one only when that fails."""
    if not candidates:
        return {}
    batch = first_samples(batch, VERIFY_SAMPLES)
    reference = output_tensors(call_model(model, batch))
    generator = torch.Generator().manual_seed(seed)

    def holds(subset: dict[str, str]) -> bool:
        trial = copy.deepcopy(model)
        for layer, producer in subset.items():
            consumer = trial.get_submodule(layer)
            factors = 2.0 ** (torch.rand(consumer.weight.shape[1], generator=generator) * 2 - 1)
            if not scale_output_channels(trial.get_submodule(producer), factors):
                return False
            scale_input_channels(consumer, factors)
        outputs = output_tensors(call_model(trial, batch))
        return all(_close(a, b) for a, b in zip(reference, outputs)) and len(outputs) == len(reference)

    if holds(candidates):
        return dict(candidates)
    return {layer: producer for layer, producer in candidates.items() if holds({layer: producer})}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.is_floating_point():
        return torch.equal(a, b)
    scale = float(a.abs().max()) or 1.0
    return float((a - b).abs().max()) <= FOLD_TOLERANCE * scale
