"""Restarts with real processes while a job runs: the API killed and started again (workers carry
on, nothing is lost), and PostgreSQL stopped and started again (the API answers 503 meanwhile, the
worker process stays up, both reconnect, the job completes with every earlier trial kept)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import DIGITS, NAIVE
from tests.support import Processes, wait_http, wait_job

pytestmark = pytest.mark.slow
SLOW_JOB = {**DIGITS, "evaluate": "qt_faults.evals:slow", "space": NAIVE, "max_trials": 8}
WORKER_ENV = {"QT_TEST_EVAL_SLEEP": "1.5", "QUANTTUNE_LEASE_SECONDS": "8", "QUANTTUNE_TRIAL_GRACE_SECONDS": "6",
              "QUANTTUNE_TRIAL_HEARTBEAT_SECONDS": "2"}


def finished_trials(client: httpx.Client, job_id: int) -> dict[int, dict]:
    data = client.get(f"/v1/jobs/{job_id}/trials", params={"limit": 1000}).json()["data"]
    return {t["number"]: t for t in data if t["state"] in ("COMPLETE", "FAIL")}


def start_api(processes: Processes, db: str, port: int, tmp_path: Path) -> None:
    processes.start("api", "serve", "--db", db, "--port", str(port), "--workers", "0", "--no-migrate",
                    "--data-dir", str(tmp_path / "api"))


def start_service(processes: Processes, fault_code: Path, db: str, port: int,
                  tmp_path: Path) -> tuple[str, str, subprocess.Popen]:
    """A migrated database, a token, the API (answering) and one worker: (token, API URL, worker)."""
    processes.env.update(PYTHONPATH=os.environ["PYTHONPATH"], QT_FAULT_DIR=str(fault_code))
    token = processes.migrate_and_create_token(db, "restart")
    start_api(processes, db, port, tmp_path)
    url = f"http://127.0.0.1:{port}"
    wait_http(url, processes)
    worker = processes.start("worker", "worker", "--db", db, "--data-dir", str(tmp_path / "worker"), env=WORKER_ENV)
    return token, url, worker


def test_api_restarted_while_a_job_runs_loses_nothing(processes: Processes, fault_code: Path, tmp_path: Path,
                                                      free_port) -> None:  # noqa: ANN001
    db, port = f"sqlite:///{tmp_path / 'quanttune.db'}", free_port()
    token, url, worker = start_service(processes, fault_code, db, port, tmp_path)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        job_id = client.post("/v1/jobs", files={"spec": (None, json.dumps(SLOW_JOB))}).json()["id"]
        wait_job(client, job_id, lambda j: j["progress"]["trials"] >= 1, 240, processes)
        before = finished_trials(client, job_id)
        processes.stop("api", signal.SIGKILL)  # a crash, not a graceful stop
        with pytest.raises(httpx.TransportError):
            client.get("/v1/health")
        down = time.monotonic()
        # the worker carries on without the API: trials keep landing in the database
        from worker.db import make_engine, make_sessionmaker
        from worker.models import JobRecord

        engine = make_engine(db)
        sessions = make_sessionmaker(engine)

        def trials_in_db() -> int:
            with sessions() as session:
                return session.get(JobRecord, job_id).trials

        while trials_in_db() <= len(before) and time.monotonic() - down < 120:
            time.sleep(0.5)
        engine.dispose()
        assert trials_in_db() > len(before), processes.logs()
        start_api(processes, db, port, tmp_path)
        wait_http(url, processes)
        job = wait_job(client, job_id, lambda j: j["status"] == "succeeded", 300, processes)
        after = finished_trials(client, job_id)
        assert all(after[n]["state"] == t["state"] and after[n]["score"] == t["score"] for n, t in before.items())
        assert job["met"] and job["artifacts"] and job["progress"]["trials"] == len(after) > len(before)
        assert worker.poll() is None  # the same worker process did it all
        # and the restarted API takes new work
        assert client.post("/v1/jobs", files={"spec": (None, json.dumps({**DIGITS, "max_trials": 1}))}).status_code == 201


@pytest.mark.postgres
def test_postgresql_restarted_while_a_job_runs_workers_and_api_reconnect(processes: Processes, fault_code: Path,
                                                                         postgres_server, postgres_url: str,  # noqa: ANN001
                                                                         tmp_path: Path, free_port) -> None:  # noqa: ANN001
    db, port = postgres_url, free_port()
    token, url, worker = start_service(processes, fault_code, db, port, tmp_path)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    pg_ctl = [*as_postgres, str(postgres_server.bindir / "pg_ctl"), "-D", str(postgres_server.datadir)]
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        job_id = client.post("/v1/jobs", files={"spec": (None, json.dumps(SLOW_JOB))}).json()["id"]
        wait_job(client, job_id, lambda j: j["progress"]["trials"] >= 1, 240, processes)
        before = finished_trials(client, job_id)
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], check=True, capture_output=True, timeout=60)
        try:
            for path in ("/v1/health", f"/v1/jobs/{job_id}"):  # the API says so, in the error shape
                response = client.get(path)
                assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable", response.text
                assert response.headers["retry-after"] == "2"
            time.sleep(4)  # the worker meets the outage: its heartbeat and its next trial fail
        finally:
            # pg_ctl start reuses the options the server was started with (postmaster.opts)
            opts = (postgres_server.datadir / "postmaster.opts").read_text().split(None, 1)[1].strip()
            subprocess.run([*pg_ctl, "-l", str(postgres_server.datadir.parent / "log"), "-o",
                            _options(opts), "-w", "-t", "60", "start"], check=True, capture_output=True, timeout=90)
        assert client.get("/v1/health").status_code == 200  # the API reconnects by itself (pool_pre_ping)
        job = wait_job(client, job_id, lambda j: j["status"] == "succeeded", 300, processes)
        after = finished_trials(client, job_id)
        assert all(after[n]["state"] == t["state"] and after[n]["score"] == t["score"] for n, t in before.items())
        assert job["met"] and job["artifacts"] and len(after) > len(before)
        assert not [t for t in client.get(f"/v1/jobs/{job_id}/trials").json()["data"] if t["state"] == "RUNNING"]
        assert worker.poll() is None, processes.logs()  # the worker process lived through it
    log = processes.log("worker")
    if os.environ.get("QT_SHOW_LOGS"):
        print(log)
    assert "heartbeat failed" in log or "database is unreachable" in log or "poll failed" in log, log[-3000:]


def _options(opts: str) -> str:
    """postmaster.opts holds the server's full command line: keep what follows `-D <dir>` as -o."""
    parts = opts.replace('"', "").split()
    if "-D" in parts:
        index = parts.index("-D")
        parts = parts[:index] + parts[index + 2:]
    return " ".join(parts)
