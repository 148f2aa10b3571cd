"""The job queue in the database: claim a slot of a job with a lease, renew it by heartbeat,
release it, and finish a job only while still owning a slot of it.

A job has `parallelism` slots (rows of `qt_leases`); a worker works on a job while it owns one
slot. A claim takes a free slot, or a slot whose lease expired (its worker died or hung): one
atomic statement decides, `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL and a conditional
`UPDATE ... WHERE worker_id IS NULL OR expires_at < now` (checked by its row count) on both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, exists, or_, select, update
from sqlalchemy.orm import Session

from .db import epoch, make_sessionmaker, utcnow
from .models import JobRecord, JobFile, Lease

log = logging.getLogger("quanttune.worker")
ACTIVE = ("queued", "running")


@dataclass(frozen=True)
class Claim:
    job_id: int
    slot: int
    worker_id: str
    reclaimed_from: str | None = None  # the worker whose stale lease this claim took over


class Queue:
    def __init__(self, engine: Engine, lease_seconds: float) -> None:
        self.engine = engine
        self.sessions = make_sessionmaker(engine)
        self.lease_seconds = lease_seconds
        self.postgres = engine.dialect.name == "postgresql"

    # -- claiming -------------------------------------------------------------------------------
    def claim(self, worker_id: str) -> Claim | None:
        """Take one free or stale slot of the oldest active job, or None when there is none."""
        with self.sessions() as session:
            now = epoch()
            claimable = and_(JobRecord.status.in_(ACTIVE), or_(Lease.worker_id.is_(None), Lease.expires_at < now))
            query = (select(Lease.job_id, Lease.slot, Lease.worker_id).join(JobRecord, JobRecord.id == Lease.job_id)
                     .where(claimable).order_by(Lease.job_id, Lease.slot))
            if self.postgres:
                query = query.limit(1).with_for_update(of=Lease, skip_locked=True)
            else:
                query = query.limit(20)
            for job_id, slot, previous in session.execute(query).all():
                taken = session.execute(
                    update(Lease)
                    .where(Lease.job_id == job_id, Lease.slot == slot,
                           or_(Lease.worker_id.is_(None), Lease.expires_at < now),
                           exists().where(JobRecord.id == job_id, JobRecord.status.in_(ACTIVE)))
                    .values(worker_id=worker_id, expires_at=now + self.lease_seconds, claims=Lease.claims + 1)
                    .execution_options(synchronize_session=False)
                ).rowcount
                if taken != 1:
                    continue  # another worker won this slot between our SELECT and UPDATE (SQLite)
                session.execute(update(JobRecord).where(JobRecord.id == job_id, JobRecord.status == "queued")
                                .values(status="running", started_at=utcnow(), updated_at=utcnow())
                                .execution_options(synchronize_session=False))
                session.commit()
                if previous is not None:
                    log.warning("job %s slot %s: reclaimed the stale lease of worker %s", job_id, slot, previous)
                return Claim(job_id, slot, worker_id, previous)
            session.rollback()
            return None

    # -- owning ----------------------------------------------------------------------------------
    def _own(self, session: Session, claim: Claim) -> bool:
        """Renew the lease if this worker still owns it (locks the row until commit)."""
        return session.execute(
            update(Lease).where(Lease.job_id == claim.job_id, Lease.slot == claim.slot,
                                Lease.worker_id == claim.worker_id)
            .values(expires_at=epoch() + self.lease_seconds).execution_options(synchronize_session=False)
        ).rowcount == 1

    def renew(self, claim: Claim) -> bool:
        """Heartbeat: extend the lease; False when the slot was lost (reclaimed or job deleted)."""
        with self.sessions() as session:
            owned = self._own(session, claim)
            session.commit()
            return owned

    def release(self, claim: Claim) -> None:
        with self.sessions() as session:
            session.execute(update(Lease).where(Lease.job_id == claim.job_id, Lease.slot == claim.slot,
                                                Lease.worker_id == claim.worker_id)
                            .values(worker_id=None, expires_at=None).execution_options(synchronize_session=False))
            session.commit()

    def status(self, job_id: int) -> str | None:
        with self.sessions() as session:
            return session.scalar(select(JobRecord.status).where(JobRecord.id == job_id))

    def job(self, job_id: int) -> JobRecord | None:
        with self.sessions() as session:
            return session.get(JobRecord, job_id)

    def inputs(self, job_id: int) -> dict[str, tuple[str, bytes]]:
        """The job's uploads: role -> (filename, bytes)."""
        with self.sessions() as session:
            rows = session.execute(select(JobFile.role, JobFile.filename, JobFile.data)
                                   .where(JobFile.job_id == job_id, JobFile.kind == "input")).all()
            return {role: (filename, data) for role, filename, data in rows}

    # -- progress and the end -------------------------------------------------------------------
    def add_evaluation(self, job_id: int) -> None:
        """One more call of the job's evaluation (by any worker, whatever the job's status now)."""
        with self.sessions() as session:
            session.execute(update(JobRecord).where(JobRecord.id == job_id).values(evaluations=JobRecord.evaluations + 1)
                            .execution_options(synchronize_session=False))
            session.commit()

    def progress(self, claim: Claim, values: dict[str, Any], *, add_trials: int = 0) -> bool:
        """Write progress fields while owning a running job; False when not."""
        with self.sessions() as session:
            if not self._own(session, claim):
                session.rollback()
                return False
            changes: dict[str, Any] = {**values, "updated_at": utcnow()}
            if add_trials:
                changes["trials"] = JobRecord.trials + add_trials
            done = session.execute(update(JobRecord).where(JobRecord.id == claim.job_id, JobRecord.status == "running")
                                   .values(**changes).execution_options(synchronize_session=False)).rowcount
            session.commit()
            return done == 1

    def finish(self, claim: Claim, status: str, values: dict[str, Any],
               artifacts: dict[str, bytes] | None = None) -> bool:
        """End the job (`succeeded` or `failed`) with its outcome and artifacts, in one
        transaction, only if this worker still owns its slot and the job is still running."""
        import hashlib

        assert status in ("succeeded", "failed")
        with self.sessions() as session:
            if not self._own(session, claim):
                session.rollback()
                log.warning("job %s: not finished as %s: slot %s no longer owned", claim.job_id, status, claim.slot)
                return False
            now = utcnow()
            done = session.execute(update(JobRecord).where(JobRecord.id == claim.job_id, JobRecord.status == "running")
                                   .values(status=status, finished_at=now, updated_at=now, **values)
                                   .execution_options(synchronize_session=False)).rowcount
            if done != 1:
                session.rollback()
                return False
            for name, data in (artifacts or {}).items():
                session.add(JobFile(job_id=claim.job_id, kind="artifact", role=name, filename=name, size=len(data),
                                    sha256=hashlib.sha256(data).hexdigest(), data=data))
            session.execute(update(Lease).where(Lease.job_id == claim.job_id, Lease.slot == claim.slot)
                            .values(worker_id=None, expires_at=None).execution_options(synchronize_session=False))
            session.commit()
            return True
