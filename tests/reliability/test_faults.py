"""Faults in the user's code, with real worker child processes (SQLite): an evaluation that raises,
returns NaN, hangs past the job's `trial_timeout` or kills its own process fails that trial with
the reason and the job goes on; a hanging baseline, or calibration data that does not fit the model, fails the job with
a clear message; cancelling a job whose evaluation hangs frees its worker at once."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from worker.settings import Settings
from worker import Worker

from tests.reliability.conftest import DIGITS, NAIVE

pytestmark = pytest.mark.parametrize("migrated_db", ["sqlite"], indirect=True)


@pytest.fixture
def service(migrated_db: str, tmp_path: Path, make_token, fault_code: Path):  # noqa: ANN001, ANN201
    settings = Settings(db=migrated_db, data_dir=tmp_path, allowed_modules=["tuner.examples", "qt_faults"],
                        lease_seconds=10, poll_seconds=0.2)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {make_token(migrated_db)}"
        client.settings = settings
        client.faults = fault_code
        yield client


def submit(client: TestClient, spec: dict) -> int:
    response = client.post("/v1/jobs", files={"spec": (None, json.dumps(spec))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def trials_of(client: TestClient, job_id: int) -> list[dict]:
    return client.get(f"/v1/jobs/{job_id}/trials", params={"limit": 1000}).json()["data"]


def hung_pids(faults: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in faults.glob("hanging-*")]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_raising_hanging_and_crashing_trials_fail_with_the_reason_and_the_job_goes_on(service: TestClient,
                                                                                         monkeypatch) -> None:  # noqa: ANN001
    # call 1 is the baseline; call 2 (trial 0, all INT8, on ONNX Runtime) raises, and so does call 3,
    # its repetition on the simulation (until an evaluation on ONNX Runtime has worked, a raise there
    # is repeated in simulation to tell an evaluation that cannot run ONNX Runtime models from a bad
    # plan); call 4 (trial 1) hangs, call 5 (trial 2) kills its own process, call 6 (trial 3, the last
    # fallback count) works. A failed plan is a verdict, not retried, so with 4 layers the 4 fallback
    # counts are all the structured search has: a NaN trial (tests/tuner/test_tune.py) would leave no
    # plan to meet the budget here
    monkeypatch.setenv("QT_FAULT_SCRIPT", "raise,raise,hang,crash,ok")
    job_id = submit(service, {**DIGITS, "evaluate": "qt_faults.evals:scripted", "space": NAIVE, "max_trials": 8,
                              "trial_timeout": 3})
    assert service.get(f"/v1/jobs/{job_id}").json()["trial_timeout"] == 3
    started = time.monotonic()
    assert Worker(service.settings).run_once() == "succeeded"
    job = service.get(f"/v1/jobs/{job_id}").json()
    trials = trials_of(service, job_id)
    failed = {t["number"]: t["error"] for t in trials if t["state"] == "FAIL"}
    assert "RuntimeError: the evaluation data set is corrupt (call 3)" in failed[0]
    assert failed[1].startswith("timed out after 3s (trial_timeout)")
    crashed = [error for number, error in failed.items() if number > 1]
    assert crashed == ["the evaluation's process was killed by SIGKILL"], failed
    assert not [t for t in trials if t["state"] == "RUNNING"]
    # the job went on after each failure, to a plan that meets the budget, found by a fresh process
    assert job["status"] == "succeeded" and job["met"] and job["drop"] <= 0.01 and job["artifacts"]
    assert [t["number"] for t in trials if t["state"] == "COMPLETE"][0] > 2
    assert job["progress"]["trials"] == sum(t["state"] in ("COMPLETE", "FAIL") for t in trials)
    # the hung evaluation's process was killed, not left behind
    (pid,) = hung_pids(service.faults)
    assert pid != os.getpid() and not alive(pid)
    assert time.monotonic() - started < 240


def test_a_hanging_baseline_fails_the_job_with_the_reason(service: TestClient) -> None:
    job_id = submit(service, {**DIGITS, "evaluate": "qt_faults.evals:hanging_baseline", "trial_timeout": 2})
    assert Worker(service.settings).run_once() == "failed"
    job = service.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["artifacts"] == [] and job["workers"] == 0
    assert job["error"] == "the evaluation of the FP32 baseline timed out after 2s (trial_timeout)"
    (pid,) = hung_pids(service.faults)
    assert not alive(pid)


def test_calibration_that_does_not_fit_a_factory_model_fails_the_job_saying_so(service: TestClient) -> None:
    # a factory model is only built on the workers, so the API cannot refuse this at submit
    # (an uploaded model can: tests/reliability/test_bad_input.py)
    job_id = submit(service, {**DIGITS, "calibration": "qt_faults.evals:wrong_shape_calibration",
                              "trial_timeout": 60})  # supervised: digits trains in a 1-thread child, not here
    assert Worker(service.settings).run_once() == "failed"
    error = service.get(f"/v1/jobs/{job_id}").json()["error"]
    assert error.startswith("the calibration data does not fit the model: its first batch (input: float32[4, 3, 8, 8])")
    assert "RuntimeError" in error and "channels" in error


def test_cancelling_a_job_whose_evaluation_hangs_frees_the_worker_at_once(service: TestClient, wait_until,
                                                                         monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("QT_FAULT_SCRIPT", "hang")
    job_id = submit(service, {**DIGITS, "evaluate": "qt_faults.evals:scripted", "space": NAIVE,
                              "trial_timeout": 3600})
    worker = Worker(service.settings)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(worker.run_once()))
    thread.start()
    wait_until(lambda: hung_pids(service.faults), 180, message="the first trial to hang")
    assert service.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    thread.join(30)
    assert not thread.is_alive() and outcome == ["released"]
    (pid,) = hung_pids(service.faults)
    assert not alive(pid)
    (trial,) = trials_of(service, job_id)
    assert trial["state"] == "FAIL" and "the job was cancelled" in trial["error"]
    assert service.get(f"/v1/jobs/{job_id}").json()["workers"] == 0
