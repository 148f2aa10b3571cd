"""Issue 3 figures: `tune` against two baseline strategies on the real cases, same run.

    python benchmarks/bench_tune.py

- naive full INT8: every layer INT8, activations affine per-tensor min-max, weights per-tensor;
- one-by-one fallback: naive, then fall back one more layer (in model order) per evaluation
  until the budget is met;
- quanttune `tune` with defaults (evaluations include the baseline and the ONNX Runtime check).
"""

from __future__ import annotations

import time

from cases import CASES, load_case

from tuner import LayerConfig, apply_plan, calibrate, tune

BUDGET = 0.01


def naive(case, model, batches):
    start = time.perf_counter()
    baseline = case.evaluate(model)
    calib = calibrate(model, batches)
    plan = calib.uniform_plan(LayerConfig(activation="max", scheme="affine", weights="per_tensor"))
    score = case.evaluate(apply_plan(model, plan, calib))
    drop = (baseline - score) / abs(baseline)
    return dict(evaluations=2, fp32=0, drop=drop, coverage=1.0, met=drop <= BUDGET, seconds=time.perf_counter() - start)


def one_by_one(case, model, batches, max_evals=60):
    start = time.perf_counter()
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
        if drop <= BUDGET or evaluations >= max_evals:
            break
    coverage = calib.coverage(plan.fallback(fp32))["macs"]
    return dict(evaluations=evaluations, fp32=len(fp32), drop=drop, coverage=coverage, met=drop <= BUDGET,
                seconds=time.perf_counter() - start)


def quanttune(case, model, batches):
    start = time.perf_counter()
    r = tune(model, batches, case.evaluate, max_drop=BUDGET, verbose=False)
    trials = [t for t in r.trials if t["state"] == "COMPLETE" and t["duplicate_of"] is None]
    overhead = max((t["overhead_s"] / t["duration_s"] for t in trials if t["duration_s"]), default=0.0)
    return dict(evaluations=r.evaluations, fp32=len(r.fp32_layers), drop=r.drop, coverage=r.coverage["macs"],
                met=r.met, seconds=time.perf_counter() - start, deployed_drop=r.deployed_drop,
                overhead=overhead, prepare=r.seconds["prepare"])


def main() -> None:
    print(f"budget: {BUDGET:.0%} relative drop")
    header = f"{'case':<19}{'strategy':<22}{'evals':>6}{'FP32 layers':>12}{'drop':>9}{'INT8 MACs':>10}{'met':>5}{'wall s':>8}"
    print(header)
    for name in CASES:
        case = load_case(name)
        if case is None:
            continue
        model, batches = case.build_model(), case.calibration_data()
        for label, strategy in (("naive full INT8", naive), ("one-by-one fallback", one_by_one), ("quanttune tune", quanttune)):
            r = strategy(case, model, batches)
            print(f"{name:<19}{label:<22}{r['evaluations']:>6}{r['fp32']:>12}{r['drop']:>9.2%}{r['coverage']:>10.1%}"
                  f"{'yes' if r['met'] else 'no':>5}{r['seconds']:>8.1f}")
            if "overhead" in r:
                print(f"{'':<19}{'':<22}deployed drop {r['deployed_drop']:.2%}; tuner overhead per trial "
                      f"(all but evaluate) <= {r['overhead']:.1%} of the trial; one-off preparation "
                      f"(calibration + report) {r['prepare']:.1f}s")


if __name__ == "__main__":
    main()
