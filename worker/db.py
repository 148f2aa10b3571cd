"""Engines and sessions. Nothing connects at import time: `make_engine(url)` is called by the
app factory, the workers and the CLI."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def utcnow() -> datetime:
    """Naive UTC (what every backend stores alike); the API marks it UTC on the way out."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def epoch() -> float:
    """Lease clock: seconds since the epoch (workers on several machines need synced clocks)."""
    return time.time()


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str) -> Engine:
    if is_sqlite(url):
        # more connections than the API's threads (api/threads.py) and the dashboard's own sessions:
        # requests wait on SQLite's lock (busy_timeout), never on the pool
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=10,
                               max_overflow=30)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=30)


def optuna_engine_kwargs(url: str) -> dict:
    """For `optuna.storages.RDBStorage(url, engine_kwargs=...)`: on SQLite, wait for the write lock
    as our own engine does, instead of failing after sqlite3's default 5 s."""
    return {"connect_args": {"timeout": 60}} if is_sqlite(url) else {"pool_pre_ping": True}


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
