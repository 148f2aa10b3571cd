"""quanttune workers: claim jobs from the database queue (lease + heartbeat) and run `tune` on
them, sharing each job's Optuna study with the other workers."""

from .queue import Claim, Queue
from .worker import Worker, run_worker

__all__ = ["Claim", "Queue", "Worker", "run_worker"]
