"""The Optuna side of a search: the study, its stored trials, and evaluating one plan as a trial.

Everything that must survive a crash or be shared between workers lives in the study's storage:
the FP32 baseline (study user attr), and per trial its plan, score, drop, coverage and error
(trial user attrs) with accuracy as a constraint (`trial.set_constraint`, feasible when <= 0).
"""

from __future__ import annotations

import math
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

from .plan import Plan

optuna.logging.set_verbosity(optuna.logging.WARNING)

HEARTBEAT_S = 5
GRACE_S = 30


def open_study(storage: str | optuna.storages.BaseStorage | None, study_name: str | None, seed: int) -> optuna.Study:
    if isinstance(storage, str):
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; we rely on them knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    sampler = optuna.samplers.TPESampler(seed=seed)
    return optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                               sampler=sampler, load_if_exists=True)


@dataclass
class Budget:
    """The accuracy budget: how a score compares with the baseline."""

    max_drop: float
    relative: bool
    higher_is_better: bool

    def drop(self, baseline: float, score: float) -> float:
        loss = baseline - score if self.higher_is_better else score - baseline
        return loss / abs(baseline) if self.relative else loss

    def met(self, drop: float | None) -> bool:
        return drop is not None and drop <= self.max_drop

    def describe(self) -> str:
        return f"{self.max_drop:.2%} relative" if self.relative else f"{self.max_drop:g} absolute"

    def format(self, drop: float) -> str:
        return f"{drop:.2%}" if self.relative else f"{drop:.4g}"


@dataclass
class Outcome:
    """What one evaluated (or previously stored) plan gave."""

    number: int
    state: str  # "COMPLETE" | "FAIL" | "RUNNING"
    plan_key: str
    score: float | None
    drop: float | None
    coverage: float
    met: bool
    error: str | None
    duration_s: float
    overhead_s: float
    reused: bool = False
    plan: dict[str, Any] | None = None  # the stored plan (outcomes read back from the study)
    worker: str | None = None


def stored_outcomes(study: optuna.Study, budget: Budget) -> dict[str, Outcome]:
    """Finished trials by plan key (the latest complete one wins over failures)."""
    found: dict[str, Outcome] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        key = t.user_attrs.get("plan_key")
        if key is None or t.user_attrs.get("duplicate_of") is not None:
            continue
        if t.state == TrialState.FAIL and "error" not in t.user_attrs:
            continue  # interrupted (its worker died): not a verdict on the plan, so it is tried again
        outcome = _outcome(t, budget)
        if key not in found or (found[key].state != "COMPLETE" and outcome.state == "COMPLETE"):
            found[key] = outcome
    return found


def _outcome(t: optuna.trial.FrozenTrial, budget: Budget) -> Outcome:
    attrs = t.user_attrs
    drop = attrs.get("drop")
    return Outcome(t.number, t.state.name, attrs.get("plan_key", ""), attrs.get("score"), drop,
                   attrs.get("coverage", 0.0), t.state == TrialState.COMPLETE and budget.met(drop),
                   attrs.get("error"), attrs.get("duration_s", 0.0), attrs.get("overhead_s", 0.0),
                   plan=attrs.get("plan"), worker=attrs.get("worker"))


def _heartbeat_enabled(storage: Any) -> bool:
    # Optuna wraps an RDBStorage in a caching storage: ask the heartbeat interface, not the class
    return isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval() is not None


def worker_label() -> str:
    """This process, as trials name their worker: host:pid."""
    import os
    import socket

    return f"{socket.gethostname()[:40]}:{os.getpid()}"


def running_plans(study: optuna.Study) -> set[str]:
    """Plan keys of the trials other processes are evaluating now (a trial whose worker died is
    failed first, so that its plan is free again)."""
    storage = study._storage
    if _heartbeat_enabled(storage):
        with warnings.catch_warnings():  # experimental in Optuna, and stable enough for us
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)  # a worker that died mid-trial leaves it RUNNING
    return {t.user_attrs["plan_key"] for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if "plan_key" in t.user_attrs}


def running_elsewhere(study: optuna.Study, plan_key: str) -> bool:
    return plan_key in running_plans(study)


