"""The API's two thread pools (anyio's, per event loop).

Database work and the sync routes run in anyio's default pool, kept small: the work is short and
holds the GIL most of the time, so more threads only queue on the GIL and on each other. Measured
with wrk (16 connections, one API process, SQLite): 40 threads answered `GET /v1/jobs` at 5.1 ms of
API CPU per request (8 threads: 3.8 ms) and p99 140-250 ms; 1-2 threads at 2.8-3.2 ms and p99 58-70 ms. PostgreSQL
gets more threads because they also wait on the network.

Checking and storing uploads takes seconds for a large model, so job submission runs that in a
pool of its own: a burst of submissions never holds up reads.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from anyio.lowlevel import RunVar

from worker.db import is_sqlite

UPLOAD_THREADS = 4
_T = TypeVar("_T")
_uploads: RunVar[CapacityLimiter] = RunVar("quanttune_upload_limiter")


def default_threads(db_url: str) -> int:
    return 2 if is_sqlite(db_url) else 8


def set_request_threads(threads: int) -> None:
    """Size the default pool of the running event loop (call from the app's lifespan)."""
    anyio.to_thread.current_default_thread_limiter().total_tokens = threads


async def run_upload_work(function: Callable[..., _T], *args: Any) -> _T:
    """`function(*args)` in the upload pool of the running event loop."""
    try:
        limiter = _uploads.get()
    except LookupError:
        limiter = CapacityLimiter(UPLOAD_THREADS)
        _uploads.set(limiter)
    return await anyio.to_thread.run_sync(partial(function, *args), limiter=limiter)
