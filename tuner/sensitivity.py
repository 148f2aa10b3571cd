"""End-to-end sensitivity: how much the model's output degrades when one layer alone is INT8.

Layer-local error (the report) misses how an error propagates: on MiniLM the layer whose local
SQNR ranks 17th is the one whose fallback recovers the most accuracy. So before falling layers
back, each layer is quantized alone and the whole model's output SQNR is measured on the
calibration data (no user evaluation). One forward pass per layer, paid only when the first
plan misses the budget.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .batches import call_model, output_tensors
from .calibrate import Calibration
from .plan import Plan
from .apply import apply_plan


@torch.no_grad()
def output_sqnr_per_layer(model: nn.Module, calibration: Calibration, plan: Plan, max_batches: int = 2) -> dict[str, float]:
    """For each INT8 layer of `plan`: the model output SQNR (dB) with only that layer INT8."""
    batches = calibration.batches[:max_batches]
    reference = _outputs(model, batches)
    return {name: _sqnr(reference, _outputs(apply_plan(model, Plan({name: plan.layers[name]}), calibration,
                                                       share_weights=True), batches))
            for name in plan.int8_layers}


@torch.no_grad()
def output_sqnr(model: nn.Module, calibration: Calibration, plan: Plan, max_batches: int = 2) -> float:
    """The model output SQNR (dB) of the whole `plan` on the first `max_batches` calibration batches."""
    batches = calibration.batches[:max_batches]
    return _sqnr(_outputs(model, batches), _outputs(apply_plan(model, plan, calibration, share_weights=True), batches))


def _outputs(model: nn.Module, batches: list) -> list[torch.Tensor]:
    return [torch.cat([t.reshape(-1) for t in output_tensors(call_model(model, b))]).double() for b in batches]


def _sqnr(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    signal = sum(float(torch.sum(r * r)) for r in reference)
    noise = sum(float(torch.sum((r - o) ** 2)) for r, o in zip(reference, outputs))
    return math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal else -math.inf


def rank_layers(model: nn.Module, calibration: Calibration, plan: Plan) -> list[str]:
    """The INT8 layers of `plan`, most damaging to the model output first."""
    sqnr = output_sqnr_per_layer(model, calibration, plan)
    return sorted(sqnr, key=sqnr.__getitem__)
