"""The job queue on SQLite and on a real PostgreSQL: claims, leases, stale-lease reclaim,
finishing only while owning, and concurrent claims never exceeding a job's parallelism."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select

from worker.db import make_engine, make_sessionmaker
from api.jobs import create_job
from worker.models import JobRecord, JobFile, Lease, Token
from api.schemas import JobCreate
from worker.queue import Queue

SPEC = {"model": "tuner.examples.digits:build_model", "calibration": "tuner.examples.digits:calibration_data",
        "evaluate": "tuner.examples.digits:evaluate"}


@pytest.fixture
def store(migrated_db):  # noqa: ANN001, ANN201
    engine = make_engine(migrated_db)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        owner = Token(name="owner", token_hash="0" * 64)
        session.add(owner)
        session.commit()
        owner_id = owner.id

    def submit(parallelism: int = 1) -> int:
        with sessions() as session:
            return create_job(session, owner_id, JobCreate(**SPEC, parallelism=parallelism), {}).id

    yield engine, sessions, submit
    engine.dispose()


def status(sessions, job_id: int) -> str:  # noqa: ANN001
    with sessions() as session:
        return session.scalar(select(JobRecord.status).where(JobRecord.id == job_id))


def test_claim_takes_the_oldest_job_and_marks_it_running(store) -> None:  # noqa: ANN001
    engine, sessions, submit = store
    queue = Queue(engine, lease_seconds=30)
    assert queue.claim("w1") is None
    first, second = submit(), submit()
    claim = queue.claim("w1")
    assert (claim.job_id, claim.slot, claim.reclaimed_from) == (first, 0, None)
    assert status(sessions, first) == "running" and status(sessions, second) == "queued"
    other = queue.claim("w2")  # the first job has one slot, taken: the next worker gets the second job
    assert other.job_id == second
    assert queue.claim("w3") is None


def test_parallelism_bounds_the_workers_of_one_job(store) -> None:  # noqa: ANN001
    engine, _, submit = store
    queue = Queue(engine, lease_seconds=30)
    job = submit(parallelism=2)
    claims = [queue.claim(f"w{i}") for i in range(3)]
    assert [(c.job_id, c.slot) for c in claims[:2]] == [(job, 0), (job, 1)]
    assert claims[2] is None


def test_concurrent_claims_never_exceed_parallelism(store) -> None:  # noqa: ANN001
    engine, sessions, submit = store
    queue = Queue(engine, lease_seconds=30)
    job = submit(parallelism=3)
    results: list = []
    barrier = threading.Barrier(8)

    def grab(i: int) -> None:
        barrier.wait()
        results.append(queue.claim(f"worker-{i}"))

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [c for c in results if c is not None]
    assert sorted(c.slot for c in won) == [0, 1, 2]
    assert len({c.worker_id for c in won}) == 3
    with sessions() as session:
        owners = session.scalars(select(Lease.worker_id).where(Lease.job_id == job).order_by(Lease.slot)).all()
    assert owners == [c.worker_id for c in sorted(won, key=lambda c: c.slot)]


def test_stale_lease_is_reclaimed_and_the_old_owner_can_no_longer_finish(store) -> None:  # noqa: ANN001
    engine, sessions, submit = store
    queue = Queue(engine, lease_seconds=0.3)
    job = submit()
    dead = queue.claim("dead-worker")
    assert queue.claim("w2") is None  # the lease is fresh
    time.sleep(0.5)  # no heartbeat: the lease expires
    alive = queue.claim("w2")
    assert (alive.job_id, alive.slot, alive.reclaimed_from) == (job, 0, "dead-worker")
    assert not queue.renew(dead)
    assert not queue.progress(dead, {"best_score": 1.0}, add_trials=1)
    assert not queue.finish(dead, "succeeded", {"score": 1.0}, {"plan.json": b"{}"})
    assert status(sessions, job) == "running"
    assert queue.renew(alive)
    assert queue.finish(alive, "succeeded", {"score": 97.0}, {"plan.json": b"{}"})
    with sessions() as session:
        done = session.get(JobRecord, job)
        assert (done.status, done.score) == ("succeeded", 97.0) and done.finished_at is not None
        assert session.scalars(select(JobFile.role).where(JobFile.job_id == job)).all() == ["plan.json"]
        assert session.scalar(select(Lease.worker_id).where(Lease.job_id == job)) is None


def test_heartbeat_keeps_the_lease(store) -> None:  # noqa: ANN001
    engine, _, submit = store
    queue = Queue(engine, lease_seconds=0.6)
    submit()
    claim = queue.claim("w1")
    for _ in range(4):  # 1.2 s in all, twice the lease, renewed every 0.3 s
        time.sleep(0.3)
        assert queue.renew(claim)
    assert queue.claim("w2") is None


def test_finished_cancelled_and_deleted_jobs_are_not_claimed(store) -> None:  # noqa: ANN001
    engine, sessions, submit = store
    queue = Queue(engine, lease_seconds=30)
    cancelled, deleted = submit(parallelism=2), submit()
    claim = queue.claim("w1")
    assert claim.job_id == cancelled
    with sessions() as session:
        session.get(JobRecord, cancelled).status = "cancelled"
        session.delete(session.get(JobRecord, deleted))
        session.commit()
    assert queue.claim("w2") is None  # slot 1 of the cancelled job is free but the job is over
    assert queue.status(cancelled) == "cancelled"
    assert not queue.progress(claim, {"best_score": 1.0})  # owning the slot, but the job is not running
    assert not queue.finish(claim, "succeeded", {"score": 1.0})
    assert status(sessions, cancelled) == "cancelled"
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Lease).where(Lease.job_id == deleted)) == 0


def test_progress_accumulates_trials_from_several_workers(store) -> None:  # noqa: ANN001
    engine, sessions, submit = store
    queue = Queue(engine, lease_seconds=30)
    job = submit(parallelism=2)
    a, b = queue.claim("a"), queue.claim("b")
    for claim in (a, b, a):
        assert queue.progress(claim, {"best_score": 96.5, "evaluations": JobRecord.evaluations + 2}, add_trials=1)
    with sessions() as session:
        row = session.get(JobRecord, job)
        assert (row.trials, row.evaluations, row.best_score) == (3, 6, 96.5)
    queue.release(a)
    assert queue.claim("c").slot == a.slot
