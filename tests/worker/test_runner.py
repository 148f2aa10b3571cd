"""Workers running real jobs in-process with the real `tune` (SQLite): uploads and built-in
evaluators, success with artifacts, a failing baseline, cancel within one trial."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as save_safetensors

from api.app import create_app
from worker.settings import Settings
from worker.tensorfiles import read_tensors
from tuner.examples import digits
from worker import Worker
from worker.inputs import build_inputs
from worker.spec import JobSpec

NAIVE = {"activation": ["max"], "scheme": ["affine"], "weights": ["per_tensor"], "smooth": False}  # breaks 1%
SQLITE = pytest.mark.parametrize("migrated_db", ["sqlite"], indirect=True)


@pytest.fixture
def service(migrated_db: str, tmp_path: Path, make_token, user_modules):  # noqa: ANN001, ANN201
    settings = Settings(db=migrated_db, data_dir=tmp_path, allowed_modules=["tuner.examples", "qt_usercode"],
                        lease_seconds=10, poll_seconds=0.2)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {make_token(migrated_db)}"
        client.settings = settings
        yield client


@dataclass
class RunningJob:
    """A digits job (naive space, 0.6 s per evaluation) that `worker` runs in `thread`, with at
    least one trial finished; `outcome` receives what `worker.run_once()` returned."""

    id: int
    worker: Worker
    thread: threading.Thread
    outcome: list

    def join(self, timeout: float = 60) -> list:
        self.thread.join(timeout)
        return self.outcome


@pytest.fixture
def running_job(service: TestClient, wait_until, monkeypatch) -> Iterator[RunningJob]:  # noqa: ANN001
    monkeypatch.setenv("QT_TEST_EVAL_SLEEP", "0.6")
    job_id = submit(service, {"model": "tuner.examples.digits:build_model",
                              "calibration": "tuner.examples.digits:calibration_data",
                              "evaluate": "qt_usercode.evals:slow", "space": NAIVE})
    worker = Worker(service.settings)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(worker.run_once()))
    thread.start()
    try:
        wait_until(lambda: service.get(f"/v1/jobs/{job_id}").json()["progress"]["trials"] >= 1, 120, message="a trial")
        yield RunningJob(job_id, worker, thread, outcome)
    finally:  # never leave the worker running into the next test
        worker.shutdown.set()
        thread.join(60)


def submit(client: TestClient, spec: dict, **files: bytes) -> int:
    parts = {"spec": (None, json.dumps(spec)), **{k: (f"{k}.safetensors", v) for k, v in files.items()}}
    response = client.post("/v1/jobs", files=parts)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def digits_files() -> dict[str, bytes]:
    _, _, x_test, y_test = digits._splits()
    calibration = torch.cat(digits.calibration_data())
    return {"calibration_file": save_safetensors({"input": calibration.contiguous()}),
            "eval_file": save_safetensors({"input": x_test.contiguous(), "label": y_test.contiguous()})}


@SQLITE
def test_uploaded_data_and_top1_job_succeeds_with_artifacts(service: TestClient) -> None:
    spec = {"name": "digits", "model": "tuner.examples.digits:build_model", "evaluator": "top1",
            "batch_size": 100, "space": NAIVE, "max_trials": 12}
    job_id = submit(service, spec, **digits_files())
    assert Worker(service.settings).run_once() == "succeeded"
    job = service.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["error"] is None
    # the built-in top1 on the uploaded test split is the example's own metric
    assert job["baseline"] == pytest.approx(digits.evaluate(digits.build_model()))
    assert job["met"] and job["drop"] <= 0.01 and 0 < job["coverage"] < 1  # naive INT8 breaks it: some FP32
    assert job["deployed_score"] is not None and sorted(job["artifacts"]) == ["model.onnx", "plan.json", "report.json"]
    trials = service.get(f"/v1/jobs/{job_id}/trials").json()
    finished = [t for t in trials["data"] if t["state"] in ("COMPLETE", "FAIL")]
    assert job["progress"]["trials"] == len(finished) >= 2 and trials["count"] == len(trials["data"])
    assert finished[0]["coverage"] == 1.0 and finished[0]["drop"] > 0.01  # all-INT8 first, over budget
    assert any(t["fp32_layers"] for t in finished) and all(t["summary"] for t in finished)
    report = service.get(f"/v1/jobs/{job_id}/report").json()
    assert (report["score"], report["baseline"]) == (job["score"], job["baseline"])
    assert job["progress"]["evaluations"] == report["evaluations"]
    assert set(service.get(f"/v1/jobs/{job_id}/ledger").json()["ledger"]) == {"conv1", "conv2", "fc1", "fc2"}
    # the deployed check: ONNX Runtime's kernels per layer and latency vs FP32, in the job and the report
    deployment, checked = job["deployment"], report["deployment"]
    assert deployment["errors"] == {} == checked["errors"]
    assert deployment["int8_layers"] == len(report["int8_layers"]) == checked["kernels"]["planned_int8"]
    assert deployment["int8_kernels"] == checked["kernels"]["running_int8"] <= deployment["int8_layers"]
    assert set(checked["kernels"]["layers"]) == {"conv1", "conv2", "fc1", "fc2"}
    floats = [n for n, k in checked["kernels"]["layers"].items() if k["planned"] == "int8" and not k["int8"]]
    assert [f["layer"] for f in deployment["float_layers"]] == floats
    assert all(f["reason"].startswith("runs as a float") for f in deployment["float_layers"])
    planned = report["coverage"].get("planned_macs", report["coverage"]["macs"])  # share of MACs the plan keeps INT8
    assert deployment["int8_macs_planned"] == pytest.approx(planned)
    assert [(r["batch"], r["threads"]) for r in deployment["latency"]] == [(1, 1), (100, 1), (1, "all"), (100, "all")]
    assert all(r["fp32_ms"] > 0 and r["int8_ms"] > 0 for r in deployment["latency"])
    assert deployment["latency"] == checked["latency"]["rows"]
    download = service.get(f"/v1/jobs/{job_id}/artifacts/model.onnx")
    assert download.headers["content-disposition"] == 'attachment; filename="model.onnx"'
    import onnx

    onnx.checker.check_model(onnx.load_from_string(download.content))
    assert json.loads(service.get(f"/v1/jobs/{job_id}/artifacts/plan.json").content) == report["plan"]


@SQLITE
def test_failing_baseline_fails_the_job_with_the_reason(service: TestClient) -> None:
    job_id = submit(service, {"model": "tuner.examples.digits:build_model",
                              "calibration": "tuner.examples.digits:calibration_data",
                              "evaluate": "qt_usercode.evals:broken"})
    assert Worker(service.settings).run_once() == "failed"
    job = service.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["finished_at"] is not None
    assert "baseline" in job["error"] and "the evaluation data set is missing" in job["error"]
    assert job["artifacts"] == []


@SQLITE
def test_cancel_takes_effect_within_one_trial(service: TestClient, running_job: RunningJob) -> None:
    job_id = running_job.id
    assert service.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    at_cancel = service.get(f"/v1/jobs/{job_id}/trials").json()["count"]
    assert running_job.join() == ["released"]
    trials = service.get(f"/v1/jobs/{job_id}/trials").json()
    assert trials["count"] <= at_cancel + 1  # at most the trial in flight finished
    job = service.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["artifacts"] == [] and job["workers"] == 0


@SQLITE
def test_uploaded_export_archive_becomes_the_model(service: TestClient, tmp_path: Path) -> None:
    from tuner.pt2_archive import export_model

    model = digits.build_model()
    batch = digits.calibration_data()[0]
    archive = export_model(model, batch, tmp_path / "digits.pt2").read_bytes()
    files = {"model_file": archive, "calibration_file": save_safetensors({"input": batch.contiguous()})}
    job_id = submit(service, {"evaluator": "agreement"}, **files)
    job = service.get(f"/v1/jobs/{job_id}").json()
    assert job["model_source"] == "upload:model_file.safetensors" and job["evaluation_source"] == "builtin:agreement"
    spec = {"evaluator": "agreement", "batch_size": 32}
    inputs = build_inputs(JobSpec.from_stored(spec), {k: (k, v) for k, v in files.items()}, service.settings, tmp_path)
    with torch.no_grad():
        assert torch.allclose(inputs.model(batch), model(batch), atol=1e-5)
    assert inputs.evaluate(inputs.model) == 100.0  # agreement of the FP32 model with itself
    assert len(inputs.calibration) == 1 and torch.equal(inputs.calibration[0], read_tensors(files["calibration_file"], field="c")["input"])


@SQLITE
def test_a_running_job_is_deleted_once_cancelled_and_its_worker_stops(service: TestClient,
                                                                      running_job: RunningJob) -> None:
    job_id = running_job.id
    refused = service.delete(f"/v1/jobs/{job_id}")
    assert refused.status_code == 409 and refused.json()["error"]["message"] == (
        f"job {job_id} is running: cancel it first (POST /v1/jobs/{job_id}/cancel, `quanttune cancel {job_id}`), "
        "then delete it.")
    assert service.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert service.delete(f"/v1/jobs/{job_id}").status_code == 204  # at once: the worker may still be mid-trial
    outcome = running_job.join()
    assert not running_job.thread.is_alive() and outcome[0] in ("released", "lost")
    assert service.get(f"/v1/jobs/{job_id}").status_code == 404
    assert service.get("/v1/jobs").json()["count"] == 0
    import optuna

    assert all(s.study_name != f"job-{job_id}" for s in optuna.get_all_study_summaries(service.settings.db_url))
    assert running_job.worker.run_once() is None  # nothing left to claim


@SQLITE
def test_shutdown_hands_the_slot_back_after_the_current_trial(service: TestClient, running_job: RunningJob,
                                                              monkeypatch) -> None:  # noqa: ANN001
    job_id = running_job.id
    running_job.worker.shutdown.set()  # what SIGTERM does
    assert running_job.join() == ["released"]
    job = service.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "running" and job["workers"] == 0  # the slot is free at once, no lease to wait for
    done_before = {t["number"] for t in service.get(f"/v1/jobs/{job_id}/trials", params={"state": "COMPLETE"}).json()["data"]}
    monkeypatch.setenv("QT_TEST_EVAL_SLEEP", "0")
    assert Worker(service.settings).run_once() == "succeeded"  # another worker resumes the same study
    trials = service.get(f"/v1/jobs/{job_id}/trials", params={"state": "COMPLETE"}).json()["data"]
    assert done_before < {t["number"] for t in trials}
    assert service.get(f"/v1/jobs/{job_id}").json()["met"]


@SQLITE
def test_two_workers_prepare_once_and_their_counts_add_up(service: TestClient, monkeypatch) -> None:  # noqa: ANN001
    """Two workers on one job: the calibration and error report are computed once and stored with
    the job, every trial names its worker, and the job's evaluations are the sum of every call."""
    from tuner import coordination as tune_module  # where `tune` calibrates
    from worker.prepared import JobStore
    from worker.queue import Claim

    calls = []
    real = tune_module.calibrate
    monkeypatch.setattr(tune_module, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("QT_TEST_EVAL_SLEEP", "0.3")
    job_id = submit(service, {"model": "tuner.examples.digits:build_model",
                              "calibration": "tuner.examples.digits:calibration_data",
                              "evaluate": "qt_usercode.evals:slow", "space": NAIVE, "parallelism": 2})
    workers = [Worker(service.settings, worker_id=f"w{i}") for i in (1, 2)]
    outcomes: list = []
    threads = [threading.Thread(target=lambda w=w: outcomes.append(w.run_once())) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert "succeeded" in outcomes and set(outcomes) <= {"succeeded", "released", "lost", None}, outcomes
    job = service.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["met"], job
    assert len(calls) == 1  # the second worker loaded what the first stored
    queue = workers[0].queue
    sizes = JobStore(queue, Claim(job_id, 0, "w1")).sizes()
    assert any(name.startswith("prepared-") and size > 0 for name, size in sizes.items()), sizes
    assert any(name.startswith("ranking-") for name in sizes) and "baseline" in sizes
    assert sorted(service.get(f"/v1/jobs/{job_id}/artifacts").json()["data"][i]["name"] for i in range(3)) == [
        "model.onnx", "plan.json", "report.json"]  # the stored preparation is no artifact
    trials = service.get(f"/v1/jobs/{job_id}/trials").json()["data"]
    assert trials and all(t["worker"] in ("w1", "w2") for t in trials)
    # baseline + every trial that called the evaluation + the ONNX Runtime check unless the finishing
    # worker scored the chosen plan's file itself, whichever worker
    check = {"search": 0, "check": 1}[job["deployment"]["scored_by"]]
    assert job["progress"]["evaluations"] == 1 + sum(t["evaluated"] for t in trials) + check, [(t["number"], t["state"], t["worker"], t["evaluated"], t["summary"], t["error"]) for t in trials]
    evaluated = [t["summary"] for t in trials if t["evaluated"] and t["state"] == "COMPLETE"]
    assert len(evaluated) == len(set(evaluated))  # no plan evaluated twice


@SQLITE
@pytest.mark.parametrize("evaluate_on, evaluations, scored_by", [("onnxruntime", 2, "search"), ("simulation", 3, "check")])
def test_a_job_scores_its_plans_where_it_says(service: TestClient, evaluate_on: str, evaluations: int,
                                             scored_by: str) -> None:
    """By default a job's plans are scored on ONNX Runtime and the final check reuses the scored
    file; `evaluate_on: simulation` scores them on the PyTorch simulation and the check evaluates
    the exported model once more."""
    spec = {"model": "tuner.examples.digits:build_model", "calibration": "tuner.examples.digits:calibration_data",
            "evaluate": "tuner.examples.digits:evaluate"}
    job_id = submit(service, spec if evaluate_on == "onnxruntime" else {**spec, "evaluate_on": evaluate_on})
    assert Worker(service.settings).run_once() == "succeeded"
    job = service.get(f"/v1/jobs/{job_id}").json()
    assert job["evaluate_on"] == evaluate_on and job["met"] and job["outcome"] == "met"
    assert job["progress"]["evaluations"] == evaluations and job["deployment"]["scored_by"] == scored_by
    assert job["deployed_score"] is not None
