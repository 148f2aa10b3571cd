"""`tune`: find the most-INT8 plan that stays within the accuracy budget, in few evaluations.

    from tuner import tune
    result = tune(model, calibration, evaluate, max_drop=0.01)

One call runs three steps (`_Tuning`): prepare (the study, the FP32 baseline, calibration and the
per-layer error report, each once per study), the search loop (one trial per step until a limit,
a stop request or nothing left to try), and the result (the best plan, verified on ONNX Runtime).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import optuna
from torch import nn

from .coordination import (WAIT_S, SharedBaseline, finisher, fp32_onnx, fp32_onnx_bytes, point_claim,
                           prepare_once, share_fp32_onnx, space_key)
from .errors import InvalidArgumentError, Stopped
from .ledger import build_ledger
from .options import ONNXRUNTIME, TuneOptions
from .plan import Plan
from .prepared import MemoryStore, SharedStore, dump_ranking, load_ranking, once
from .apply import apply_plan
from .result import TuneResult, reason_of, trial_rows, verify, warn
from .runtime_trials import RuntimeTrials
from .search import SAMPLE, WAIT, Strategy
from .sensitivity import output_sqnr, rank_layers
from .space import SearchSpace, plan_for
from .study import Budget, Outcome, open_study, run_trial, running_plans, stored_outcomes, worker_label

# a point another worker claimed counts as pending this long even before its trial shows as
# RUNNING (time enough to create the trial; a claimant that died meanwhile frees it after this)
TAKEN_GRACE_S = 10.0
MAX_IDLE_IN_A_ROW = 8  # sampled trials in a row that were pruned or repeated a plan: the sampler is done
NEAR_MISS = 4  # a full-INT8 plan that drops at most this many budgets tries another setting before FP32 layers
_STOP, _END, _AGAIN = object(), object(), object()  # what a search step did instead of a trial


def tune(
    model: nn.Module,
    calibration: Iterable[Any],
    evaluate: Callable[[nn.Module], float],
    *,
    options: TuneOptions | None = None,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    shared: SharedStore | None = None,
    worker: str | None = None,
    **option_values: Any,
) -> TuneResult:
    """Search quantization plans for `model` until the most-INT8 plan within the budget is found.

    `calibration` is an iterable of batches (tensor, tuple of positional inputs, or dict of keyword
    inputs); `evaluate(model) -> float` is the user's metric. What to search for is a `TuneOptions`
    (`options=`), or its fields as keywords (`max_drop=0.01`, `relative`, `higher_is_better`,
    `max_trials`, `timeout`, `seed`, `space`, `verbose`, `evaluate_on`, `verify`, `verify_tolerance`,
    `latency_runs`; given with `options`, they replace its values). The budget is `max_drop`,
    relative to the FP32 baseline unless `relative=False`. Trials are kept in Optuna `storage` (in
    memory when omitted): the same `storage` and `study_name` resume a study, and several processes
    may share it. `should_stop()` is checked before each trial; `on_trial(info)` is called after each.
    `evaluate_on="onnxruntime"` (the default) scores each plan on its exported file run by ONNX
    Runtime (`tuner.runtime_trials`). `verify` checks the chosen plan's file: what ONNX Runtime
    runs (INT8 kernels per layer) and how fast, against FP32, `latency_runs` timed calls per figure
    (0: no timing), and its score there (no extra evaluation when the search scored that file):
    `result.deployment`.
    `shared` (a `tuner.prepared.SharedStore`) shares the baseline, calibration, error report and
    ranking between the processes of one study, so that only the first computes them; `worker`
    names this process in its trials (default host:pid).
    """
    run = _Tuning(model, evaluate, _options(options, option_values),
                  shared if shared is not None else MemoryStore(), worker or worker_label(),
                  should_stop if should_stop is not None else (lambda: False), on_trial)
    run.prepare(calibration, storage, study_name)
    run.search()
    return run.result()


def _options(options: TuneOptions | None, values: dict[str, Any]) -> TuneOptions:
    if options is None:
        return TuneOptions(**values)
    if not isinstance(options, TuneOptions):
        raise InvalidArgumentError(f"`options` must be a TuneOptions, but got {type(options).__name__}.")
    return options.replace(**values) if values else options


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    pass


class _Tuning:
    """One call of `tune`: its three steps and the state they share."""

    def __init__(self, model: nn.Module, evaluate: Callable[[nn.Module], float], options: TuneOptions,
                 shared: SharedStore, worker: str, stop_asked: Callable[[], bool],
                 on_trial: Callable[[dict[str, Any]], None] | None) -> None:
        self.model, self.evaluate, self.options = model, evaluate, options
        self.shared, self.worker, self.stop_asked, self.on_trial = shared, worker, stop_asked, on_trial
        space = options.space
        self.space = space if isinstance(space, SearchSpace) else SearchSpace.from_dict(space)
        self.budget = Budget(float(options.max_drop), options.relative, options.higher_is_better)
        self.log = print if options.verbose else _quiet
        self.start = time.perf_counter()
        self.plans: dict[str, Plan] = {}  # every plan seen, by key (for the ledger)
        self.ranking: list[str] = []  # most sensitive first; measured only once a plan misses the budget
        self.evaluations = 0  # this process's evaluations of plans
        self.stopped = False
        self.taken_elsewhere: dict[str, float] = {}  # plan key -> when another worker's claim on it was seen
        self.idle_done = False  # this process has done its idle work (`_idle`)
        self.prep_s = self.search_s = 0.0
        self.runtime: RuntimeTrials | None = None  # plans evaluated on ONNX Runtime (`evaluate_on`)
        self.qualities: dict[str, float] = {}  # plan key -> model output SQNR on the calibration data (dB)

    # -- step 1: prepare ---------------------------------------------------------------------------
    def prepare(self, calibration: Iterable[Any], storage: Any, study_name: str | None) -> None:
        """Open the study; the FP32 baseline, the calibration and the error report (once per study)."""
        self.study = open_study(storage, study_name, self.options.seed)
        for key, value in self.options.budget().items():
            self.study.set_user_attr(key, value)
        self.baseline = SharedBaseline(self.study, self.model, self.evaluate, self.shared, self.worker,
                                       self.stop_asked)
        if self.baseline.value is not None:
            self.log(f"[quanttune] baseline {self.baseline.value:.6g} (budget: drop <= {self.budget.describe()})")
        else:
            self.log("[quanttune] another worker is evaluating the FP32 baseline")
        try:
            self.calib, self.report, here = prepare_once(self.model, calibration, self.space, self.shared,
                                                         self.stop_asked, self.log)
        except Stopped:
            self.log("[quanttune] stopped on request")
            raise
        self.study.set_user_attr("layers", list(self.report.layers))
        self.prep_s = time.perf_counter() - self.start
        self.log(f"[quanttune] {'calibrated' if here else 'loaded the calibration of'} {len(self.calib.layers)} "
                 f"layers ({self.calib.seconds:.2f}s), error report ({self.report.seconds:.2f}s)")
        self.n_candidates = sum(1 for n in self.report.layers if n not in self.space.exclude)
        if self.options.evaluate_on == ONNXRUNTIME:
            self.runtime = RuntimeTrials(self.model, self.calib, self.log)
        self.strategy = Strategy(self.space, self.n_candidates, lambda p: self.make_plan(p)[0].key(),
                                 slack=self.budget.max_drop / 2, near_miss=NEAR_MISS * self.budget.max_drop,
                                 quality=self.output_quality, smoothed_first=not self.report.convolutional)
        self.known: dict[str, Outcome] = stored_outcomes(self.study, self.budget)
        _remember(self.plans, self.known)

    def ranked(self) -> list[str]:
        """The layers by sensitivity, measured (or loaded from another worker) on first use."""
        if not self.ranking:
            def measure() -> bytes:
                full = plan_for(self.space.point(0), self.space, self.report, [])
                return dump_ranking(rank_layers(self.model, self.calib, full))

            data, measured = once(self.shared, f"ranking-{space_key(self.space)}", measure, self.stop_asked)
            self.ranking.extend(load_ranking(data))
            self.log(f"[quanttune] {'ranked' if measured else 'loaded the ranking of'} {len(self.ranking)} layers "
                     f"by end-to-end output error; most sensitive: {', '.join(self.ranking[:3])}")
        return self.ranking

    def output_quality(self, params: dict[str, Any]) -> float:
        """The model output SQNR (dB) of a point's plan on the calibration data (memoized)."""
        plan = self.make_plan(params)[0]
        if plan.key() not in self.qualities:
            self.qualities[plan.key()] = output_sqnr(self.model, self.calib, plan)
        return self.qualities[plan.key()]

    def make_plan(self, params: dict[str, Any]) -> tuple[Plan, float]:
        plan = plan_for(params, self.space, self.report, self.ranked() if params.get("fallback") else [])
        self.plans.setdefault(plan.key(), plan)
        return plan, self.calib.coverage(plan)["macs"]

    def build(self, plan: Plan) -> nn.Module:
        if self.runtime is not None:
            return self.runtime.build(plan)
        return apply_plan(self.model, plan, self.calib, share_weights=True)

    def score(self, candidate: nn.Module) -> Any:
        if self.runtime is not None:
            return self.runtime.evaluate(self.evaluate, candidate)
        return self.evaluate(candidate)

    # -- step 2: the search loop -------------------------------------------------------------------
    def search(self) -> None:
        """Trials until a limit, a stop request, or the sampler has nothing new to propose."""
        idle_in_a_row = 0
        while True:
            step = self._step()
            if step is _STOP or step is _END:
                self.stopped = step is _STOP
                break
            if step is _AGAIN:
                continue
            idle_in_a_row = idle_in_a_row + 1 if step is None or step.reused else 0
            if idle_in_a_row >= MAX_IDLE_IN_A_ROW:
                self.log("[quanttune] the sampler proposes no new plan that could beat the best: done")
                break
            if step is not None:  # None: pruned, it could not beat the best plan, so it was not evaluated
                self._record(step)
        self.search_s = time.perf_counter() - self.start - self.prep_s

    def _step(self) -> Any:
        """One trial (its `Outcome`, None if pruned), or `_STOP`, `_END` or `_AGAIN` (wait)."""
        if self._stop_requested():
            return _STOP
        if self._limit_reached():
            return _END
        try:
            now = time.monotonic()
            running = running_plans(self.study) | {k for k, t in self.taken_elsewhere.items() if now - t < TAKEN_GRACE_S}
            point = self.strategy.next_point(self.known, running)
            if point is None:
                return _END
            if self._stop_requested():  # asked again: choosing the point may take seconds (ranking)
                return _STOP
            if point == WAIT:  # every useful point is being evaluated elsewhere: wait for a result
                self._idle()
                time.sleep(WAIT_S)
                return _AGAIN
            propose = None if point == SAMPLE else point
            key = self.strategy.key_of(propose) if propose is not None else None
            if key is not None and not self.shared.claim(point_claim(key)):
                # another worker took this point a moment ago: it counts as pending, choose again now
                self.taken_elsewhere[key] = time.monotonic()
                return _AGAIN
            return self._trial(propose)
        except Stopped:
            self.log("[quanttune] stopped on request")
            return _STOP
        except optuna.exceptions.UpdateFinishedTrialError:  # the job ended and closed our trial meanwhile
            return _AGAIN

    def _idle(self) -> None:
        """Nothing to evaluate now: do once what the deployed check will need from any worker
        (the FP32 ONNX model its latency is measured against)."""
        if self.idle_done or not (self.options.verify and self.options.latency_runs):
            return
        self.idle_done = True
        share_fp32_onnx(self.shared, lambda: fp32_onnx_bytes(self.model, self.calib), self.log)

    def _stop_requested(self) -> bool:
        if self.stop_asked():
            self.log("[quanttune] stopped on request")
            return True
        return False

    def _limit_reached(self) -> bool:
        timeout, max_trials = self.options.timeout, self.options.max_trials
        if timeout is not None and time.perf_counter() - self.start > timeout:
            self.log(f"[quanttune] timeout of {timeout:g}s reached")
            return True
        self._refresh()  # other workers' results too
        if max_trials is not None and _evaluated(self.known) >= max_trials:
            self.log(f"[quanttune] max_trials={max_trials} reached")
            return True
        return False

    def _refresh(self) -> None:
        self.known.update(stored_outcomes(self.study, self.budget))
        _remember(self.plans, self.known)

    def _trial(self, propose: dict[str, Any] | None) -> Outcome | None:
        best = _best(self.known.values())
        beat = best.coverage if propose is None and best is not None and best.met else None
        return run_trial(self.study, lambda trial: self.space.suggest(trial, self.n_candidates), self.make_plan,
                         self.build, self.score, self.baseline, self.budget, self.known, propose, beat,
                         worker=self.worker)

    def _record(self, outcome: Outcome) -> None:
        self.evaluations += 0 if outcome.reused else 1
        self.known.update({k: v for k, v in stored_outcomes(self.study, self.budget).items() if k not in self.known})
        _remember(self.plans, self.known)
        best = _best(self.known.values())
        if self.runtime is not None:
            self.runtime.keep({best.plan_key} if best is not None else set())
        plan = self.plans[outcome.plan_key]
        _progress(self.log, outcome, plan, self.budget, best)
        if self.on_trial is not None:
            self.on_trial(_trial_info(outcome, plan, self.evaluations + self.baseline.evaluations, best))

    # -- step 3: the result ------------------------------------------------------------------------
    def result(self) -> TuneResult:
        """The best plan found (all FP32 when nothing could be evaluated), with its reason; verified
        on ONNX Runtime by the one process that finishes the study."""
        self.stopped = self.stopped or not finisher(self.shared, self.stop_asked, self.log, self._idle)
        self._refresh()
        baseline = self.baseline()  # known by now, unless the search stopped before it was (raises Stopped)
        self.evaluations += self.baseline.evaluations  # the baseline, if this process evaluated it
        self.evaluations += self.runtime.extra_calls if self.runtime is not None else 0
        best = _best(self.known.values())
        plan, reason = self._choice(best)
        result = TuneResult(
            met=bool(best and best.met), baseline=baseline, score=best.score if best else None,
            drop=best.drop if best else None, plan=plan, model=apply_plan(self.model, plan, self.calib),
            coverage=self.calib.coverage(plan), evaluations=self.evaluations, trials=trial_rows(self.study),
            ledger=build_ledger(self.report, plan, self.ranking, list(self.known.values()), self.plans, self.budget),
            reason=reason, study_name=self.study.study_name, budget=self.options.budget(),
            seconds={"prepare": round(self.prep_s, 3), "search": round(self.search_s, 3)}, stopped=self.stopped,
            calibration=self.calib, original=self.model,
        )
        if self.runtime is not None and self.runtime.reason is not None:
            warn(result, f"plans were scored on the PyTorch simulation, not on ONNX Runtime: {self.runtime.reason}",
                 stacklevel=4)
        try:
            if self.options.verify and best is not None and not self.stopped:
                runtime = self.runtime
                verify(result, self.evaluate, self.budget, self.report, self.options.verify_tolerance, self.log,
                       self.options.latency_runs, lambda: fp32_onnx(self.shared, self.stop_asked),
                       evaluated=runtime.files.get(best.plan_key) if runtime is not None else None,
                       runtime_error=runtime.evaluate_error if runtime is not None else None)
        finally:
            if self.runtime is not None:
                self.runtime.close()
        result.seconds["total"] = round(time.perf_counter() - self.start, 3)
        self.log(f"[quanttune] {'MET' if result.met else 'NOT MET'}: {result.reason}")
        return result

    def _choice(self, best: Outcome | None) -> tuple[Plan, str]:
        if best is None:  # nothing evaluated successfully: the safest plan, all FP32, with the reason
            failures = [o.error for o in self.known.values() if o.error]
            reason = ("no plan could be evaluated" + (f"; last error: {failures[-1]}" if failures else "")
                      + ("; stopped on request" if self.stopped else ""))
            return Plan.uniform(self.report.layers).fallback(self.report.layers), reason
        plan = self.plans[best.plan_key]
        return plan, reason_of(best, plan, self.budget, self.stopped)


