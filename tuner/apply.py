"""`apply_plan`: a new model running a plan, built from the simulated layers of `tuner.qmodules`."""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from .calibrate import Calibration
from .plan import Plan
from .functional import hook_functional
from .qmodules import OutputQuantizer, QuantizedLayer, QuantizedSiLU, quantize_output, quantized_layer
from .report import measure_shifts
from .smoothing import scale_output_channels


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def apply_plan(model: nn.Module, plan: Plan, calibration: Calibration, *, share_weights: bool = False) -> nn.Module:
    """A new model running `plan`: INT8 layers simulated, every other layer untouched FP32.

    BatchNorms are folded into their convolutions as in calibration, and the tensors the INT8
    runtime needs quantized beyond layer inputs (`Calibration.output_sites`) are quantized where
    a module returns them; a SiLU between quantized tensors quantizes its sigmoid too
    (`QuantizedSiLU`). The caller's `model` is never modified. With `share_weights=True` the new model shares the
    caller's FP32 parameter tensors instead of copying them (fast; for throw-away trial models).
    """
    calibration.check_plan(plan)
    measure_shifts(model, calibration, {n: [c] for n, c in plan.layers.items() if c.int8 and c.bias_correction})
    base = calibration.prepare(model)  # BatchNorms folded, as calibrated
    memo = {id(p): p for p in base.parameters()} if share_weights else {}
    new = copy.deepcopy(base, memo)
    sites = calibration.output_sites(plan)
    for name in plan.int8_layers:
        act = calibration.shared_input(name, plan, sites)
        _set_submodule(new, name, quantized_layer(new.get_submodule(name), name, plan.layers[name], calibration, act))
    div_free = calibration.div_free(plan)  # a smoothed layer there has a producer that takes its factors
    for name in plan.int8_layers:
        if plan.layers[name].smooth and name in div_free:
            _fold_smoothing(new, name, calibration.smooth_folds[name])
    for site in calibration.quantized_silus(plan, sites):
        _set_submodule(new, site, QuantizedSiLU())
    _quantize_outputs(new, plan, calibration, sites)
    return new.eval()


def _quantize_outputs(model: nn.Module, plan: Plan, calibration: Calibration, sites: dict[str, str]) -> None:
    """Quantize each site's tensor: on the module returning it, or, for a functional call's result
    in a module's own code (`tuner.functional`), inside that call."""
    functional = calibration.graph.functional if calibration.graph is not None else {}
    quantizers = {}
    for site, why in sites.items():
        if site in functional:
            quantizers[site] = OutputQuantizer(calibration.tensor_qparams(site, plan), why)
        else:
            quantize_output(model.get_submodule(site), calibration.tensor_qparams(site, plan), why)
    hook_functional(model, functional, {site: q.quantize for site, q in quantizers.items()})
    for site, quantizer in quantizers.items():  # shown on the module whose code makes the call
        owner = model.get_submodule(functional[site][0])
        owner.functional_quantizers = {**getattr(owner, "functional_quantizers", {}), site: quantizer}


def _fold_smoothing(model: nn.Module, name: str, producer: str) -> None:
    """Move layer `name`'s SmoothQuant Div into the op producing its input (`tuner.smoothing`):
    that op's output channels are divided by the factors instead. `Calibration.div_free` says which
    producers can: FP32 ones, and INT8 ones with per-channel weights (their codes stay the same,
    their scales are divided)."""
    layer, target = model.get_submodule(name), model.get_submodule(producer)
    factors = layer.input_divisor
    if isinstance(target, QuantizedLayer):
        wqp = target.weight_qparams
        if not scale_output_channels(target.layer, factors):
            return
        target.weight_qparams = dataclasses.replace(wqp, scale=wqp.scale / factors)
    elif not scale_output_channels(target, factors):
        return
    layer.input_divisor = None
    layer.folded_into = producer
