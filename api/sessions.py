"""The database session of a request (the engine and the sessions come from `worker.db`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from worker.db import is_sqlite


async def request_session(request: Request) -> AsyncIterator[Session]:
    """FastAPI dependency: one session per request, shared by the auth check and the route (FastAPI
    caches a dependency per request). Opened in the event loop (no I/O until the first query, which
    the sync dependencies and routes run in the thread pool); closed there too on SQLite (a local
    rollback), in the thread pool elsewhere (a round trip to the server)."""
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        if is_sqlite(str(request.app.state.engine.url)):
            session.close()
        else:
            await run_in_threadpool(session.close)
