"""A job's shared preparation in the database (`tuner.prepared.SharedStore` for the service).

The FP32 baseline marker, the calibration statistics with the per-layer error report, and the
sensitivity ranking are computed once per job by whichever worker claims them first; the job's
other workers, and any worker that resumes the job later, load them. Each entry is a row of
`qt_files` with `kind='prepared'` and `role` = the entry's name, deleted with its job:

- while a worker computes it: `size = -1` and `filename` = that worker's id (the claim);
- once stored: the bytes, their size and SHA-256 (`filename` = the name).

A claim is taken in one transaction that first writes the job's row, which serializes the
claimants of one job (a row lock on PostgreSQL, the write lock on SQLite). A claim whose worker
no longer holds a live lease on the job (it died, or handed its slot back) is taken over. Once the
job is over (finished, failed, cancelled), nothing is claimed.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import delete, exists, select, update

from .db import epoch
from .models import JobRecord, JobFile, Lease
from .queue import Claim, Queue

KIND = "prepared"


class JobStore:
    def __init__(self, queue: Queue, claim: Claim) -> None:
        self.sessions = queue.sessions
        self.job_id = claim.job_id
        self.worker_id = claim.worker_id

    def _entry(self, name: str):  # noqa: ANN202
        return (JobFile.job_id == self.job_id, JobFile.kind == KIND, JobFile.role == name)

    def load(self, name: str) -> bytes | None:
        with self.sessions() as session:
            return session.scalar(select(JobFile.data).where(*self._entry(name), JobFile.size >= 0))

    def claim(self, name: str) -> bool:
        with self.sessions() as session:
            session.execute(update(JobRecord).where(JobRecord.id == self.job_id).values(updated_at=JobRecord.updated_at)
                            .execution_options(synchronize_session=False))  # one claimant of this job at a time
            if session.scalar(select(JobRecord.status).where(JobRecord.id == self.job_id)) not in ("queued", "running"):
                session.rollback()
                return False  # the job is over (finished by another worker, cancelled): nothing to compute
            row = session.execute(select(JobFile.id, JobFile.size, JobFile.filename).where(*self._entry(name))).first()
            if row is None:
                session.add(JobFile(job_id=self.job_id, kind=KIND, role=name, filename=self.worker_id, size=-1,
                                    sha256="", data=b""))
                session.commit()
                return True
            if row.size >= 0:  # stored meanwhile
                session.rollback()
                return False
            if row.filename != self.worker_id and session.scalar(select(exists().where(
                    Lease.job_id == self.job_id, Lease.worker_id == row.filename, Lease.expires_at >= epoch()))):
                session.rollback()
                return False  # its worker is alive and computing it
            session.execute(update(JobFile).where(JobFile.id == row.id).values(filename=self.worker_id)
                            .execution_options(synchronize_session=False))
            session.commit()
            return True

    def save(self, name: str, data: bytes) -> None:
        values = {"data": data, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "filename": name}
        with self.sessions() as session:
            done = session.execute(update(JobFile).where(*self._entry(name)).values(**values)
                                   .execution_options(synchronize_session=False)).rowcount
            if not done:
                session.add(JobFile(job_id=self.job_id, kind=KIND, role=name, **values))
            session.commit()

    def release(self, name: str) -> None:
        with self.sessions() as session:
            session.execute(delete(JobFile).where(*self._entry(name), JobFile.size < 0,
                                                  JobFile.filename == self.worker_id))
            session.commit()

    def sizes(self) -> dict[str, int]:
        """Name -> bytes of the stored entries."""
        with self.sessions() as session:
            rows = session.execute(select(JobFile.role, JobFile.size).where(
                JobFile.job_id == self.job_id, JobFile.kind == KIND, JobFile.size >= 0)).all()
            return dict(rows)
