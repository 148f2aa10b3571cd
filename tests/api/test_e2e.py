"""End to end with real processes (marked slow): `quanttune serve` on a free port with a SQLite
database; and on PostgreSQL, the API plus two `quanttune worker` processes sharing one job, one of
them killed with SIGKILL mid-job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

NAIVE = {"activation": ["max"], "scheme": ["symmetric"], "weights": ["per_tensor"], "smooth": False}  # breaks 1%


def quanttune(*args: str) -> list[str]:
    exe = shutil.which("quanttune")
    return [exe, *args] if exe else [sys.executable, "-c", "from api.cli import main; main()", *args]


class Processes:
    """Child processes with their output in files, all stopped at the end (output shown on failure)."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory, self.env, self.started = directory, env, []

    def start(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.directory / f"{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(quanttune(*args), stdout=log, stderr=subprocess.STDOUT,
                                env={**self.env, **(extra_env or {})}, start_new_session=True)
        self.started.append((name, proc, log))
        return proc

    def run(self, *args: str) -> str:
        done = subprocess.run(quanttune(*args), capture_output=True, text=True, env=self.env, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{(self.directory / f'{name}.log').read_text(errors='replace')[-4000:]}"
                         for name, _, _ in self.started)

    def stop(self) -> None:
        for _, proc, _ in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, log in self.started:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


@pytest.fixture
def processes(tmp_path: Path, user_modules: Path):  # noqa: ANN201
    env = {**os.environ, "QUANTTUNE_ALLOWED_MODULES": "tuner.examples,qt_usercode", "PYTHONUNBUFFERED": "1"}
    procs = Processes(tmp_path, env)
    yield procs
    procs.stop()


