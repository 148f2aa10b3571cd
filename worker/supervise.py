"""Supervised runs: a job with a per-trial timeout is tuned in a child process that its worker
can kill.

An evaluation that hangs cannot be interrupted from inside its process (no thread can stop
another), so a worker that must bound an evaluation runs the job's `JobRun` in a fresh child
(`spawn`: nothing inherited from a process that already ran torch) and watches it:

- the child reports each trial it starts and the start and end of each call of the evaluation;
- an evaluation running longer than `trial_timeout` seconds: the child is killed, its running
  trial is marked FAIL with the error ``timed out after Ns (trial_timeout) ...`` (an error, so
  the search takes it as a verdict and does not retry it as an interrupted trial), and a fresh
  child resumes the study (the baseline and every finished trial are in the database);
  the FP32 baseline or the final check of the exported model timing out fails the job instead;
- the child dying on its own (a crash in native code, the OOM killer) is handled alike: the
  trial it was evaluating fails with the reason and the study resumes, up to `MAX_CRASHES` times
  in a row; dying outside a trial fails the job;
- the job cancelled, deleted or finished elsewhere while the child evaluates: the child is
  stopped at once instead of after its trial;
- SIGTERM to the worker is passed on: the child stops after its current trial as usual.

The child dies with its worker (`PR_SET_PDEATHSIG`), so a SIGKILLed worker leaves nothing running:
its trial is then failed and retried through the trial heartbeat, as without supervision.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from .queue import Claim, Queue
from .settings import Settings
from .signals import die_with_parent
from .studies import baseline_known, close, fail_running, open_storage

log = logging.getLogger("quanttune.worker")
SPAWN = multiprocessing.get_context("spawn")
MAX_CRASHES = 3  # the child dying in a trial this many times in a row fails the job
POLL_S = 0.2


# -- the child ---------------------------------------------------------------------------------


class Monitor:
    """The child's side: tells the worker which trial runs and when an evaluation starts/ends."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, *message: Any) -> None:
        with self._lock:
            try:
                self.conn.send(message)
            except (OSError, ValueError):  # the worker is gone: PR_SET_PDEATHSIG ends us
                pass

    def trial(self, trial_id: int) -> None:
        self.send("trial", trial_id)

    def wrap(self, evaluate: Callable[[Any], float]) -> Callable[[Any], float]:
        def supervised(model: Any) -> float:
            self.send("eval")
            try:
                return evaluate(model)
            finally:
                self.send("done")

        return supervised


def _die_with(parent_pid: int) -> None:
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the worker died before we asked
        os._exit(1)


