"""A job's Optuna study (`job-{id}`, in the same database as the job): the one way to open Optuna's
storage (`open_storage`), the storage a worker tunes through (`TrackingStorage`: trial
heartbeats), failing trials left RUNNING (`fail_running`), and reading a job's trials back
(`Studies`, for the API)."""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from .db import optuna_engine_kwargs, utcnow

log = logging.getLogger("quanttune.worker")


# A FAIL trial without an error was failed by Optuna's heartbeat check (`fail_stale_trials`).
INTERRUPTED = "interrupted: the worker running this trial stopped (no trial heartbeat); the plan is retried"


def study_name(job_id: int) -> str:
    return f"job-{job_id}"


def open_storage(url: str, kind: type[optuna.storages.RDBStorage] = optuna.storages.RDBStorage,
                 **kwargs: Any) -> Any:
    """Optuna's RDB storage on the service's database (created by `quanttune migrate`); on SQLite
    it waits for the write lock as our own engine does. `kind`: a subclass, given `kwargs` too."""
    with warnings.catch_warnings():  # the trial heartbeat options are "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return kind(url, engine_kwargs=optuna_engine_kwargs(url), skip_compatibility_check=True,
                    skip_table_creation=True, **kwargs)


class TrackingStorage(optuna.storages.RDBStorage):
    """An Optuna RDB storage (trial heartbeats on) that remembers the trials this process runs,
    so that the worker's heartbeat thread keeps them alive and another worker can tell a slow trial
    from one whose worker died (Optuna wraps storages in `_CachedStorage`, so this does not depend
    on the caller seeing an `RDBStorage`). `on_track(trial_id)` hears of each trial this process
    starts running (a supervised run tells its worker, which may have to fail it)."""

    def __init__(self, url: str, *, on_track: Callable[[int], None] | None = None, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.on_track = on_track
        self.created: set[int] = set()
        self._lock = threading.Lock()

    def create_new_trial(self, study_id: int, template_trial: Any = None) -> int:
        trial_id = super().create_new_trial(study_id, template_trial)
        if template_trial is None or template_trial.state.name == "RUNNING":
            self._track(trial_id)
        return trial_id

    def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
        # `study.ask()` takes an enqueued (WAITING) trial by switching it to RUNNING here
        changed = super().set_trial_state_values(trial_id, state, values)
        if changed and state.name == "RUNNING":
            self._track(trial_id)
        return changed

    def _track(self, trial_id: int) -> None:
        self.record_heartbeat(trial_id)
        with self._lock:
            self.created.add(trial_id)
        if self.on_track is not None:
            self.on_track(trial_id)

    def beat(self) -> None:
        """Heartbeat this process's RUNNING trials; forget the finished ones."""
        with self._lock:
            mine = list(self.created)
        for trial_id in mine:
            if self.get_trial(trial_id).state == TrialState.RUNNING:
                self.record_heartbeat(trial_id)
            else:
                with self._lock:
                    self.created.discard(trial_id)


def running_trials(storage: Any, job_id: int) -> list[int]:
    """The ids of the job's trials still RUNNING (none when the study does not exist)."""
    try:
        study_id = storage.get_study_id_from_name(study_name(job_id))
    except KeyError:
        return []
    return [t._trial_id for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))]


def fail_running(storage: Any, trial_ids: Iterable[int], error: str) -> list[int]:
    """Mark FAIL, with `error`, those of `trial_ids` still RUNNING; their numbers. A trial deleted
    with its job, or finished meanwhile by its own worker, is left alone."""
    failed = []
    for trial_id in sorted(trial_ids):
        try:
            trial = storage.get_trial(trial_id)
            if trial.state != TrialState.RUNNING:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                storage.set_trial_user_attr(trial_id, "error", error)
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
            failed.append(trial.number)
        except (KeyError, UpdateFinishedTrialError):
            continue
        except Exception:
            log.exception("could not mark trial %s failed", trial_id)
    return failed


def baseline_known(storage: Any, job_id: int) -> bool:
    try:
        return "baseline" in storage.get_study_user_attrs(storage.get_study_id_from_name(study_name(job_id)))
    except KeyError:
        return False


def close(storage: Any) -> None:
    storage.remove_session()
    storage.engine.dispose()


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
                self._storage = open_storage(self.url)
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
            close(self._storage)
