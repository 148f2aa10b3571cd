"""Which point to evaluate next: measured knowledge first, Optuna's sampler last.

1. Every layer INT8 at its best-measured setting (fallback 0). Most models meet the budget here,
   and nothing can beat a met full-INT8 plan: the search stops after one evaluation.
2. Otherwise the most sensitive layers fall back to FP32: 1, 2, 4, ... layers until the budget
   is met, then bisection between the last miss and the first hit finds the fewest.
3. Then a few alternative global settings with one layer fewer in FP32, and finally Optuna's
   TPE sampler over the whole space, until `patience` trials bring no better plan.
The sequence is a pure function of what the study already knows, so a resumed or second worker
replays it without re-evaluating anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .space import SearchSpace
from .study import Outcome

SAMPLE = "sample"  # let Optuna's sampler choose the point


class Strategy:
    def __init__(self, space: SearchSpace, n_layers: int, key_of: Callable[[dict[str, Any]], str], patience: int = 4):
        self.space = space
        self.n = n_layers
        self.key_of = key_of
        self.patience = patience

    def _alternatives(self, fallback: int) -> list[dict[str, Any]]:
        """Different global settings at one fallback count: the measured best is not always the
        best for the metric."""
        points = []
        if self.space.smooth:
            points.append(self.space.point(fallback, smooth=False))
        for method in ("mse", "percentile-99.999", "entropy"):
            if method in self.space.activation:
                points.append(self.space.point(fallback, activation=method, smooth=False))
        return points

    def next_point(self, known: Mapping[str, Outcome]) -> dict[str, Any] | str | None:
        """The next point to evaluate, SAMPLE for the sampler, or None when nothing better is plausible."""

        def outcome(point: dict[str, Any]) -> Outcome | None:
            return known.get(self.key_of(point))

        first = self.space.point(0)
        if outcome(first) is None:
            return first
        if outcome(first).met:
            return None
        best_met = self._fewest_fallbacks(outcome)
        if best_met is None:
            return self._next_fallback(outcome)
        if best_met.get("search") is not None:
            return best_met["search"]
        fewest = best_met["fallback"]
        for point in self._alternatives(max(fewest - 1, 0)):
            if outcome(point) is None:
                return point
        if not self.space.fallback or self._stale(known):
            return None
        return SAMPLE

    def _next_fallback(self, outcome: Callable[[dict[str, Any]], Outcome | None]) -> dict[str, Any] | None:
        """Exponential growth of the fallback count until a plan meets the budget."""
        if not self.space.fallback or self.n == 0:
            return None
        k = 1
        while k < self.n:
            point = self.space.point(k)
            if outcome(point) is None:
                return point
            k *= 2
        last = self.space.point(self.n - 1)
        return last if outcome(last) is None else None

    def _fewest_fallbacks(self, outcome: Callable[[dict[str, Any]], Outcome | None]) -> dict[str, Any] | None:
        """Bisection state: the smallest met fallback count, or the next point to bisect."""
        met = [k for k in self._tried(outcome) if outcome(self.space.point(k)).met]
        if not met:
            return None
        hi = min(met)
        missed = [k for k in self._tried(outcome) if k < hi and not outcome(self.space.point(k)).met]
        lo = max(missed, default=0)
        if hi - lo > 1:
            return {"fallback": hi, "search": self.space.point((lo + hi) // 2)}
        return {"fallback": hi, "search": None}

    def _tried(self, outcome: Callable[[dict[str, Any]], Outcome | None]) -> list[int]:
        return [k for k in range(self.n) if outcome(self.space.point(k)) is not None
                and outcome(self.space.point(k)).state == "COMPLETE"]

    def _stale(self, known: Mapping[str, Outcome]) -> bool:
        """True when the last `patience` trials did not improve the best met coverage."""
        history = sorted((o for o in known.values() if o.state != "RUNNING"), key=lambda o: o.number)
        if len(history) <= self.patience:
            return False
        best_before = max((o.coverage for o in history[: -self.patience] if o.met), default=-1.0)
        best_recent = max((o.coverage for o in history[-self.patience :] if o.met), default=-1.0)
        return best_recent <= best_before
