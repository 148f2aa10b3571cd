"""Which point to evaluate next: measured knowledge first, Optuna's sampler last.

1. The first full-INT8 plan (`first_point`). For a model with convolutions, the plain plan: every
   layer INT8 at its best-measured setting without SmoothQuant (bias correction included), except
   where a layer's unsmoothed error is large (`tuner.space.plan_for`: an outlier channel). It is
   the fastest plan: a smoothed input costs a Div in the deployed graph where its factors cannot
   fold, and a Div behind a convolution costs it its INT8 kernel (EfficientNet-B0 with 30
   smoothed layers ran slower than FP32: 2.29 vs 2.13 ms). For a model without convolutions (a
   transformer), the smoothed plan: every Linear smoothed at its strongest measured strength
   (`report.STRONGEST_SMOOTHING_WINDOW_DB`); its Divs stand before Linears that keep their INT8
   kernels, and re-calibrated on random subsets of the calibration data it beat the plain plan on
   all three MiniLM tasks (WordSim-353 within 0.25% in 5 of 5 draws against 2 of 5, polarity 5 of
   6 against 2 of 5). Most models meet the budget here, and nothing can beat a met full-INT8
   plan: the search stops after one evaluation.
2. When it misses, the other of the two (the smoothed plan, or the plain one for a transformer),
   with every layer still INT8, before any FP32 layer: outlier channels are what smoothing fixes,
   and a Div costs less speed than a layer in FP32. When the closest
   full-INT8 plan missed by little (a drop of at most `near_miss`, a few times the budget), the
   alternative calibration method whose full-INT8 plan has the best model output SQNR on the
   calibration data (measured, no evaluation). With plans evaluated on ONNX Runtime
   (no separate deployed evaluation), these three plans fit in 4 evaluations with the baseline.
   Then the most sensitive layers fall back to FP32 at the measured best settings (smoothing
   included): 1, 2, 4, ... layers until the budget is met, then bisection between the last miss
   and the first hit finds the fewest.
3. Then a few alternative global settings with one layer fewer in FP32; a setting that meets the
   budget with slack (at most half of it used) is tried with fewer FP32 layers (none first, then
   bisection) before anything else, and finally Optuna's
   TPE sampler over the whole space, until `patience` trials bring no better plan (a space of one
   INT8 setting has nothing to sample: a plan there is its fallback count).

The sequence is a pure function of what the study knows, so a resumed or second worker replays
it without re-evaluating anything. With several workers on one study, the points other workers
are evaluating right now (`running`) are pending: a worker does not wait for them but takes the
most useful point not yet running, as if each pending point missed the budget. The fallback
counts that would follow a miss come first (the doubling), then the largest gap of fallback
counts not yet known or pending is split (so N workers bisect an interval into N + 1 parts),
then the alternative global settings. Only when none is left does a worker WAIT for a result.
The rules that pick the returned plan are unchanged (met first, then most INT8, then the
smallest drop), so the plan is as good as with one worker.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from .space import SearchSpace
from .study import Outcome

SAMPLE = "sample"  # let Optuna's sampler choose the point
WAIT = "wait"  # every useful point is being evaluated by another worker: wait for a result


class Strategy:
    def __init__(self, space: SearchSpace, n_layers: int, key_of: Callable[[dict[str, Any]], str], patience: int = 4,
                 slack: float = 0.0, near_miss: float = 0.0,
                 quality: Callable[[dict[str, Any]], float] | None = None, smoothed_first: bool = False):
        self.space = space
        self.smoothed_first = smoothed_first and space.smooth  # a model without convolutions: see the module doc
        self.quality = quality  # a point's model output SQNR on the calibration data (dB), measured: no evaluation
        self.slack = slack  # a met plan whose drop is at most this left room: try its settings with fewer FP32 layers
        self.near_miss = near_miss  # a full-INT8 plan that missed by at most this: try another setting before FP32
        self.n = n_layers
        self._key_of = key_of
        self._keys: dict[tuple[Any, ...], str] = {}
        self.patience = patience

    def key_of(self, point: dict[str, Any]) -> str:
        """The plan key of a point (memoized: the strategy asks for the same points often)."""
        memo = tuple(sorted(point.items()))
        if memo not in self._keys:
            self._keys[memo] = self._key_of(point)
        return self._keys[memo]

    def _alternative_settings(self) -> list[dict[str, Any]]:
        """Different global settings (overrides of a point): the measured best is not always the
        best for the metric."""
        found: list[dict[str, Any]] = [{}]  # the measured best itself (its fewest count is bisected first)
        if self.space.smooth:
            found.append({"smooth": False})
        for method in ("mse", "percentile-99.999", "entropy"):
            if method in self.space.activation:
                found.append({"activation": method, "smooth": False})
        return found

    def first_point(self) -> dict[str, Any]:
        """The first full-INT8 point: the smoothed one for a model without convolutions, else the
        plain one (SmoothQuant only where a layer needs it, `plan_for`)."""
        return self.space.point(0) if self.smoothed_first else self.space.point(0, smooth=False)

    def second_point(self) -> dict[str, Any]:
        """The other one of the plain and the smoothed full-INT8 points."""
        return self.space.point(0, smooth=False) if self.smoothed_first else self.space.point(0)

    def _alternatives(self, fallback: int) -> list[dict[str, Any]]:
        return [self.space.point(fallback, **o) for o in self._alternative_settings()[1:]]

    def _fewer_fp32(self, outcome: Callable[[dict[str, Any]], Outcome | None],
                    pending: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        """A setting whose fewest met fallback count k > 0 met with slack (drop <= `slack`), at
        fewer FP32 layers: none first, then bisection between its last miss (or pending) and k."""
        for overrides in self._alternative_settings():
            states: dict[int, Outcome | None] = {}  # None: pending
            for k in range(self.n):
                point = self.space.point(k, **overrides)
                found = outcome(point)
                if found is not None and found.state in ("COMPLETE", "FAIL"):
                    states[k] = found
                elif found is None and pending(point):
                    states[k] = None
            met = [k for k, o in states.items() if o is not None and o.met and o.state == "COMPLETE"]
            if not met or min(met) == 0 or states[min(met)].drop > self.slack:
                continue
            hi = min(met)
            lo = max((k for k, o in states.items() if k < hi), default=-1)  # missed, failed or pending
            if hi - lo > 1:
                return self.space.point(0 if lo < 0 else (lo + hi) // 2, **overrides)
        return None

    def next_point(self, known: Mapping[str, Outcome], running: Collection[str] = ()) -> dict[str, Any] | str | None:
        """The next point to evaluate, SAMPLE for the sampler, WAIT while only points that other
        workers are evaluating (plan keys in `running`) could help, or None when nothing better
        is plausible."""

        def outcome(point: dict[str, Any]) -> Outcome | None:
            return known.get(self.key_of(point))

        def pending(point: dict[str, Any]) -> bool:
            return bool(running) and outcome(point) is None and self.key_of(point) in running

        first = self.first_point()
        if outcome(first) is None and not pending(first):
            return first
        if outcome(first) is not None and outcome(first).met:
            return None
        if outcome(first) is not None and any(  # a met plan as INT8 as the full-INT8 one: nothing beats it
                o.met and o.state == "COMPLETE" and o.coverage >= outcome(first).coverage for o in known.values()):
            return None
        near = self._more_full_int8(outcome(first), outcome, pending)
        if near is not None:
            return near
        if not self.space.fallback or self.n == 0:  # nothing to do but wait for the full-INT8 plan
            return WAIT if pending(first) else None
        counts = self._counts(outcome, pending)
        step = self._fallback_step(counts)
        if step is not None:
            return self.space.point(step)
        met = [k for k, state in counts.items() if state == "met"]
        if not met:
            return WAIT if "pending" in counts.values() or pending(first) else None
        fewest = min(met)
        for point in self._alternatives(max(fewest - 1, 0)):
            if outcome(point) is None and not pending(point):
                return point
        retry = self._fewer_fp32(outcome, pending)
        if retry is not None:
            return retry
        if running:  # a pending point may still change the best plan: sample only once it is known
            if any(state == "pending" for k, state in counts.items() if k < fewest) or any(
                    pending(p) for p in self._alternatives(max(fewest - 1, 0))):
                return WAIT
        if len(self.space.settings()) == 1:  # one INT8 setting: a plan is its fallback count, and the
            return None                        # bisection has found the fewest: nothing left to sample
        if self._stale(known):
            return None
        return SAMPLE

    def _more_full_int8(self, first: Outcome | None, outcome: Callable[[dict[str, Any]], Outcome | None],
                        pending: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        """After the first full-INT8 plan missed, more full-INT8 points before any FP32 layer
        (unless known or pending): the other of plain and smoothed after any miss (outlier channels
        are what SmoothQuant fixes, and the report measured where it helps); then, when the closest
        full-INT8 plan so far missed by at most `near_miss`, the alternative calibration method
        whose plan has the best measured output SQNR (`quality`; without it, the first one): at a
        tight budget the metric's noise decides between plans of similar error."""
        if first is None or first.state != "COMPLETE" or first.met:
            return None
        tried = [self.first_point()]
        second = self.second_point()
        if self.space.smooth and self.key_of(second) != self.key_of(tried[0]):
            if outcome(second) is None:
                return None if pending(second) else second
            tried.append(second)
        outcomes = [outcome(p) for p in tried]
        if any(o.state != "COMPLETE" or o.met for o in outcomes) or min(o.drop for o in outcomes) > self.near_miss:
            return None
        keys = {self.key_of(p) for p in tried}
        methods = [p for p in self._alternatives(0) if self.key_of(p) not in keys]
        if self.quality is not None:  # a method that breaks some layer (WordSim: mse 9.8 dB, entropy -1.8) is no shot
            methods.sort(key=self.quality, reverse=True)
        if methods and outcome(methods[0]) is None and not pending(methods[0]):
            return methods[0]
        return None

    def _counts(self, outcome: Callable[[dict[str, Any]], Outcome | None],
                pending: Callable[[dict[str, Any]], bool]) -> dict[int, str]:
        """The state of each fallback count 0..n-1 that is known or pending: 'met', 'miss' (or
        failed) or 'pending'."""
        counts: dict[int, str] = {}
        for k in range(self.n):
            point = self.space.point(k)
            found = outcome(point)
            if found is not None and found.state in ("COMPLETE", "FAIL"):  # a failed plan: not tried again
                counts[k] = "met" if found.met else "miss"
            elif found is None and pending(point):
                counts[k] = "pending"
        return counts

    def _fallback_step(self, counts: dict[int, str]) -> int | None:
        """The next fallback count to evaluate: doubling until a count meets the budget
        (assuming pending counts miss), then splitting the largest open gap between the last
        miss and the first hit (pending counts are the gaps' ends)."""
        met = [k for k, state in counts.items() if state == "met"]
        hi = min(met) if met else None
        missed = [k for k, state in counts.items() if state == "miss" and (hi is None or k < hi)]
        lo = max(missed, default=0)
        if hi is None:  # exponential growth of the fallback count until a plan meets the budget
            k = 1
            while k < self.n:
                if k > lo and k not in counts:
                    return k
                k *= 2
            if self.n - 1 > lo and self.n - 1 not in counts:
                return self.n - 1
            top = self.n - 1
        else:
            top = hi
        ends = sorted({lo, top, *(k for k, state in counts.items() if state == "pending" and lo < k < top)})
        gaps = [(b - a, -a) for a, b in zip(ends, ends[1:]) if b - a > 1]
        if not gaps:
            return None
        width, neg_a = max(gaps)  # the widest gap; of equal ones the lowest (fewer layers in FP32)
        return -neg_a + width // 2

    def _stale(self, known: Mapping[str, Outcome]) -> bool:
        """True when the last `patience` trials did not improve the best met coverage."""
        history = sorted((o for o in known.values() if o.state != "RUNNING"), key=lambda o: o.number)
        if len(history) <= self.patience:
            return False
        best_before = max((o.coverage for o in history[: -self.patience] if o.met), default=-1.0)
        best_recent = max((o.coverage for o in history[-self.patience :] if o.met), default=-1.0)
        return best_recent <= best_before
