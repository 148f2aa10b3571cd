"""Pure serializers from the job store's rows and Optuna's trials to the REST shapes
(`JobPublic`, `TrialPublic`)."""

from __future__ import annotations

import math
from datetime import timezone
from typing import Any

from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from tuner.study import Budget
from worker.models import JobRecord
from worker.spec import JobSpec
from worker.studies import INTERRUPTED

from .schemas import FINISHED_STATUSES, DeploymentPublic, JobPublic, Progress, TrialPublic


def _utc(value: Any) -> Any:
    return value.replace(tzinfo=timezone.utc) if value is not None else None


def _deployment(stored: dict[str, Any] | None) -> DeploymentPublic | None:
    """The deployed check a worker stored with the job (a summary written by another version of the
    worker that no longer validates is left out rather than failing every read of the job)."""
    if not stored:
        return None
    try:
        return DeploymentPublic.model_validate(stored)
    except ValidationError:
        return None


def deployed_drop(job: JobRecord, budget: Budget) -> float | None:
    """The drop of the exported model on ONNX Runtime, as the budget measures it (None when it was
    not evaluated)."""
    if job.deployed_score is None or job.baseline is None or (budget.relative and job.baseline == 0):
        return None
    return budget.drop(job.baseline, job.deployed_score)


def job_outcome(job: JobRecord, budget: Budget, deployed: float | None) -> str | None:
    """'met' | 'not_met' | 'failed' | 'cancelled', None while the job is queued or running. A job
    whose best plan met the budget in simulation, but whose exported model misses it on ONNX Runtime,
    is 'not_met': the model users download and deploy is the ONNX one."""
    if job.status in ("failed", "cancelled"):
        return job.status
    if job.status != "succeeded":
        return None
    return "met" if job.met and (deployed is None or budget.met(deployed)) else "not_met"


def job_public(job: JobRecord, workers: int = 0, artifacts: list[str] | None = None) -> JobPublic:
    spec = JobSpec.from_stored(job.spec or {})
    options = spec.options
    budget = Budget(options.max_drop, options.relative, options.higher_is_better)
    deployed = deployed_drop(job, budget)
    return JobPublic(
        id=job.id, name=job.name, status=job.status,
        created_at=_utc(job.created_at), started_at=_utc(job.started_at), finished_at=_utc(job.finished_at),
        updated_at=_utc(job.updated_at),
        model_source=job.model_source, calibration_source=job.calibration_source,
        evaluation_source=job.evaluation_source,
        max_drop=options.max_drop, relative=options.relative, higher_is_better=options.higher_is_better,
        max_trials=options.max_trials, timeout=options.timeout, trial_timeout=spec.trial_timeout, space=options.space,
        parallelism=job.parallelism, seed=options.seed, evaluate_on=options.evaluate_on,
        workers=workers if job.status not in FINISHED_STATUSES else 0,
        progress=Progress(trials=job.trials, evaluations=job.evaluations, best_score=job.best_score,
                          best_drop=job.best_drop, best_coverage=job.best_coverage, met=job.best_met),
        baseline=job.baseline, score=job.score, drop=job.drop, coverage=job.coverage, met=job.met,
        deployed_score=job.deployed_score, deployed_drop=deployed, outcome=job_outcome(job, budget, deployed),
        deployment=_deployment(job.deployment), reason=job.reason, error=job.error, artifacts=artifacts or [],
    )


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def trial_public(trial: FrozenTrial, *, include_plan: bool = False) -> TrialPublic:
    attrs = trial.user_attrs
    duration = _finite(attrs.get("duration_s"))
    if duration is None and trial.datetime_start and trial.datetime_complete:
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
    return TrialPublic(
        number=trial.number,
        state=trial.state.name,
        summary=attrs.get("summary"),
        score=_finite(attrs.get("score")),
        drop=_finite(attrs.get("drop")),
        coverage=_finite(attrs.get("coverage")),
        duration_s=duration,
        error=attrs.get("error") or (INTERRUPTED if trial.state == TrialState.FAIL else None),
        fp32_layers=list(attrs.get("fp32_layers") or []),
        duplicate_of=attrs.get("duplicate_of"),
        worker=attrs.get("worker"),
        evaluated=bool(attrs.get("evaluated")),
        params={k: v for k, v in trial.params.items()},
        plan=attrs.get("plan") if include_plan else None,
        started_at=_aware(trial.datetime_start),
        finished_at=_aware(trial.datetime_complete),
    )


def _aware(value: Any) -> Any:
    return value.astimezone(timezone.utc) if value is not None else None