def child_main(settings: Settings, claim: Claim, conn: Any, parent_pid: int) -> None:
    """Entry point of the child process: run the claimed slot like an unsupervised worker."""
    _die_with(parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .db import make_engine
    from .runner import JobRun

    shutdown = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # the worker passes its SIGTERM on: stop after this trial
        signal.signal(signum, lambda *_: shutdown.set())
    engine = make_engine(settings.db_url)
    monitor = Monitor(conn)
    try:
        outcome = JobRun(Queue(engine, settings.lease_seconds), claim, settings, shutdown, monitor=monitor).run()
        monitor.send("outcome", outcome)
    finally:
        engine.dispose()
        conn.close()


# -- the worker's side -------------------------------------------------------------------------


class Supervisor:
    """Run one claimed slot in child processes, bounding each evaluation to `trial_timeout` s."""

    def __init__(self, queue: Queue, claim: Claim, settings: Settings, shutdown: threading.Event,
                 trial_timeout: float) -> None:
        self.queue, self.claim, self.settings, self.shutdown = queue, claim, settings, shutdown
        self.trial_timeout = float(trial_timeout)
        self.crashes = 0
        self._storage: Any = None

    def run(self) -> str:
        """'succeeded', 'failed', 'released' or 'lost', as `JobRun.run`."""
        try:
            while True:
                outcome = self._run_child()
                if outcome is not None:
                    return outcome
                if self.shutdown.is_set():
                    self.queue.release(self.claim)
                    return "released"
                log.info("job %s: resuming the study in a fresh process", self.claim.job_id)
        finally:
            if self._storage is not None:
                close(self._storage)

    # -- one child -------------------------------------------------------------------------------
    def _run_child(self) -> str | None:
        """Start a child and watch it; its outcome, or None to start another one."""
        receiver, sender = SPAWN.Pipe(duplex=False)
        child = SPAWN.Process(target=child_main, args=(self.settings, self.claim, sender, os.getpid()),
                              name=f"quanttune-job-{self.claim.job_id}", daemon=False)
        child.start()
        sender.close()  # the child holds the only writer: EOF when it exits
        trials: set[int] = set()
        evaluating_since: float | None = None
        outcome: str | None = None
        next_check = next_renewal = time.monotonic()
        passed_on = False
        try:
            while True:
                if receiver.poll(POLL_S):
                    try:
                        message = receiver.recv()
                    except (EOFError, OSError):
                        break  # the child exited (or died)
                    kind = message[0]
                    if kind == "trial":
                        trials.add(message[1])
                    elif kind == "eval":
                        evaluating_since = time.monotonic()
                    elif kind == "done":
                        evaluating_since = None
                    elif kind == "outcome":
                        outcome = message[1]
                    continue
                if not child.is_alive():
                    break
                if self.shutdown.is_set() and not passed_on:
                    os.kill(child.pid, signal.SIGTERM)  # stop after the current trial, hand the slot back
                    passed_on = True
                now = time.monotonic()
                if now >= next_renewal:  # the child renews the lease too, but not while it starts up
                    next_renewal = now + self.settings.heartbeat_interval
                    self._renew()
                if evaluating_since is not None and now - evaluating_since > self.trial_timeout:
                    self._kill(child)
                    return self._timed_out(trials)
                if evaluating_since is not None and now >= next_check:
                    next_check = now + 1.0
                    if self._job_over():
                        log.info("job %s: no longer running: stopping its evaluation at once", self.claim.job_id)
                        self._kill(child)
                        self._fail_running(trials, "stopped: the job was cancelled, deleted or finished elsewhere "
                                                   "while this trial was running")
                        self.queue.release(self.claim)
                        return "released"
        finally:
            self._kill(child)
            receiver.close()
        if outcome is not None:
            self.crashes = 0
            return outcome
        return self._died(child.exitcode, trials)

    def _kill(self, child: Any) -> None:
        if child.is_alive():
            child.kill()
        child.join(30)

    def _renew(self) -> None:
        try:
            self.queue.renew(self.claim)  # a no-op once the slot was released, finished or taken over
        except Exception:
            log.exception("job %s: lease renewal failed", self.claim.job_id)

    def _job_over(self) -> bool:
        try:
            return self.queue.status(self.claim.job_id) != "running"
        except Exception:  # a database hiccup is not a cancel
            log.exception("job %s: status check failed", self.claim.job_id)
            return False

    # -- verdicts --------------------------------------------------------------------------------
    def _timed_out(self, trials: set[int]) -> str | None:
        limit = f"{self.trial_timeout:g}s"
        failed = self._fail_running(trials, f"timed out after {limit} (trial_timeout): the evaluation was stopped")
        if failed:
            log.warning("job %s: trial(s) %s timed out after %s: marked FAIL", self.claim.job_id, failed, limit)
            return None
        what = ("the evaluation of the FP32 baseline" if not self._baseline_known()
                else "the evaluation of the exported INT8 model (ONNX Runtime)")
        return self._fail_job(f"{what} timed out after {limit} (trial_timeout)")

    def _died(self, exitcode: int | None, trials: set[int]) -> str | None:
        how = _exit_reason(exitcode)
        if self.shutdown.is_set():
            self._fail_running(trials, f"interrupted: the worker was stopping and its process {how}")
            return None
        failed = self._fail_running(trials, f"the evaluation's process {how}")
        if failed:
            self.crashes += 1
            log.warning("job %s: the process running trial(s) %s %s (%s in a row)", self.claim.job_id, failed, how,
                        self.crashes)
            if self.crashes < MAX_CRASHES:
                return None
            return self._fail_job(f"the job's process {how} in {MAX_CRASHES} trials in a row")
        return self._fail_job(f"the job's process {how} outside any trial (while preparing, calibrating or "
                              "exporting)")

    def _fail_job(self, message: str) -> str:
        log.error("job %s failed: %s", self.claim.job_id, message)
        if not self.queue.finish(self.claim, "failed", {"error": message}):
            return "lost"
        return "failed"

    # -- the study -------------------------------------------------------------------------------
    def storage(self) -> Any:
        if self._storage is None:
            self._storage = open_storage(self.settings.db_url)
        return self._storage

    def _fail_running(self, trials: set[int], error: str) -> list[int]:
        """Mark FAIL, with `error`, those of `trials` still RUNNING; their numbers."""
        return fail_running(self.storage(), trials, error)

    def _baseline_known(self) -> bool:
        return baseline_known(self.storage(), self.claim.job_id)


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode} without a result"
