"""Run one claimed job: turn its spec and uploads into (model, calibration, evaluate), call
`tuner.tune` on the job's shared Optuna study, and report progress and the outcome."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

import tuner

from .inputs import build_inputs
from .prepared import JobStore
from .queue import Claim, Queue
from .settings import Settings
from .spec import JobSpec
from .studies import TrackingStorage, close, fail_running, open_storage, running_trials, study_name

log = logging.getLogger("quanttune.worker")


def database_outage(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it: Optuna wraps SQLAlchemy's errors) says the database could
    not be reached or was busy: a restart, a network cut, SQLite's lock timeout."""
    from sqlalchemy import exc as sa

    if isinstance(exc, tuner.QuanttuneError):  # e.g. the user's baseline evaluation failed: a verdict
        return False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (sa.OperationalError, sa.InterfaceError, sa.TimeoutError)):
            return True
        if isinstance(current, sa.DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc.__cause__ or exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


class JobRun:
    """One worker's part of one job (a claimed slot)."""

    def __init__(self, queue: Queue, claim: Claim, settings: Settings, shutdown: threading.Event,
                 monitor: Any = None) -> None:
        self.queue, self.claim, self.settings, self.shutdown = queue, claim, settings, shutdown
        self.monitor = monitor  # a supervised run (worker.supervise): reports trials and evaluations to its worker
        self.lost = threading.Event()  # the lease was taken over, or the job deleted
        self.ended = threading.Event()  # the job is no longer running (cancelled, finished elsewhere)
        self._baseline_known = False
        self._storage: Any = None  # the Optuna RDB storage of this run (trial heartbeats on)

    # -- heartbeat -------------------------------------------------------------------------------
    def heartbeat(self, done: threading.Event) -> None:
        """Renew the lease; keep this process's trials alive; fail other workers' stale trials."""
        period = min(self.settings.heartbeat_interval, self.settings.trial_heartbeat_seconds)
        while not done.wait(period):
            try:
                if not self.queue.renew(self.claim):
                    log.warning("job %s: lease of slot %s lost", self.claim.job_id, self.claim.slot)
                    self.lost.set()
                    return
                if self.queue.status(self.claim.job_id) != "running":
                    self.ended.set()
                self._storage.beat()
                self._fail_stale_trials()
            except Exception:  # a database hiccup: try again next beat (the lease has slack)
                log.exception("job %s: heartbeat failed", self.claim.job_id)

    def _fail_stale_trials(self) -> None:
        """A RUNNING trial whose worker stopped beating is failed (without an error: the search
        retries its plan), so that workers waiting on it go on."""
        import optuna

        try:
            study = optuna.load_study(study_name=study_name(self.claim.job_id), storage=self._storage)
        except KeyError:
            return  # the study does not exist yet (or was deleted)
        before = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
        if before - after:
            log.warning("job %s: trial(s) %s had no heartbeat for %ss: marked FAIL, their plans are retried",
                        self.claim.job_id, sorted(before - after), self.settings.trial_grace_seconds)

    def should_stop(self) -> bool:
        if self.shutdown.is_set() or self.lost.is_set() or self.ended.is_set():
            return True
        try:
            if self.queue.status(self.claim.job_id) != "running":
                self.ended.set()
        except Exception:
            log.exception("job %s: status check failed", self.claim.job_id)
        return self.ended.is_set()

    # -- progress --------------------------------------------------------------------------------
    def on_trial(self, info: dict[str, Any]) -> None:
        values: dict[str, Any] = {"best_score": info.get("best_score"), "best_drop": info.get("best_drop"),
                                  "best_coverage": info.get("best_coverage"), "best_met": bool(info.get("met"))}
        values.update(self._study_progress())
        try:
            if not self.queue.progress(self.claim, values):
                self.ended.set()
        except Exception:
            log.exception("job %s: progress update failed", self.claim.job_id)

    def _study_progress(self, final: bool = False) -> dict[str, Any]:
        """Study-wide figures (all workers): finished trials, and the baseline once known. `final`:
        the job is ending, trials still RUNNING are about to be closed as FAIL and count as finished."""
        try:
            return self._read_study_progress(final)
        except Exception:  # progress is cosmetic: never let it fail a job
            log.exception("job %s: reading the study's progress failed", self.claim.job_id)
            return {}

    def _read_study_progress(self, final: bool) -> dict[str, Any]:
        from optuna.trial import TrialState

        study_id = self._storage.get_study_id_from_name(study_name(self.claim.job_id))
        states = (TrialState.COMPLETE, TrialState.FAIL) + ((TrialState.RUNNING,) if final else ())
        values: dict[str, Any] = {"trials": self._storage.get_n_trials(study_id, states)}
        if not self._baseline_known:
            baseline = self._storage.get_study_user_attrs(study_id).get("baseline")
            if baseline is not None:
                values["baseline"], self._baseline_known = baseline, True
        return values

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> str:
        """Work on the job until the search ends, the job ends elsewhere, or shutdown. Returns
        what happened: 'succeeded', 'failed', 'released' or 'lost'."""
        job = self.queue.job(self.claim.job_id)
        if job is None:
            return "lost"
        # trial heartbeats: a trial left RUNNING by a dead worker is failed (and retried) after the grace period
        self._storage = open_storage(self.settings.db_url, TrackingStorage,
                                     on_track=self.monitor.trial if self.monitor is not None else None,
                                     heartbeat_interval=self.settings.trial_heartbeat_seconds,
                                     grace_period=self.settings.trial_grace_seconds)
        done = threading.Event()
        beat = threading.Thread(target=self.heartbeat, args=(done,), daemon=True, name=f"heartbeat-{job.id}")
        beat.start()
        workdir = Path(tempfile.mkdtemp(prefix=f"job-{job.id}-", dir=self._work_root()))
        try:
            return self._run(job.spec or {}, workdir)
        finally:
            done.set()
            beat.join()
            shutil.rmtree(workdir, ignore_errors=True)
            close(self._storage)

    def _work_root(self) -> str:
        root = Path(self.settings.data_dir) / "work"
        root.mkdir(parents=True, exist_ok=True)
        return str(root)

    def _run(self, stored: dict[str, Any], workdir: Path) -> str:
        job_id = self.claim.job_id
        try:
            spec = JobSpec.from_stored(stored)
            inputs = build_inputs(spec, self.queue.inputs(job_id), self.settings, workdir)
            evaluate = self._counted(self.monitor.wrap(inputs.evaluate) if self.monitor is not None else inputs.evaluate)
            result = tuner.tune(
                inputs.model, inputs.calibration, evaluate, options=spec.options, storage=self._storage,
                study_name=study_name(job_id), should_stop=self.should_stop, on_trial=self.on_trial,
                shared=JobStore(self.queue, self.claim), worker=self.claim.worker_id,
            )
            if result.stopped or self.lost.is_set() or self.ended.is_set():
                self.queue.release(self.claim)
                return "released"
            artifacts = {name: Path(path).read_bytes() for name, path in result.save(workdir / "out").items()}
        except Exception as exc:  # the job fails with the reason, unless it was stopped under us
            if database_outage(exc):  # not the job's fault: hand the slot back and try again
                log.warning("job %s: the database is unreachable (%s): handing the slot back to resume later",
                            job_id, _first_line(exc))
                self._release_when_possible()
                return "released"
            if self.lost.is_set() or self.ended.is_set() or self.shutdown.is_set():
                log.info("job %s: stopped (%s: %s)", job_id, type(exc).__name__, exc)
                self.queue.release(self.claim)
                return "released"
            message = str(exc) if isinstance(exc, tuner.QuanttuneError) else f"{type(exc).__name__}: {exc}"
            log.exception("job %s failed", job_id)
            if not self.queue.finish(self.claim, "failed", {"error": message[:4000], **self._study_progress(final=True)}):
                return "lost"
            self._close_running_trials()
            return "failed"
        values = {
            "baseline": result.baseline, "score": result.score, "drop": result.drop,
            "coverage": result.coverage.get("macs"), "met": result.met, "deployed_score": result.deployed_score,
            "deployment": result.deployment.summary() if result.deployment is not None else None,
            "reason": result.reason, "best_score": result.score, "best_drop": result.drop,
            "best_coverage": result.coverage.get("macs"), "best_met": result.met,
            **self._study_progress(final=True),
        }
        if not self.queue.finish(self.claim, "succeeded", values, artifacts):
            return "lost"
        self._close_running_trials()
        return "succeeded"

    def _counted(self, evaluate: Callable[[nn.Module], float]) -> Callable[[nn.Module], float]:
        """`evaluate`, adding each call to the job's evaluations as it starts: every worker's calls
        (baseline, plans, the final ONNX Runtime check) add up, including one still running when
        another worker finishes the job."""

        def counted(model: nn.Module) -> float:
            try:
                self.queue.add_evaluation(self.claim.job_id)
            except Exception:  # the count is cosmetic: never let it fail an evaluation
                log.exception("job %s: counting an evaluation failed", self.claim.job_id)
            return evaluate(model)

        return counted

    def _release_when_possible(self) -> None:
        """Release the slot once the database answers again (at most one lease period; after that
        the lease has expired and any worker, this one included, reclaims it)."""
        deadline = time.monotonic() + self.settings.lease_seconds
        while not self.shutdown.is_set() and time.monotonic() < deadline:
            try:
                self.queue.release(self.claim)
                return
            except Exception as exc:
                if not database_outage(exc):
                    raise
                self.shutdown.wait(1.0)

    def _close_running_trials(self) -> None:
        """The job is over: a trial still RUNNING (its worker was killed, or a co-worker is midway)
        can no longer change the result; mark it FAIL so the study reads as finished."""
        try:
            fail_running(self._storage, running_trials(self._storage, self.claim.job_id),
                         "interrupted: the job finished while this trial was running (or its worker had stopped)")
        except Exception:
            log.exception("job %s: closing running trials failed", self.claim.job_id)