def _taken_by_earlier(study: optuna.Study, plan_key: str, number: int) -> int | None:
    """The number of an earlier trial evaluating the same plan right now (two workers picked the
    same point at once): the later one gives way."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number < number and t.user_attrs.get("plan_key") == plan_key:
            return t.number
    return None


class _Heartbeat:
    """Keeps a trial alive in RDB storage while `evaluate` runs, so other workers can tell a
    slow trial from a dead one."""

    def __init__(self, study: optuna.Study, trial_id: int):
        self.storage = study._storage
        self.trial_id = trial_id
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeat:
        if _heartbeat_enabled(self.storage):
            self.storage.record_heartbeat(self.trial_id)
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()
        return self

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a transient database error must not kill the trial
                pass

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def run_trial(
    study: optuna.Study,
    suggest: Callable[[optuna.Trial], dict[str, Any]],
    make_plan: Callable[[dict[str, Any]], tuple[Plan, float]],
    build: Callable[[Plan], Any],
    evaluate: Callable[[Any], float],
    baseline: Callable[[], float],
    budget: Budget,
    known: dict[str, Outcome],
    propose: dict[str, Any] | None = None,
    beat_coverage: float | None = None,
    worker: str | None = None,
) -> Outcome | None:
    """Run one Optuna trial. `propose` enqueues our own point first; the trial evaluates whatever
    point it gets (with several workers, another worker's proposal is as good as ours). A plan
    already evaluated is not evaluated again: its result is copied into the trial. A plan with no
    more INT8 coverage than `beat_coverage` (the best met plan) cannot be better: it is pruned
    without evaluation and None is returned, as it is when an earlier trial is evaluating the same
    plan now. `baseline()` gives the FP32 score once known (another worker may still be
    evaluating it while this trial's evaluation runs)."""
    start = time.perf_counter()
    trial = _ask(study, propose)
    plan, coverage = make_plan(suggest(trial))
    key = plan.key()
    for name, value in (("plan", plan.to_dict()), ("plan_key", key), ("summary", plan.summary()),
                        ("coverage", coverage), ("fp32_layers", plan.fp32_layers), ("worker", worker)):
        trial.set_user_attr(name, value)
    if _pruned(study, trial, key, coverage, beat_coverage):
        return None
    previous = known.get(key)
    if previous is not None and previous.state == "COMPLETE":
        return _reuse(study, trial, key, coverage, previous, budget)
    score, drop, error, eval_s = _evaluate(study, trial, plan, build, evaluate, baseline, budget)
    duration = time.perf_counter() - start
    trial.set_user_attr("duration_s", round(duration, 4))
    trial.set_user_attr("overhead_s", round(duration - eval_s, 4))
    if error is not None:
        trial.set_user_attr("error", error)
        study.tell(trial, state=TrialState.FAIL)
        outcome = Outcome(trial.number, "FAIL", key, None, None, coverage, False, error, duration, duration - eval_s)
    else:
        trial.set_user_attr("score", score)
        trial.set_user_attr("drop", drop)
        trial.set_constraint("accuracy", drop - budget.max_drop)
        study.tell(trial, coverage)
        outcome = Outcome(trial.number, "COMPLETE", key, score, drop, coverage, budget.met(drop), None, duration,
                          duration - eval_s)
    if key not in known or outcome.state == "COMPLETE":
        known[key] = outcome
    return outcome


def _ask(study: optuna.Study, propose: dict[str, Any] | None) -> optuna.Trial:
    if propose is not None:
        study.enqueue_trial(propose, skip_if_exists=False)
    with warnings.catch_warnings():  # we keep the heartbeat ourselves (`_Heartbeat`), not Study.optimize
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask()


def _pruned(study: optuna.Study, trial: optuna.Trial, key: str, coverage: float, beat_coverage: float | None) -> bool:
    """Prune (without evaluating) a plan that cannot beat the best met one, or that an earlier
    trial is evaluating now."""
    if beat_coverage is not None and coverage <= beat_coverage:
        trial.set_user_attr("pruned", f"INT8 MAC share {coverage:.1%} cannot beat the best met plan's {beat_coverage:.1%}")
        study.tell(trial, state=TrialState.PRUNED)
        return True
    earlier = _taken_by_earlier(study, key, trial.number)
    if earlier is not None:
        trial.set_user_attr("pruned", f"the same plan is being evaluated in trial {earlier}")
        study.tell(trial, state=TrialState.PRUNED)
        return True
    return False


def _reuse(study: optuna.Study, trial: optuna.Trial, key: str, coverage: float, previous: Outcome,
           budget: Budget) -> Outcome:
    """A plan evaluated before: its result is copied into the trial."""
    trial.set_user_attr("duplicate_of", previous.number)
    trial.set_user_attr("score", previous.score)
    trial.set_user_attr("drop", previous.drop)
    trial.set_constraint("accuracy", previous.drop - budget.max_drop)
    study.tell(trial, coverage)
    return Outcome(trial.number, "COMPLETE", key, previous.score, previous.drop, coverage, previous.met,
                   None, 0.0, 0.0, reused=True)


def _evaluate(study: optuna.Study, trial: optuna.Trial, plan: Plan, build: Callable[[Plan], Any],
              evaluate: Callable[[Any], float], baseline: Callable[[], float],
              budget: Budget) -> tuple[float | None, float | None, str | None, float]:
    """Build and evaluate the plan (heartbeat on): score, drop, error (the user's evaluate failed on
    this plan: recorded, the search goes on), seconds in `evaluate`."""
    score = drop = error = None
    eval_s = 0.0
    with _Heartbeat(study, trial._trial_id):
        try:
            candidate = build(plan)
            trial.set_user_attr("evaluated", True)  # a call of the user's evaluation, counted per worker
            eval_start = time.perf_counter()
            try:
                score = float(evaluate(candidate))
            finally:
                eval_s = time.perf_counter() - eval_start
            if not math.isfinite(score):
                raise ValueError(f"evaluate returned {score}, not a finite number")
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("traceback", traceback.format_exc(limit=5)[-2000:])
        if error is None:
            try:
                drop = budget.drop(baseline(), score)
            except BaseException:  # stopped while waiting for the baseline: interrupted, retried later
                trial.set_user_attr("score", score)
                study.tell(trial, state=TrialState.FAIL)
                raise
    return score, drop, error, eval_s