def wait_http(client: httpx.Client, procs: Processes, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.get("/v1/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError("the API did not come up\n" + procs.logs())


def poll(client: httpx.Client, job_id: int, procs: Processes, until, timeout: float) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        if time.monotonic() > deadline or job["status"] in ("failed", "cancelled"):
            raise AssertionError(f"job {job_id}: {json.dumps(job)}\n{procs.logs()}")
        time.sleep(0.5)


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def submit(client: httpx.Client, spec: dict) -> int:
    response = client.post("/v1/jobs", files={"spec": (None, json.dumps(spec))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_serve_runs_a_submitted_job_to_completion(processes: Processes, tmp_path: Path, free_port) -> None:  # noqa: ANN001
    db, port = f"sqlite:///{tmp_path / 'data' / 'quanttune.db'}", free_port()
    processes.run("migrate", "--db", db)
    token = processes.run("token", "create", "--db", db, "--name", "e2e").strip().splitlines()[-1]
    serve = processes.start("serve", "serve", "--db", db, "--data-dir", str(tmp_path / "data"), "--port", str(port),
                            "--workers", "1")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                      timeout=30) as client:
        wait_http(client, processes)
        job_id = submit(client, {"name": "e2e", "model": "tuner.examples.digits:build_model",
                                 "calibration": "tuner.examples.digits:calibration_data",
                                 "evaluate": "tuner.examples.digits:evaluate", "space": NAIVE, "max_trials": 12})
        job = poll(client, job_id, processes, lambda j: j["status"] == "succeeded", timeout=300)
        assert job["met"] and job["baseline"] > 90 and job["drop"] <= 0.01
        trials = client.get(f"/v1/jobs/{job_id}/trials").json()
        assert trials["count"] >= 2 and trials["data"][0]["number"] == 0
        assert job["progress"]["trials"] == sum(t["state"] in ("COMPLETE", "FAIL") for t in trials["data"])
        model = client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx")
        assert model.status_code == 200 and len(model.content) > 1000
        assert client.get(f"/v1/jobs/{job_id}/report").json()["score"] == job["score"]
    workers = children_of(serve.pid)
    assert len(workers) == 1
    serve.send_signal(signal.SIGTERM)  # stops the API and its worker
    assert serve.wait(60) == 0, processes.logs()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "(Z)" in Path(f"/proc/{pid}/stat").read_text(), "worker left running"


@pytest.mark.postgres
def test_two_workers_share_a_job_and_one_is_killed_mid_job(processes: Processes, postgres_url: str,
                                                           tmp_path: Path, free_port) -> None:  # noqa: ANN001
    db, port = postgres_url, free_port()
    processes.run("migrate", "--db", db)
    token = processes.run("token", "create", "--db", db, "--name", "e2e").strip().splitlines()[-1]
    processes.start("api", "serve", "--db", db, "--port", str(port), "--workers", "0", "--no-migrate",
                    "--data-dir", str(tmp_path / "api"))
    worker_env = {"QT_TEST_EVAL_SLEEP": "3", "QUANTTUNE_LEASE_SECONDS": "6", "QUANTTUNE_TRIAL_GRACE_SECONDS": "12",
                  "QUANTTUNE_POLL_SECONDS": "0.3"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                      timeout=30) as client:
        wait_http(client, processes)
        job_id = submit(client, {"name": "shared", "model": "tuner.examples.digits:build_model",
                                 "calibration": "tuner.examples.digits:calibration_data",
                                 "evaluate": "qt_usercode.evals:slow", "space": NAIVE, "parallelism": 2,
                                 "max_trials": 12})
        doomed = processes.start("worker-1", "worker", "--db", db, "--data-dir", str(tmp_path / "w1"),
                                 extra_env=worker_env)
        poll(client, job_id, processes, lambda j: j["progress"]["trials"] >= 1, timeout=240)
        processes.start("worker-2", "worker", "--db", db, "--data-dir", str(tmp_path / "w2"), extra_env=worker_env)
        poll(client, job_id, processes, lambda j: j["workers"] == 2, timeout=120)

        def running_trial() -> dict | None:
            """A RUNNING trial that started under 1 s ago: its 3 s evaluation cannot end before the kill
            below, even on a busy machine (a trial caught near its end could complete first)."""
            found = client.get(f"/v1/jobs/{job_id}/trials", params={"state": "RUNNING"}).json()["data"]
            fresh = [t for t in found if t["started_at"] and datetime.now(timezone.utc)
                     - datetime.fromisoformat(t["started_at"].replace("Z", "+00:00")) < timedelta(seconds=1)]
            return fresh[0] if fresh else None

        deadline = time.monotonic() + 60
        while (interrupted := running_trial()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert interrupted is not None, processes.logs()
        # worker-2 has not started searching yet (it prints the baseline first): the RUNNING trial is worker-1's
        assert "[quanttune] baseline" not in (tmp_path / "worker-2.log").read_text(), processes.logs()
        before = client.get(f"/v1/jobs/{job_id}/trials", params={"state": "COMPLETE"}).json()["data"]
        assert before and client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        os.kill(doomed.pid, signal.SIGKILL)  # mid-trial
        doomed.wait(10)
        job = poll(client, job_id, processes, lambda j: j["status"] == "succeeded", timeout=300)
        after = {t["number"]: t for t in client.get(f"/v1/jobs/{job_id}/trials", params={"limit": 1000}).json()["data"]}
        for trial in before:  # every trial completed before the kill is kept, unchanged
            assert after[trial["number"]]["state"] == "COMPLETE"
            assert after[trial["number"]]["score"] == trial["score"]
        assert job["met"] and job["drop"] <= 0.01 and job["artifacts"]
        assert len([t for t in after.values() if t["state"] == "COMPLETE"]) > len(before)  # the survivor went on
        assert job["progress"]["trials"] == sum(t["state"] in ("COMPLETE", "FAIL") for t in after.values())
        assert not [t for t in after.values() if t["state"] == "RUNNING"]  # the killed worker's trial is closed
        assert after[interrupted["number"]]["state"] == "FAIL" and after[interrupted["number"]]["error"]
        assert interrupted["summary"] and any(  # its plan was tried again, by the survivor
            t["number"] > interrupted["number"] and t["summary"] == interrupted["summary"] and t["state"] == "COMPLETE"
            for t in after.values())
