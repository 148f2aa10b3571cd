"""quanttune workers: everything a job is below HTTP. The job store (settings, tables and
migrations, stored inputs and references, the job's Optuna study), the queue (lease, heartbeat,
finish only while owning) and the processes that claim jobs and run `tune` on them, sharing each
job's Optuna study with the other workers. Imports `tuner`, never `api` nor a web framework.

Names are imported on first use, so that `worker.references` or `worker.settings` stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .process import Worker, run_worker
    from .queue import Claim, Queue

_LAZY = {"Claim": "queue", "Queue": "queue", "Worker": "process", "run_worker": "process"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'worker' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
