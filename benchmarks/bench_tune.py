"""`tune` on every bench case at 1%, 0.5% and 0.25% budgets (issue 16).

    python benchmarks/bench_tune.py [--budgets 0.01 0.005 0.0025] [--cases digits_cnn ...] [--baselines]

Cases: the bench cases (default), the derived MiniLM ones (minilm_simlex999, minilm_polarity) and
bench_onnx's vision models (resnet18, mobilenet_v2, mobilenet_v3_small, efficientnet_b0: trained on
the digits on first use, then cached).

Per case and budget: evaluations (baseline + plans + the ONNX Runtime check), FP32 layers, the
returned plan's drop, the FIRST plan's drop (every layer INT8 at its best-measured setting: how well
the calibration alone does, before any search), the deployed (ONNX Runtime) drop, and how many
planned INT8 layers run INT8 kernels. `--baselines` adds, at 1%, two naive strategies:
- naive full INT8: every layer INT8, activations affine per-tensor min-max, weights per-tensor;
- one-by-one fallback: naive, then one more layer FP32 (in model order) per evaluation until met.
"""

from __future__ import annotations

import argparse
import os
import time

from cases import CASES, load_case

from tuner import LayerConfig, apply_plan, calibrate, tune

BUDGETS = (0.01, 0.005, 0.0025)


def naive(case, model, batches, budget):
    baseline = case.evaluate(model)
    calib = calibrate(model, batches)
    plan = calib.uniform_plan(LayerConfig(activation="max", scheme="affine", weights="per_tensor"))
    drop = (baseline - case.evaluate(apply_plan(model, plan, calib))) / abs(baseline)
    return dict(evaluations=2, fp32=0, drop=drop, met=drop <= budget)


def one_by_one(case, model, batches, budget, max_evals=60):
    baseline = case.evaluate(model)
    calib = calibrate(model, batches)
    plan = calib.uniform_plan(LayerConfig(activation="max", scheme="affine", weights="per_tensor"))
    evaluations, fp32 = 1, []
    for name in [None, *calib.layers]:
        if name is not None:
            fp32.append(name)
        score = case.evaluate(apply_plan(model, plan.fallback(fp32), calib, share_weights=True))
        evaluations += 1
        drop = (baseline - score) / abs(baseline)
        if drop <= budget or evaluations >= max_evals:
            break
    return dict(evaluations=evaluations, fp32=len(fp32), drop=drop, met=drop <= budget)


def quanttune(case, model, batches, budget):
    r = tune(model, batches, case.evaluate, max_drop=budget, verbose=False, latency_runs=0)
    trials = sorted((t for t in r.trials if t["state"] == "COMPLETE"), key=lambda t: t["number"])
    kernels = r.deployment.kernels if r.deployment is not None else None
    techniques = {}
    for entry in r.ledger.values():
        for what in entry.get("recovery", {}):
            techniques[what] = techniques.get(what, 0) + 1
    return dict(evaluations=r.evaluations, fp32=len(r.fp32_layers), drop=r.drop, met=r.met,
                first=trials[0]["drop"] if trials else None, deployed=r.deployed_drop,
                kernels=f"{len(kernels.running_int8)}/{len(kernels.planned_int8)}" if kernels else "-",
                techniques=techniques, prepare=r.seconds["prepare"])


def pct(x):
    return f"{x:+.3%}" if x is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", type=float, nargs="+", default=BUDGETS)
    parser.add_argument("--cases", nargs="+", default=CASES)
    parser.add_argument("--baselines", action="store_true")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    print(f"{'case':<19}{'budget':>7}{'evals':>6}{'FP32':>5}{'drop':>9}{'first plan':>11}{'deployed':>10}"
          f"{'INT8 kernels':>13}{'met':>5}{'wall s':>8}  kept INT8 by")
    for name in args.cases:
        case = load_case(name)
        if case is None:
            continue
        model, batches = case.build_model(), case.calibration_data()
        for budget in args.budgets:
            start = time.perf_counter()
            r = quanttune(case, model, batches, budget)
            print(f"{name:<19}{budget:>7.2%}{r['evaluations']:>6}{r['fp32']:>5}{pct(r['drop']):>9}{pct(r['first']):>11}"
                  f"{pct(r['deployed']):>10}{r['kernels']:>13}{'yes' if r['met'] else 'no':>5}"
                  f"{time.perf_counter() - start:>8.1f}  {r['techniques'] or '-'}", flush=True)
        if args.baselines:
            for label, strategy in (("naive full INT8", naive), ("one-by-one fallback", one_by_one)):
                r = strategy(case, model, batches, 0.01)
                print(f"{name:<19}{'1.00%':>7}{r['evaluations']:>6}{r['fp32']:>5}{pct(r['drop']):>9}  ({label})")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
