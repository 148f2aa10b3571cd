"""Tables of the service (prefixed `qt_` so they never meet Optuna's tables in the same
database). Trials are not here: they live in Optuna's own tables, study `job-{id}`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, deferred, mapped_column, relationship

from .db import utcnow


class Base(DeclarativeBase):
    pass


class Token(Base):
    __tablename__ = "qt_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class JobRecord(Base):
    __tablename__ = "qt_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("qt_tokens.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    model_source: Mapped[str] = mapped_column(String(400))
    calibration_source: Mapped[str] = mapped_column(String(400))
    evaluation_source: Mapped[str] = mapped_column(String(400))
    parallelism: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # progress, written by workers after each trial
    trials: Mapped[int] = mapped_column(Integer, default=0)
    evaluations: Mapped[int] = mapped_column(Integer, default=0)
    best_score: Mapped[float | None] = mapped_column(Float)
    best_drop: Mapped[float | None] = mapped_column(Float)
    best_coverage: Mapped[float | None] = mapped_column(Float)
    best_met: Mapped[bool | None] = mapped_column(Boolean)
    # outcome
    baseline: Mapped[float | None] = mapped_column(Float)
    score: Mapped[float | None] = mapped_column(Float)
    drop: Mapped[float | None] = mapped_column(Float)
    coverage: Mapped[float | None] = mapped_column(Float)
    met: Mapped[bool | None] = mapped_column(Boolean)
    deployed_score: Mapped[float | None] = mapped_column(Float)
    deployment: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # tuner Deployment.summary(): kernels, latency
    reason: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)

    files: Mapped[list[JobFile]] = relationship(back_populates="job", cascade="all, delete-orphan", passive_deletes=True)
    leases: Mapped[list[Lease]] = relationship(back_populates="job", cascade="all, delete-orphan", passive_deletes=True)


class JobFile(Base):
    """An upload (`kind='input'`, role = multipart part name) or an artifact (`kind='artifact'`,
    role = file name). Bytes live in the database so that workers on other machines need
    nothing but the database URL."""

    __tablename__ = "qt_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("qt_jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    role: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = deferred(mapped_column(LargeBinary))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    job: Mapped[JobRecord] = relationship(back_populates="files")


class Lease(Base):
    """One of a job's `parallelism` slots. A worker owns a slot while `worker_id` is its id; the
    claim expires at `expires_at` (epoch seconds) unless renewed by the worker's heartbeat."""

    __tablename__ = "qt_leases"

    job_id: Mapped[int] = mapped_column(ForeignKey("qt_jobs.id", ondelete="CASCADE"), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker_id: Mapped[str | None] = mapped_column(String(100))
    expires_at: Mapped[float | None] = mapped_column(Float)
    claims: Mapped[int] = mapped_column(Integer, default=0)

    job: Mapped[JobRecord] = relationship(back_populates="leases")
