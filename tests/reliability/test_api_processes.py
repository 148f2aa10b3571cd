"""`quanttune serve --api-processes 2`: two API processes on one port, each stateless. Reads,
writes and a dashboard session work whichever process answers, a job runs to the end, and SIGTERM
stops the API processes and the worker. Throughput is measured by benchmarks/bench_load.py."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support import Processes, submit, wait_http, wait_job

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def test_two_api_processes_serve_one_port_and_stop_together(processes: Processes, tmp_path: Path,
                                                            free_port, wait_until) -> None:  # noqa: ANN001
    db, port = f"sqlite:///{tmp_path / 'quanttune.db'}", free_port()
    token = processes.migrate_and_create_token(db, "alice")
    serve = processes.start("serve", "serve", "--db", db, "--data-dir", str(tmp_path / "data"), "--port", str(port),
                            "--workers", "1", "--api-processes", "2", "--no-migrate")
    url = f"http://127.0.0.1:{port}"
    wait_http(url, processes, process=serve)

    # serve's children: the worker and two uvicorn server processes (spawned by multiprocessing)
    spawned = wait_until(lambda: len(s := [p for p in children(serve.pid) if "spawn_main" in cmdline(p)]) == 2
                         and s, 60, message="two API processes")
    worker = [p for p in children(serve.pid) if "-m worker" in cmdline(p)]
    assert len(worker) == 1, [cmdline(p) for p in children(serve.pid)]

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        job_id = submit(client, {"name": "two processes", "model": "tuner.examples.digits:build_model",
                                 "calibration": "tuner.examples.digits:calibration_data",
                                 "evaluate": "tuner.examples.digits:evaluate", "max_trials": 5})
        job = wait_job(client, job_id, lambda j: j["status"] == "succeeded", 300, processes)
        assert job["met"] and "model.onnx" in job["artifacts"]

        # many concurrent reads over fresh connections (each may land on either process): all answered alike
        def read(_: int) -> tuple[int, int]:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as own:
                return own.get(f"/v1/jobs/{job_id}").status_code, own.get("/v1/jobs").json()["count"]

        before = {pid: cpu_ticks(pid) for pid in spawned}
        for _ in range(10):  # until both processes have served some (the kernel picks who accepts)
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(read, range(64)))
            assert answers == [(200, 1)] * 64
            if all(cpu_ticks(pid) > before[pid] + 1 for pid in spawned):
                break
        assert all(cpu_ticks(pid) > before[pid] + 1 for pid in spawned), (before, {p: cpu_ticks(p) for p in spawned})
        assert client.get(f"/v1/jobs/{job_id}/trials").json()["count"] == job["progress"]["trials"]

    # a dashboard session made by one process is honoured by the other: stateless signed cookie
    with httpx.Client(base_url=url, timeout=60) as browser:
        login = browser.post("/dashboard/login", data={"token": token, "next": "/dashboard/"})
        assert login.status_code == 303 and "quanttune_session" in browser.cookies
        cookie = browser.cookies["quanttune_session"]
    for _ in range(16):  # new connection each time
        with httpx.Client(base_url=url, cookies={"quanttune_session": cookie}, timeout=60) as browser:
            assert browser.get(f"/v1/jobs/{job_id}").json()["id"] == job_id
            assert browser.get(f"/dashboard/jobs/{job_id}").status_code == 200

    assert processes.stop("serve", signal.SIGTERM) == 0, processes.logs()
    for pid in [*spawned, *worker]:  # nothing outlives serve
        wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or "zombie" in _state(pid), 30,
                   message=f"process {pid} ({pid in worker and 'worker' or 'API'}) to exit")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _state(pid: int) -> str:
    try:
        return "zombie" if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z" else "alive"
    except FileNotFoundError:
        return "zombie"
