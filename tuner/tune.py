"""`tune`: find the most-INT8 plan that stays within the accuracy budget, in few evaluations.

    from tuner import tune
    result = tune(model, calibration, evaluate, max_drop=0.01)
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from torch import nn

from .batches import as_batches
from .calibrate import Calibration, calibrate
from .deployment import Deployment
from .errors import EvaluationError, InvalidArgumentError
from .ledger import build_ledger
from .plan import Plan
from .qmodules import apply_plan
from .report import LayerReport, layer_report
from .prepared import MemoryStore, SharedStore, Stopped, dump_prepared, dump_ranking, load_prepared, load_ranking, once
from .search import SAMPLE, WAIT, Strategy
from .sensitivity import rank_layers
from .space import SearchSpace, plan_for
from .study import Budget, Outcome, open_study, run_trial, running_plans, stored_outcomes, worker_label

WAIT_S = 0.25  # how often a worker with nothing to evaluate looks for other workers' results
FINISHER_CHECK_S = 5.0  # how often a worker waiting for the one finishing the study checks that it lives


MAX_IDLE_IN_A_ROW = 8  # sampled trials in a row that were pruned or repeated a plan: the sampler is done


@dataclass
class TuneResult:
    met: bool
    baseline: float
    score: float | None
    drop: float | None
    plan: Plan
    model: nn.Module
    coverage: dict[str, float]
    evaluations: int
    trials: list[dict[str, Any]]
    ledger: dict[str, dict[str, Any]]
    reason: str
    study_name: str
    budget: dict[str, Any]
    seconds: dict[str, float]
    stopped: bool = False
    deployed_score: float | None = None
    deployed_drop: float | None = None
    warnings: list[str] = field(default_factory=list)
    deployment: Deployment | None = None  # the deployed check: ONNX Runtime's kernels per layer, latency vs FP32
    calibration: Calibration | None = field(default=None, repr=False)
    original: nn.Module | None = field(default=None, repr=False)
    onnx: bytes | None = field(default=None, repr=False)  # the model `_verify` exported and measured

    @property
    def int8_layers(self) -> list[str]:
        return self.plan.int8_layers

    @property
    def fp32_layers(self) -> list[str]:
        return self.plan.fp32_layers

    def export_onnx(self, path: str | Path) -> Path:
        """Write the chosen plan as an ONNX QDQ model that ONNX Runtime executes in INT8."""
        from .onnx_export import export_onnx

        return export_onnx(self.original, self.plan, self.calibration, path)

    def to_dict(self) -> dict[str, Any]:
        """The report: figures, plan, per-layer ledger and trials (JSON-serialisable)."""
        return {
            "met": self.met, "reason": self.reason, "baseline": self.baseline, "score": self.score,
            "drop": self.drop, "deployed_score": self.deployed_score, "deployed_drop": self.deployed_drop,
            "budget": self.budget, "coverage": self.coverage, "evaluations": self.evaluations,
            "int8_layers": self.int8_layers, "fp32_layers": self.fp32_layers, "study_name": self.study_name,
            "stopped": self.stopped, "seconds": self.seconds, "warnings": self.warnings,
            "deployment": self.deployment.to_dict() if self.deployment is not None else None,
            "plan": self.plan.to_dict(), "ledger": self.ledger, "trials": self.trials,
        }

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write `model.onnx`, `plan.json` and `report.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"plan.json": directory / "plan.json", "report.json": directory / "report.json"}
        paths["plan.json"].write_text(self.plan.to_json())
        paths["report.json"].write_text(json.dumps(self.to_dict(), indent=2, default=_json_default))
        if self.onnx is not None:  # the very file verified on ONNX Runtime: no second export
            paths["model.onnx"] = directory / "model.onnx"
            paths["model.onnx"].write_bytes(self.onnx)
        else:
            paths["model.onnx"] = self.export_onnx(directory / "model.onnx")
        return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _check_args(max_drop: float, relative: bool, max_trials: int | None, timeout: float | None,
                latency_runs: int = 0) -> None:
    if not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) or max_drop < 0 or (relative and max_drop >= 1):
        rule = "0 <= max_drop < 1" if relative else "0 <= max_drop"
        raise InvalidArgumentError(f"`{rule}` must hold, but got {max_drop=}.")
    if max_trials is not None and (not isinstance(max_trials, int) or max_trials < 1):
        raise InvalidArgumentError(f"`max_trials >= 1` must hold, but got {max_trials=}.")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise InvalidArgumentError(f"`timeout > 0` (seconds) must hold, but got {timeout=}.")
    if not isinstance(latency_runs, int) or isinstance(latency_runs, bool) or latency_runs < 0:
        raise InvalidArgumentError(f"`latency_runs >= 0` must hold, but got {latency_runs=}.")


def _baseline(study: optuna.Study, model: nn.Module, evaluate: Callable[[Any], float], shared: SharedStore,
              worker: str) -> tuple[float | None, int]:
    """The FP32 score, evaluated once per study (kept in its storage). None while another worker
    is evaluating it (`shared` decides who does)."""
    if "baseline" in study.user_attrs:
        return float(study.user_attrs["baseline"]), 0
    if not shared.claim("baseline"):
        return None, 0
    try:
        baseline = float(evaluate(model))
        if not math.isfinite(baseline):
            raise EvaluationError(f"evaluating the FP32 baseline returned {baseline}, not a finite number.")
    except EvaluationError:
        shared.release("baseline")
        raise
    except Exception as exc:
        shared.release("baseline")
        raise EvaluationError(f"evaluating the FP32 baseline failed: {type(exc).__name__}: {exc}") from exc
    if baseline == 0:
        warnings.warn("the FP32 baseline is 0: a relative budget allows no loss at all", stacklevel=3)
    study.set_user_attr("baseline", baseline)
    study.set_user_attr("baseline_worker", worker)
    shared.save("baseline", repr(baseline).encode())
    return baseline, 1


class _Baseline:
    """The study's baseline, waited for when another worker is evaluating it (or evaluated here
    when that worker died and its claim was taken over)."""

    def __init__(self, study, model, evaluate, shared, worker, should_stop) -> None:  # noqa: ANN001
        self.study, self.model, self.evaluate, self.shared, self.worker = study, model, evaluate, shared, worker
        self.should_stop = should_stop
        self.value, self.evaluations = _baseline(study, model, evaluate, shared, worker)

    def __call__(self) -> float:
        while self.value is None:
            self.value, evaluated = _baseline(self.study, self.model, self.evaluate, self.shared, self.worker)
            self.evaluations += evaluated
            if self.value is None:
                if self.should_stop():
                    raise Stopped("stopped while another worker evaluated the FP32 baseline")
                time.sleep(WAIT_S)
        return self.value


def _prepare(model: nn.Module, calibration: Iterable[Any], space: SearchSpace, shared: SharedStore,
             should_stop: Callable[[], bool], log) -> tuple[Calibration, LayerReport, bool]:  # noqa: ANN001
    """Calibration and the per-layer report: computed by the first worker of the study, loaded by
    the others (and by a resumed search). Returns them and whether they were computed here."""
    computed: list[tuple[Calibration, LayerReport]] = []
    batches = as_batches(calibration)

    def compute() -> bytes:
        calib = calibrate(model, batches)
        unknown = sorted(set(space.exclude) - set(calib.layers))
        if unknown:
            raise InvalidArgumentError(f"space `exclude` names layers the model does not have: {unknown}.")
        report = layer_report(model, calib, space.settings())
        computed.append((calib, report))
        try:
            return dump_prepared(calib, report)
        except (TypeError, ValueError) as exc:  # something not storable: every worker computes its own
            log(f"[quanttune] the calibration could not be stored for other workers ({exc})")
            return b""

    data, _ = once(shared, f"prepared-{_space_key(space)}", compute, should_stop)
    if computed:
        return (*computed[0], True)
    if data:
        try:
            return (*load_prepared(data, model, batches), False)
        except Exception as exc:  # e.g. stored by another version: compute our own
            log(f"[quanttune] the stored calibration could not be loaded ({type(exc).__name__}: {exc}): recalibrating")
    compute()
    return (*computed[0], True)


def _point_claim(plan_key: str) -> str:
    """The shared claim on evaluating one plan (two workers choosing at once take different points)."""
    import hashlib

    return "point-" + hashlib.sha256(plan_key.encode()).hexdigest()[:24]


def _space_key(space: SearchSpace) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(space.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def tune(
    model: nn.Module,
    calibration: Iterable[Any],
    evaluate: Callable[[nn.Module], float],
    *,
    max_drop: float = 0.01,
    relative: bool = True,
    higher_is_better: bool = True,
    max_trials: int | None = 50,
    timeout: float | None = None,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    seed: int = 0,
    space: SearchSpace | Mapping[str, Any] | None = None,
    verbose: bool = True,
    verify: bool = True,
    verify_tolerance: float = 0.002,
    latency_runs: int = 10,
    should_stop: Callable[[], bool] | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    shared: SharedStore | None = None,
    worker: str | None = None,
) -> TuneResult:
    """Search quantization plans for `model` until the most-INT8 plan within the budget is found.

    `calibration` is an iterable of batches (tensor, tuple of positional inputs, or dict of keyword
    inputs); `evaluate(model) -> float` is the user's metric. The budget is `max_drop`, relative to
    the FP32 baseline unless `relative=False`. Trials are kept in Optuna `storage` (in memory when
    omitted): the same `storage` and `study_name` resume a study, and several processes may share
    it. `should_stop()` is checked before each trial; `on_trial(info)` is called after each.
    `verify` evaluates the exported INT8 model once on ONNX Runtime and checks what ONNX Runtime
    runs (INT8 kernels per layer) and how fast, against FP32, `latency_runs` timed calls per figure
    (0: no timing): `result.deployment`.
    `shared` (a `tuner.prepared.SharedStore`) shares the baseline, calibration, error report and
    ranking between the processes of one study, so that only the first computes them; `worker`
    names this process in its trials (default host:pid).
    """
    _check_args(max_drop, relative, max_trials, timeout, latency_runs)
    space = SearchSpace.from_dict(space) if not isinstance(space, SearchSpace) else space
    budget = Budget(float(max_drop), relative, higher_is_better)
    log = print if verbose else (lambda *a, **k: None)
    start = time.perf_counter()
    shared = shared if shared is not None else MemoryStore()
    worker = worker or worker_label()
    stop_asked = should_stop if should_stop is not None else (lambda: False)

    study = open_study(storage, study_name, seed)
    for key, value in (("max_drop", budget.max_drop), ("relative", relative), ("higher_is_better", higher_is_better)):
        study.set_user_attr(key, value)
    baseline = _Baseline(study, model, evaluate, shared, worker, stop_asked)
    if baseline.value is not None:
        log(f"[quanttune] baseline {baseline.value:.6g} (budget: drop <= {budget.describe()})")
    else:
        log("[quanttune] another worker is evaluating the FP32 baseline")

    try:
        calib, report, prepared_here = _prepare(model, calibration, space, shared, stop_asked, log)
    except Stopped:
        log("[quanttune] stopped on request")
        raise
    study.set_user_attr("layers", list(report.layers))
    ranking: list[str] = []  # most sensitive first; measured only once a plan misses the budget

    def ranked() -> list[str]:
        if not ranking:
            def measure() -> bytes:
                full = plan_for(space.point(0), space, report, [])
                return dump_ranking(rank_layers(model, calib, full))

            data, measured = once(shared, f"ranking-{_space_key(space)}", measure, stop_asked)
            ranking.extend(load_ranking(data))
            log(f"[quanttune] {'ranked' if measured else 'loaded the ranking of'} {len(ranking)} layers by "
                f"end-to-end output error; most sensitive: {', '.join(ranking[:3])}")
        return ranking

    prep_s = time.perf_counter() - start
    log(f"[quanttune] {'calibrated' if prepared_here else 'loaded the calibration of'} {len(calib.layers)} layers "
        f"({calib.seconds:.2f}s), error report ({report.seconds:.2f}s)")

    plans: dict[str, Plan] = {}

    def make_plan(params: dict[str, Any]) -> tuple[Plan, float]:
        plan = plan_for(params, space, report, ranked() if params.get("fallback") else [])
        plans.setdefault(plan.key(), plan)
        return plan, calib.coverage(plan)["macs"]

    def build(plan: Plan) -> nn.Module:
        return apply_plan(model, plan, calib, share_weights=True)

    n_candidates = sum(1 for n in report.layers if n not in space.exclude)
    strategy = Strategy(space, n_candidates, lambda p: make_plan(p)[0].key(), slack=budget.max_drop / 2)
    known = stored_outcomes(study, budget)
    _remember(plans, known)
    evaluations = 0  # this process's evaluations of plans
    stopped = False
    idle_in_a_row = 0

    def stop_requested() -> bool:
        if stop_asked():
            log("[quanttune] stopped on request")
            return True
        return False

    while True:
        if stop_requested():
            stopped = True
            break
        if timeout is not None and time.perf_counter() - start > timeout:
            log(f"[quanttune] timeout of {timeout:g}s reached")
            break
        known.update(stored_outcomes(study, budget))  # other workers' results too
        _remember(plans, known)
        if max_trials is not None and _evaluated(known) >= max_trials:
            log(f"[quanttune] max_trials={max_trials} reached")
            break
        try:
            point = strategy.next_point(known, running_plans(study))
            if point is None:
                break
            if stop_requested():  # asked again: choosing the point may take seconds (ranking the layers)
                stopped = True
                break
            if point == WAIT:  # every useful point is being evaluated elsewhere: wait for a result
                time.sleep(WAIT_S)
                continue
            propose = None if point == SAMPLE else point
            if propose is not None and not shared.claim(_point_claim(strategy.key_of(propose))):
                time.sleep(WAIT_S)  # another worker took this point a moment ago: it is pending now
                continue
            best = _best(known.values())
            beat = best.coverage if propose is None and best is not None and best.met else None
            outcome = run_trial(study, lambda trial: space.suggest(trial, n_candidates), make_plan, build, evaluate,
                                baseline, budget, known, propose, beat, worker=worker)
        except Stopped:
            log("[quanttune] stopped on request")
            stopped = True
            break
        except optuna.exceptions.UpdateFinishedTrialError:  # the job ended and closed our trial meanwhile
            continue
        idle_in_a_row = idle_in_a_row + 1 if outcome is None or outcome.reused else 0
        if idle_in_a_row >= MAX_IDLE_IN_A_ROW:
            log("[quanttune] the sampler proposes no new plan that could beat the best: done")
            break
        if outcome is None:  # pruned: it could not beat the best plan, so it was not evaluated
            continue
        evaluations += 0 if outcome.reused else 1
        known.update({k: v for k, v in stored_outcomes(study, budget).items() if k not in known})
        _remember(plans, known)
        best = _best(known.values())
        _progress(log, outcome, plans[outcome.plan_key], budget, best)
        if on_trial is not None:
            on_trial(_trial_info(outcome, plans[outcome.plan_key], evaluations + baseline.evaluations, best))
    search_s = time.perf_counter() - start - prep_s
    stopped = stopped or not _finisher(shared, stop_asked, log)
    known.update(stored_outcomes(study, budget))
    _remember(plans, known)
    baseline_value = baseline()  # known by now, unless the search stopped before it was (raises Stopped)
    evaluations += baseline.evaluations  # the baseline, if this process evaluated it

    best = _best(known.values())
    if best is None:  # nothing evaluated successfully: the safest plan, all FP32, with the reason
        plan = Plan.uniform(report.layers).fallback(report.layers)
        score, drop, met = None, None, False
        failures = [o.error for o in known.values() if o.error]
        reason = ("no plan could be evaluated" + (f"; last error: {failures[-1]}" if failures else "")
                  + ("; stopped on request" if stopped else ""))
    else:
        plan = plans[best.plan_key]
        score, drop, met = best.score, best.drop, best.met
        reason = _reason(best, plan, budget, stopped)
    result = TuneResult(
        met=met, baseline=baseline_value, score=score, drop=drop, plan=plan,
        model=apply_plan(model, plan, calib), coverage=calib.coverage(plan), evaluations=evaluations,
        trials=_trials(study), ledger=build_ledger(report, plan, ranking, list(known.values()), plans, budget),
        reason=reason, study_name=study.study_name,
        budget={"max_drop": budget.max_drop, "relative": relative, "higher_is_better": higher_is_better},
        seconds={"prepare": round(prep_s, 3), "search": round(search_s, 3)}, stopped=stopped,
        calibration=calib, original=model,
    )
    if verify and best is not None and not stopped:
        _verify(result, evaluate, budget, report, verify_tolerance, log, latency_runs)
    result.seconds["total"] = round(time.perf_counter() - start, 3)
    log(f"[quanttune] {'MET' if met else 'NOT MET'}: {result.reason}")
    return result


def _finisher(shared: SharedStore, stop_asked: Callable[[], bool], log) -> bool:  # noqa: ANN001
    """Whether this process verifies and returns the result: when several workers end the search,
    one does; the others wait until it has (the job ends: `stop_asked`), or take over if it died."""
    waiting = False
    next_claim = 0.0
    while not stop_asked():
        if time.monotonic() >= next_claim:
            if shared.claim("result"):
                return True
            next_claim = time.monotonic() + FINISHER_CHECK_S
        if not waiting:
            log("[quanttune] another worker is finishing this study: waiting for it")
            waiting = True
        time.sleep(4 * WAIT_S)
    return False


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


def _reason(best: Outcome, plan: Plan, budget: Budget, stopped: bool) -> str:
    n_fp32 = len(plan.fp32_layers)
    where = f"trial {best.number}: {plan.summary()}, drop {budget.format(best.drop)} vs budget {budget.describe()}"
    if best.met:
        tail = "every layer INT8" if n_fp32 == 0 else f"{n_fp32} layer(s) FP32: {', '.join(plan.fp32_layers[:5])}"
        return f"{where}; {tail}"
    return (f"no evaluated plan met the budget{' before the search was stopped' if stopped else ''}; "
            f"the closest is {where}")


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


def _trials(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append({
            "number": t.number, "state": t.state.name, "summary": a.get("summary"), "score": a.get("score"),
            "drop": a.get("drop"), "coverage": a.get("coverage"), "fp32_layers": a.get("fp32_layers", []),
            "duration_s": a.get("duration_s"), "overhead_s": a.get("overhead_s"), "error": a.get("error"),
            "duplicate_of": a.get("duplicate_of"), "params": dict(t.params),
        })
    return rows


def _verify(result: TuneResult, evaluate, budget: Budget, report: LayerReport, tolerance: float, log,
            latency_runs: int) -> None:
    """Evaluate the exported ONNX model on ONNX Runtime once (the score users will deploy), and check
    what ONNX Runtime runs and how fast against FP32 (`result.deployment`)."""
    import tempfile

    from .deployment import check_deployment
    from .onnx_runtime import load_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = result.export_onnx(Path(tmp) / "model.onnx")
        if not path.with_name(path.name + ".data").exists():  # a single file (under 2 GB): keep it for `save`
            result.onnx = path.read_bytes()
        deployed, error = None, None
        try:  # the search's result must survive whatever ONNX Runtime or the evaluation does here
            module = load_onnx(path)
            result.evaluations += 1
            deployed = float(evaluate(module))
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
        result.deployment = check_deployment(result.original, result.plan, result.calibration, path,
                                             latency_runs=latency_runs)
    if error is not None:
        result.deployment.errors["score"] = error
    if deployed is not None:
        _deployed_score(result, deployed, budget, report, tolerance, log)
    _judge_deployment(result, log)


def _deployed_score(result: TuneResult, deployed: float, budget: Budget, report: LayerReport, tolerance: float,
                    log) -> None:
    result.deployed_score = deployed
    result.deployed_drop = budget.drop(result.baseline, deployed)
    gap = abs(deployed - result.score) / (abs(result.baseline) or 1.0)
    log(f"[quanttune] deployed (ONNX Runtime) score {deployed:.6g}, drop {budget.format(result.deployed_drop)}")
    if gap > tolerance or not budget.met(result.deployed_drop) and result.met:
        suspects = sorted(result.plan.int8_layers, key=lambda n: report.layers[n].sqnr_of(result.plan.config(n)))[:3]
        _warn(result, f"the deployed model scores {deployed:.6g} against {result.score:.6g} simulated "
                      f"(gap {gap:.3%} of the baseline); the layers most likely responsible (lowest SQNR): "
                      f"{', '.join(suspects)}")


def _warn(result: TuneResult, message: str) -> None:
    result.warnings.append(message)
    warnings.warn(message, stacklevel=5)  # the caller of `tune`


def _judge_deployment(result: TuneResult, log) -> None:
    """Log the deployed check; warn about what could not be measured and about planned INT8 layers
    that run in float; never call a plan slower than FP32 a plain success (the reason says so;
    `met` stays about accuracy)."""
    for line in result.deployment.describe():
        log(f"[quanttune] {line}")
    for message in result.deployment.warnings():
        _warn(result, message)
    result.reason = result.deployment.qualify(result.reason, result.met)