def _remember(plans: dict[str, Plan], known: Mapping[str, Outcome]) -> None:
    """The plans of outcomes found in the study (resumed, or other workers'), for the ledger."""
    for outcome in known.values():
        if outcome.plan_key not in plans and outcome.plan is not None:
            plans[outcome.plan_key] = Plan.from_dict(outcome.plan)


def _evaluated(known: Mapping[str, Outcome]) -> int:
    return sum(1 for o in known.values() if o.state in ("COMPLETE", "FAIL"))


def _best(outcomes: Iterable[Outcome]) -> Outcome | None:
    done = [o for o in outcomes if o.state == "COMPLETE"]
    met = [o for o in done if o.met]
    if met:  # the most INT8, then the smallest drop, then the earliest
        return max(met, key=lambda o: (o.coverage, -o.drop, -o.number))
    return min(done, key=lambda o: (o.drop, o.number), default=None)


def _progress(log, outcome: Outcome, plan: Plan, budget: Budget, best: Outcome | None) -> None:
    if outcome.state == "FAIL":
        log(f"[quanttune] trial {outcome.number:>3} FAILED {plan.summary()}: {outcome.error}")
        return
    state = "met " if outcome.met else "miss"
    reuse = " (same plan as before: not re-evaluated)" if outcome.reused else f" [{outcome.duration_s:.2f}s]"
    log(f"[quanttune] trial {outcome.number:>3} {state} score {outcome.score:.6g} "
        f"drop {budget.format(outcome.drop)} int8 MACs {outcome.coverage:.1%} | {plan.summary()}{reuse}")


def _trial_info(outcome: Outcome, plan: Plan, evaluations: int, best: Outcome | None) -> dict[str, Any]:
    return {
        "number": outcome.number, "state": outcome.state, "score": outcome.score, "drop": outcome.drop,
        "coverage": outcome.coverage, "summary": plan.summary(), "evaluations": evaluations,
        "best_score": best.score if best else None, "best_drop": best.drop if best else None,
        "best_coverage": best.coverage if best else None, "met": bool(best and best.met),
    }
