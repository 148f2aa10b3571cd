"""The per-layer ledger: for each layer, its decision, its measured error under each setting, and
the trials that showed whether it can be INT8 — the answer to "why did this layer fall back?"."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .plan import LayerConfig, Plan
from .report import LayerErrors, LayerReport
from .study import Budget, Outcome


def build_ledger(
    report: LayerReport,
    best: Plan,
    ranking: Sequence[str],
    outcomes: Sequence[Outcome],
    plans: dict[str, Plan],
    budget: Budget,
) -> dict[str, dict[str, Any]]:
    evaluated = [o for o in sorted(outcomes, key=lambda o: o.number) if o.state == "COMPLETE" and not o.reused]
    calib = report.calibration
    slow, sites, div_free = calib.runs_float(best), calib.output_sites(best), calib.div_free(best)
    graph = calib.graph
    ledger = {}
    for name, errors in report.layers.items():
        config = best.config(name)
        evidence = []
        for o in evaluated:
            plan = plans.get(o.plan_key)
            if plan is None:
                continue
            state = "int8" if plan.config(name).int8 else "fp32"
            evidence.append({"trial": o.number, "layer": state, "met": o.met, "drop": o.drop})
        rank = ranking.index(name) + 1 if name in ranking else None
        best_setting = errors.best()
        ledger[name] = {
            "decision": config.short(errors.weight_only),
            "kind": errors.kind,
            "weight_only": errors.weight_only,
            "sensitivity_rank": rank,
            "best_setting": errors.label(best_setting),
            "best_sqnr_db": _finite(errors.sqnr_of(best_setting)),
            "sqnr_db": {k: _finite(v) for k, v in errors.sqnr.items()},
            "macs_share": errors.macs / (sum(e.macs for e in report.layers.values()) or 1),
            "trials": evidence,
            "reason": _reason(errors, config, rank, len(ranking), evidence, budget),
            "batchnorm_folded": graph.folds.get(name) if graph else None,
            "output_quantized": _output_site(graph, name, sites),
            "runs_float": slow.get(name),
            # what kept it INT8 beyond the plain setting, by how many dB of output SQNR
            "recovery": _recovery(errors, config, calib.smooth_folds.get(name) if name in div_free else None),
        }
        if name in slow:
            ledger[name]["reason"] += f" Planned INT8, but ONNX Runtime runs it in float: {slow[name]}."
        for what, found in ledger[name]["recovery"].items():
            gain = f"+{found['gain_db']:.1f} dB" if found.get("gain_db") is not None else "gain not measured"
            alpha = f" at strength {found['alpha']:g}" if "alpha" in found else ""
            where = f", folded into {found['folded_into']}" if found.get("folded_into") else ""
            ledger[name]["reason"] += f" Kept by {what.replace('_', ' ')}{alpha} ({gain}{where})."
    return ledger


def _recovery(errors: LayerErrors, config: LayerConfig, fold: str | None) -> dict[str, Any]:
    found = errors.recovery(config)
    if "smoothquant" in found:
        found["smoothquant"]["folded_into"] = fold  # None: a Div before its QuantizeLinear
    return found


def _output_site(graph, name: str, sites: dict[str, str]) -> dict[str, str] | None:
    """Where the layer's output is quantized for the runtime, and why (None: it is not)."""
    out = graph.conv_outputs.get(name) if graph is not None else None
    if out is None or out.site not in sites:
        return None
    return {"site": out.site, "why": sites[out.site]}


def _finite(x: float) -> float | None:
    return round(x, 3) if math.isfinite(x) else None


def _reason(errors: LayerErrors, config: LayerConfig, rank, n, evidence, budget: Budget) -> str:
    sqnr = errors.sqnr
    met_int8 = [e for e in evidence if e["layer"] == "int8" and e["met"]]
    miss_int8 = [e for e in evidence if e["layer"] == "int8" and not e["met"]]
    met_fp32 = [e for e in evidence if e["layer"] == "fp32" and e["met"]]
    if config.int8:
        label = errors.label(config)
        if errors.weight_only:  # an embedding: its input is indices, only the table is INT8
            rows = "one scale per row" if config.weights == "per_channel" else "one scale for the table"
            what = f"INT8 table, weight-only {config.weights} ({rows}; its input is indices)"
        else:
            what = f"INT8 with {label}"
        why = f"{what} (output SQNR {sqnr[label]:.1f} dB, best measured of {len(sqnr)} settings)"
        if met_int8:
            return f"{why}; trial {met_int8[0]['trial']} met the budget with it in INT8."
        return f"{why}; no evaluated plan met the budget."
    if rank is None:
        return "FP32: excluded from INT8 by the search space (`exclude`)."
    why = f"FP32: sensitivity rank {rank} of {n} by end-to-end output error (best INT8 layer SQNR {max(sqnr.values()):.1f} dB)"
    if miss_int8 and met_fp32:
        miss = miss_int8[-1]
        return (f"{why}; trial {miss['trial']} with it INT8 missed the budget "
                f"(drop {budget.format(miss['drop'])} > {budget.describe()}), "
                f"trial {met_fp32[0]['trial']} with it FP32 met it.")
    if miss_int8:
        return f"{why}; every evaluated plan with it INT8 missed the budget."
    return f"{why}; no evaluated plan had it INT8 and met the budget."
