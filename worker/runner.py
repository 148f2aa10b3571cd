"""Run one claimed job: turn its spec and uploads into (model, calibration, evaluate), call
`tuner.tune` on the job's shared Optuna study, and report progress and the outcome."""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

import tuner
from api.db import optuna_engine_kwargs
from api.references import resolve
from api.settings import Settings
from api.studies import study_name
from api.tensorfiles import check_dataset, labels, read_tensors, to_batches

from . import evaluators
from .prepared import JobStore
from .queue import Claim, Queue

log = logging.getLogger("quanttune.worker")


def tracking_storage(url: str, settings: Settings, on_track: Callable[[int], None] | None = None) -> Any:
    """An Optuna RDB storage (trial heartbeats on) that remembers the trials this process runs,
    so that the worker's heartbeat thread keeps them alive and another worker can tell a slow trial
    from one whose worker died (Optuna wraps storages in `_CachedStorage`, so this does not depend
    on the caller seeing an `RDBStorage`). `on_track(trial_id)` hears of each trial this process
    starts running (a supervised run tells its worker, which may have to fail it)."""
    import optuna

    class TrackingStorage(optuna.storages.RDBStorage):
        def __init__(self) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                super().__init__(url, engine_kwargs=optuna_engine_kwargs(url), skip_compatibility_check=True,
                                 skip_table_creation=True, heartbeat_interval=settings.trial_heartbeat_seconds,
                                 grace_period=settings.trial_grace_seconds)
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
            if on_track is not None:
                on_track(trial_id)

        def beat(self) -> None:
            """Heartbeat this process's RUNNING trials; forget the finished ones."""
            from optuna.trial import TrialState

            with self._lock:
                mine = list(self.created)
            for trial_id in mine:
                if self.get_trial(trial_id).state == TrialState.RUNNING:
                    self.record_heartbeat(trial_id)
                else:
                    with self._lock:
                        self.created.discard(trial_id)

    return TrackingStorage()


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


class JobInputError(tuner.QuanttuneError):
    """The job's model, data or references could not be turned into what `tune` takes."""


@dataclass
class Inputs:
    model: nn.Module
    calibration: list[Any]
    evaluate: Callable[[nn.Module], float]


def build_inputs(spec: dict[str, Any], files: dict[str, tuple[str, bytes]], settings: Settings, workdir: Path) -> Inputs:
    allowed = settings.allowed_modules
    batch_size = int(spec.get("batch_size", 32))
    try:
        if "model_file" in files:
            from tuner.exported import load_exported

            path = workdir / "model.pt2"
            path.write_bytes(files["model_file"][1])
            model = load_exported(path)
        else:
            model = resolve(spec["model"], allowed, field="spec.model")()
            if "weights_file" in files:
                if not isinstance(model, nn.Module):
                    raise JobInputError(f"spec.model {spec['model']!r} returned {type(model).__name__}, not an nn.Module")
                model.load_state_dict(read_tensors(files["weights_file"][1], field="weights_file"))
        if not isinstance(model, nn.Module):
            raise JobInputError(f"the model is a {type(model).__name__}, not a torch nn.Module")
        model.eval()

        if "calibration_file" in files:
            tensors = read_tensors(files["calibration_file"][1], field="calibration_file")
            check_dataset(tensors, field="calibration_file")
            calibration = to_batches(tensors, batch_size)
        else:
            calibration = list(resolve(spec["calibration"], allowed, field="spec.calibration")())
        check_fits(model, calibration)  # factory models are built here only: the API could not check this

        if spec.get("evaluate"):
            evaluate = resolve(spec["evaluate"], allowed, field="spec.evaluate")
        elif spec.get("evaluator") == "top1":
            tensors = read_tensors(files["eval_file"][1], field="eval_file")
            check_dataset(tensors, field="eval_file", need_label=True)
            evaluate = evaluators.top1(to_batches(tensors, batch_size), labels(tensors, batch_size))
        else:  # agreement with the FP32 model, on eval_file inputs or the calibration data
            if "eval_file" in files:
                tensors = read_tensors(files["eval_file"][1], field="eval_file")
                check_dataset(tensors, field="eval_file")
                batches = to_batches(tensors, batch_size)
            else:
                batches = calibration
            evaluate = evaluators.agreement(copy.deepcopy(model), batches)
    except tuner.QuanttuneError:
        raise
    except Exception as exc:  # the user's factory / data raised: the job fails with the reason
        raise JobInputError(f"preparing the job failed: {type(exc).__name__}: {str(exc)[:500]}") from exc
    return Inputs(model, calibration, evaluate)


def check_fits(model: nn.Module, calibration: list[Any]) -> None:
    """Run the model on the first calibration batch, so that data that does not fit the model
    fails the job with that reason rather than somewhere inside the search."""
    import torch

    from api.tensorfiles import describe_batch
    from tuner.batches import call_model

    if not calibration:
        raise JobInputError("the calibration data is empty: no batch to calibrate on")
    try:
        with torch.no_grad():
            call_model(model, calibration[0])
    except Exception as exc:
        raise JobInputError(f"the calibration data does not fit the model: its first batch ({describe_batch(calibration[0])}) "
                            f"raised {type(exc).__name__}: {str(exc).strip()[:500]}") from None


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
        self._storage = tracking_storage(self.settings.db_url, self.settings,
                                         on_track=self.monitor.trial if self.monitor is not None else None)
        done = threading.Event()
        beat = threading.Thread(target=self.heartbeat, args=(done,), daemon=True, name=f"heartbeat-{job.id}")
        beat.start()
        workdir = Path(tempfile.mkdtemp(prefix=f"job-{job.id}-", dir=self._work_root()))
        try:
            return self._run(job.spec, workdir)
        finally:
            done.set()
            beat.join()
            shutil.rmtree(workdir, ignore_errors=True)
            self._storage.remove_session()
            self._storage.engine.dispose()

    def _work_root(self) -> str:
        root = Path(self.settings.data_dir) / "work"
        root.mkdir(parents=True, exist_ok=True)
        return str(root)

    def _run(self, spec: dict[str, Any], workdir: Path) -> str:
        job_id = self.claim.job_id
        try:
            inputs = build_inputs(spec, self.queue.inputs(job_id), self.settings, workdir)
            evaluate = self._counted(self.monitor.wrap(inputs.evaluate) if self.monitor is not None else inputs.evaluate)
            result = tuner.tune(
                inputs.model, inputs.calibration, evaluate,
                max_drop=spec["max_drop"], relative=spec["relative"], higher_is_better=spec["higher_is_better"],
                max_trials=spec.get("max_trials"), timeout=spec.get("timeout"), storage=self._storage,
                study_name=study_name(job_id), seed=spec.get("seed", 0), space=spec.get("space"), verbose=True,
                should_stop=self.should_stop, on_trial=self.on_trial, shared=JobStore(self.queue, self.claim),
                worker=self.claim.worker_id,
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
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        try:
            study_id = self._storage.get_study_id_from_name(study_name(self.claim.job_id))
            for trial in self._storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
                try:
                    self._storage.set_trial_user_attr(trial._trial_id, "error", "interrupted: the job finished while "
                                                      "this trial was running (or its worker had stopped)")
                    self._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                except UpdateFinishedTrialError:
                    pass  # finished meanwhile by its own worker
        except Exception:
            log.exception("job %s: closing running trials failed", self.claim.job_id)
