"""Issue 2 figures: calibration time, time to apply a plan, per-layer report time.

    python benchmarks/bench_core.py
"""

from __future__ import annotations

import statistics
import time

from cases import CASES, load_case

from tuner import LayerConfig, apply_plan, calibrate, layer_report


def timed(fn, repeat=5):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(f"{'case':<20}{'layers':>7}{'calibrate s':>13}{'apply plan s':>14}{'apply (shared) s':>18}{'report s':>10}")
    for name in CASES:
        case = load_case(name)
        if case is None:
            continue
        model, batches = case.build_model(), case.calibration_data()
        calib_s = timed(lambda: calibrate(model, batches), repeat=3)
        calib = calibrate(model, batches)
        plan = calib.uniform_plan(LayerConfig(activation="mse"))
        apply_plan(model, plan, calib)  # warm the weight cache once, as a search does
        apply_s = timed(lambda: apply_plan(model, plan, calib))
        shared_s = timed(lambda: apply_plan(model, plan, calib, share_weights=True))
        report_s = timed(lambda: layer_report(model, calib), repeat=1)
        print(f"{name:<20}{len(calib.layers):>7}{calib_s:>13.3f}{apply_s:>14.3f}{shared_s:>18.3f}{report_s:>10.2f}")


if __name__ == "__main__":
    main()
