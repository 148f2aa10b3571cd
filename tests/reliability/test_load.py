"""50 jobs submitted at the same moment to a real `quanttune serve --workers 2` (small jobs: a tiny
uploaded model, the built-in agreement evaluator, max_trials=1): all accepted, all finish, none
lost, none run twice. The timed figures are printed by benchmarks/bench_load.py, not asserted."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors
from sqlalchemy import select
from torch import nn

from tests.support import Processes, wait_http
from tuner.pt2_archive import export_model

pytestmark = pytest.mark.slow
JOBS = 50


def test_fifty_concurrent_jobs_are_all_accepted_finish_and_run_once(processes: Processes, tmp_path: Path,
                                                                    free_port, wait_until) -> None:  # noqa: ANN001
    from worker.db import make_engine, make_sessionmaker
    from worker.models import Lease

    db, port = f"sqlite:///{tmp_path / 'quanttune.db'}", free_port()
    token = processes.migrate_and_create_token(db, "load")
    processes.start("serve", "serve", "--db", db, "--data-dir", str(tmp_path / "data"), "--port", str(port),
                    "--workers", "2", "--no-migrate")
    url = f"http://127.0.0.1:{port}"
    wait_http(url, processes)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 16)
    files = {"model_file": ("tiny.pt2", export_model(model, x[:8], tmp_path / "tiny.pt2").read_bytes()),
             "calibration_file": ("calibration.safetensors", save_safetensors({"input": x}))}
    responses: list[httpx.Response] = []
    barrier = threading.Barrier(JOBS)

    def submit(i: int) -> None:
        spec = {"name": f"load {i}", "evaluator": "agreement", "max_trials": 1}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
            barrier.wait()  # all at once
            responses.append(client.post("/v1/jobs", files={"spec": (None, json.dumps(spec)), **files}))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(JOBS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert sorted(r.status_code for r in responses) == [201] * JOBS, [r.text for r in responses if r.status_code != 201]
    ids = sorted(r.json()["id"] for r in responses)
    assert len(set(ids)) == JOBS

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        def all_finished() -> dict | None:
            page = client.get("/v1/jobs", params={"limit": 500}).json()
            done = [j for j in page["data"] if j["status"] in ("succeeded", "failed", "cancelled")]
            return page if page["count"] == JOBS and len(done) == JOBS else None

        page = wait_until(all_finished, 600, interval=1, message="all 50 jobs to finish")
        assert sorted(j["id"] for j in page["data"]) == ids  # none lost, none added
        assert all(j["status"] == "succeeded" and j["artifacts"] for j in page["data"]), \
            [(j["id"], j["status"], j["error"]) for j in page["data"] if j["status"] != "succeeded"]
        # run once: one evaluated trial per study, one FP32 baseline, one deployed-model check
        for job in page["data"]:
            trials = client.get(f"/v1/jobs/{job['id']}/trials").json()["data"]
            assert [t["state"] for t in trials if t["state"] in ("COMPLETE", "FAIL", "RUNNING")] == ["COMPLETE"], trials
            assert job["progress"]["evaluations"] == 2, job  # the baseline, one plan scored on ONNX Runtime
    engine = make_engine(db)
    with make_sessionmaker(engine)() as session:
        claims = dict(session.execute(select(Lease.job_id, Lease.claims)).all())
    engine.dispose()
    assert claims == {job_id: 1 for job_id in ids}  # each job's one slot was claimed exactly once
    claimed = re.findall(r"claimed job (\d+) slot", processes.log("serve"))
    assert sorted(int(c) for c in claimed) == ids, processes.logs()
