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
    reference = [torch.cat([t.reshape(-1) for t in output_tensors(call_model(model, b))]).double() for b in batches]
    signal = sum(float(torch.sum(r * r)) for r in reference)
    result = {}
    for name in plan.int8_layers:
        single = apply_plan(model, Plan({name: plan.layers[name]}), calibration, share_weights=True)
        noise = 0.0
        for batch, ref in zip(batches, reference):
            out = torch.cat([t.reshape(-1) for t in output_tensors(call_model(single, batch))]).double()
            noise += float(torch.sum((ref - out) ** 2))
        result[name] = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal else -math.inf
    return result


def rank_layers(model: nn.Module, calibration: Calibration, plan: Plan) -> list[str]:
    """The INT8 layers of `plan`, most damaging to the model output first."""
    sqnr = output_sqnr_per_layer(model, calibration, plan)
    return sorted(sqnr, key=sqnr.__getitem__)
