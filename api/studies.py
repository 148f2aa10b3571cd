"""Read a job's trials and study attributes from Optuna's storage (study `job-{id}` in the same
database), and serialize them: pure functions from FrozenTrial to `TrialPublic`."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .db import optuna_engine_kwargs, utcnow
from .schemas import TrialPublic


# A FAIL trial without an error was failed by Optuna's heartbeat check (`fail_stale_trials`).
INTERRUPTED = "interrupted: the worker running this trial stopped (no trial heartbeat); the plan is retried"


def study_name(job_id: int) -> str:
    return f"job-{job_id}"


class Studies:
    """Lazily opened Optuna storage, shared by the app's requests (thread-safe sessions)."""

    SETTLED_S = 30.0  # a job finished this long ago has a final study: its trials are cached
    CACHED_STUDIES = 256

    def __init__(self, url: str) -> None:
        self.url = url
        self._storage: optuna.storages.RDBStorage | None = None
        self._lock = threading.Lock()
        self._settled: OrderedDict[int, list[FrozenTrial]] = OrderedDict()  # LRU of final studies

    @property
    def storage(self) -> optuna.storages.RDBStorage:
        with self._lock:
            if self._storage is None:
                self._storage = optuna.storages.RDBStorage(self.url, engine_kwargs=optuna_engine_kwargs(self.url),
                                                           skip_compatibility_check=True, skip_table_creation=True)
            return self._storage

    def _study_id(self, job_id: int) -> int | None:
        try:
            return self.storage.get_study_id_from_name(study_name(job_id))
        except KeyError:
            return None

    def trials(self, job_id: int, finished_at: datetime | None = None) -> list[FrozenTrial]:
        """The study's trials. `finished_at` (naive UTC) of a finished job: once it lies `SETTLED_S`
        in the past (the finishing worker has closed every trial) the study cannot change, and its
        trials are served from memory (reading them back is the slowest read of the API)."""
        settled = finished_at is not None and (utcnow() - finished_at).total_seconds() > self.SETTLED_S
        if settled:
            with self._lock:
                if job_id in self._settled:
                    self._settled.move_to_end(job_id)
                    return self._settled[job_id]
        study_id = self._study_id(job_id)
        if study_id is None:
            return []
        found = self.storage.get_all_trials(study_id, deepcopy=False)
        if settled:
            with self._lock:
                self._settled[job_id] = found
                while len(self._settled) > self.CACHED_STUDIES:
                    self._settled.popitem(last=False)
        return found

    def user_attrs(self, job_id: int) -> dict[str, Any]:
        study_id = self._study_id(job_id)
        return {} if study_id is None else dict(self.storage.get_study_user_attrs(study_id))

    def delete(self, job_id: int) -> None:
        with self._lock:
            self._settled.pop(job_id, None)
        study_id = self._study_id(job_id)
        if study_id is not None:
            try:
                self.storage.delete_study(study_id)
            except KeyError:
                pass

    def close(self) -> None:
        if self._storage is not None:
            self._storage.remove_session()
            self._storage.engine.dispose()


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
        started_at=_utc(trial.datetime_start),
        finished_at=_utc(trial.datetime_complete),
    )


def _utc(value: Any) -> Any:
    return value.astimezone(timezone.utc) if value is not None else None


STATES = {s.name: s for s in TrialState}
