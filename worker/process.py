"""The worker process (`Worker`, `run_worker`): poll for a claimable job slot, run it, repeat,
until told to stop."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid

from .db import make_engine
from .queue import Queue
from .runner import JobRun
from .settings import Settings
from .spec import JobSpec
from .supervise import Supervisor

log = logging.getLogger("quanttune.worker")


def new_worker_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    def __init__(self, settings: Settings, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or new_worker_id()
        self.engine = make_engine(settings.db_url)
        self.queue = Queue(self.engine, settings.lease_seconds)
        self.shutdown = threading.Event()

    def run_once(self) -> str | None:
        """Claim and run at most one job slot; returns the outcome, or None when idle."""
        claim = self.queue.claim(self.worker_id)
        if claim is None:
            return None
        log.info("worker %s: claimed job %s slot %s", self.worker_id, claim.job_id, claim.slot)
        trial_timeout = self.trial_timeout(claim.job_id)
        if trial_timeout is not None:  # an evaluation may have to be killed: tune in a child process
            outcome = Supervisor(self.queue, claim, self.settings, self.shutdown, trial_timeout).run()
        else:
            outcome = JobRun(self.queue, claim, self.settings, self.shutdown).run()
        log.info("worker %s: job %s slot %s -> %s", self.worker_id, claim.job_id, claim.slot, outcome)
        return outcome

    def trial_timeout(self, job_id: int) -> float | None:
        """The job's `trial_timeout`, else the operator's default (`QUANTTUNE_TRIAL_TIMEOUT`)."""
        job = self.queue.job(job_id)
        value = JobSpec.from_stored(job.spec or {}).trial_timeout if job is not None else None
        return value if value is not None else self.settings.trial_timeout

    def run(self) -> None:
        log.info("worker %s: polling %s", self.worker_id, self.engine.url.render_as_string(hide_password=True))
        while not self.shutdown.is_set():
            try:
                outcome = self.run_once()
            except Exception:  # e.g. the database is restarting: back off and retry
                log.exception("worker %s: poll failed", self.worker_id)
                outcome = None
            if outcome is None:
                self.shutdown.wait(self.settings.poll_seconds)
        self.engine.dispose()
        log.info("worker %s: stopped", self.worker_id)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: stop before the next trial, hand the slot back, exit."""

        def stop(signum: int, _frame: object) -> None:
            log.info("worker %s: signal %s, stopping after the current trial", self.worker_id, signum)
            self.shutdown.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


def run_worker(settings: Settings) -> None:
    worker = Worker(settings)
    worker.install_signal_handlers()
    worker.run()
