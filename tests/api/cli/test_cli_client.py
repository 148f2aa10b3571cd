"""The client commands (`quanttune submit | jobs | status | trials | report | download | cancel |
wait`) against a real `quanttune serve` process (tests/api/conftest.py): invoked in-process with
typer's runner, URL and token from the environment, and once as a real process."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from api.cli import app
from tuner.examples import digits

REPO = Path(__file__).resolve().parents[3]
LAYERS = ["conv1", "conv2", "fc1", "fc2"]
NAIVE = '{"activation": ["max"], "scheme": ["affine"], "weights": ["per_tensor"], "smooth": false}'  # breaks 1%


def cli(env: dict[str, str], *args: str):  # noqa: ANN201
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def submitted(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`quanttune submit --wait --json`: the factory reference, calibration uploaded as a
    safetensors file, the built-in agreement evaluator."""
    calibration = tmp_path_factory.mktemp("cli") / "calib.safetensors"
    save_file({"input": torch.cat(digits.calibration_data())}, calibration)
    result = cli(env, "submit", "tuner.examples.digits:build_model", "-c", str(calibration), "-e", "agreement",
                 "--max-trials", "5", "--name", "cli job", "--wait", "--json")
    assert result.exit_code == 0, result.output
    return {"result": result, "job": json.loads(result.stdout)}


def test_submit_wait_prints_the_progress_bar_then_the_job_as_json(submitted: dict) -> None:
    job, result = submitted["job"], submitted["result"]
    assert job["status"] == "succeeded" and job["met"] is True and job["name"] == "cli job"
    assert job["outcome"] == "met"
    assert job["evaluation_source"] == "builtin:agreement" and job["calibration_source"] == "upload:calib.safetensors"
    assert job["baseline"] == 100.0  # the FP32 model agrees with itself
    # the progress bar went to stderr (stdout stays JSON): its final state
    assert f"job {job['id']} succeeded" in result.stderr and "INT8 MACs 100%" in result.stderr


def test_jobs_status_trials_report_as_tables_and_json(env: dict[str, str], submitted: dict) -> None:
    job = submitted["job"]
    table = cli(env, "jobs")
    assert table.exit_code == 0 and "cli job" in table.stdout and "succeeded" in table.stdout
    listed = json.loads(cli(env, "jobs", "--json").stdout)
    assert listed["count"] >= 1 and job["id"] in [j["id"] for j in listed["data"]]
    assert job["id"] not in [j["id"] for j in json.loads(cli(env, "jobs", "--status", "failed", "--json").stdout)["data"]]

    status = cli(env, "status", str(job["id"]))
    assert status.exit_code == 0 and f"job {job['id']}: cli job" in status.stdout and "MET" in status.stdout
    assert json.loads(cli(env, "status", str(job["id"]), "--json").stdout)["score"] == job["score"]
    # the deployed check: INT8 kernels x/y and FP32 vs INT8 latency on ONNX Runtime, per batch size and threads
    deployment = job["deployment"]
    assert deployment["int8_layers"] == 4 and len(deployment["latency"]) == 4
    kernels = f"{deployment['int8_kernels']}/{deployment['int8_layers']} planned INT8 layers run INT8 kernels"
    assert kernels in status.stdout and "deployed on ONNX Runtime (CPU)" in status.stdout
    for row in deployment["latency"]:
        assert f"{row['speedup']:.2f}x at batch {row['batch']}" in status.stdout
        assert re.search(rf"│\s+{row['batch']} │ {row['threads']}\s+│\s+{row['fp32_ms']:.3f} │\s+{row['int8_ms']:.3f} │"
                         rf"\s+{row['speedup']:.2f}x │", status.stdout), status.stdout

    trials = json.loads(cli(env, "trials", str(job["id"]), "--json").stdout)
    assert trials["count"] == len(trials["data"]) >= 1 and trials["data"][0]["number"] == 0
    assert any(t["state"] == "COMPLETE" and t["score"] == job["score"] for t in trials["data"])
    assert "COMPLETE" in cli(env, "trials", str(job["id"])).stdout

    report = cli(env, "report", str(job["id"]))
    assert report.exit_code == 0 and "MET" in report.stdout and all(layer in report.stdout for layer in LAYERS)
    content = json.loads(cli(env, "report", str(job["id"]), "--json").stdout)
    assert list(content["ledger"]) == LAYERS and content["score"] == job["score"]
    assert content["deployment"]["latency"]["rows"] == deployment["latency"]
    assert kernels in report.stdout and "deployed on ONNX Runtime (CPU)" in report.stdout
    for layer, verdict in content["deployment"]["kernels"]["layers"].items():  # what ONNX Runtime runs, per layer
        runs = f"{verdict['kernel']} ({'INT8' if verdict['int8'] else 'float'})" if verdict["planned"] == "int8" else "–"
        assert re.search(rf"{layer}\s+│.*│\s+{re.escape(runs)}\s+│", report.stdout), (layer, runs)


def test_a_missed_budget_exits_4_and_says_not_met_everywhere(env: dict[str, str], submitted: dict) -> None:
    missed = cli(env, "submit", "tuner.examples.digits:build_model", "-c", "tuner.examples.digits:calibration_data",
                 "-e", "tuner.examples.digits:evaluate", "--space", NAIVE, "--max-trials", "1",
                 "--name", "missed", "--wait", "--json")
    assert missed.exit_code == 4, missed.output
    job = json.loads(missed.stdout)  # the job as JSON on stdout, the one-line reason on stderr
    assert job["status"] == "succeeded" and job["outcome"] == "not_met" and job["met"] is False
    assert f"job {job['id']} finished without meeting its budget: the best plan's drop is" in missed.stderr
    assert "over the 1.00% relative budget" in missed.stderr

    waited = cli(env, "wait", str(job["id"]))
    assert waited.exit_code == 4 and "NOT MET" in waited.stdout and "finished without meeting" in waited.stderr
    assert cli(env, "wait", str(submitted["job"]["id"])).exit_code == 0
    status = cli(env, "status", str(job["id"]))
    assert status.exit_code == 0 and re.search(r"outcome\s+│ NOT MET", status.stdout), status.stdout
    rows = {line.split("│")[1].strip(): line for line in cli(env, "jobs").stdout.splitlines() if line.count("│") > 5}
    assert "NOT MET" in rows[str(job["id"])] and "succeeded" in rows[str(job["id"])]
    assert re.search(r"succeeded\s+│ MET ", rows[str(submitted["job"]["id"])])


def test_download_writes_the_artifacts(env: dict[str, str], submitted: dict, tmp_path: Path) -> None:
    job = submitted["job"]
    result = cli(env, "download", str(job["id"]), str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    paths = {name: Path(path) for name, path in json.loads(result.stdout).items()}
    assert set(paths) == {"model.onnx", "plan.json", "report.json"}
    assert json.loads(paths["plan.json"].read_text())["version"] == 1
    table = cli(env, "download", str(job["id"]), str(tmp_path / "again"))
    digest = hashlib.sha256(paths["model.onnx"].read_bytes()).hexdigest()
    assert table.exit_code == 0 and digest[:16] in table.stdout


def test_cancel_and_wait(env: dict[str, str], submitted: dict) -> None:
    refused = cli(env, "cancel", str(submitted["job"]["id"]))
    assert refused.exit_code == 1 and "already succeeded" in refused.stderr and "409 conflict" in refused.stderr

    queued = cli(env, "submit", "tuner.examples.digits:build_model", "-c", "tuner.examples.digits:calibration_data",
                 "-e", "qt_clientcode.evals:slow", "--name", "cancel me", "--json")
    job_id = json.loads(queued.stdout)["id"]
    cancelled = cli(env, "cancel", str(job_id))
    assert cancelled.exit_code == 0 and f"job {job_id} (cancel me): cancelled" in cancelled.stdout
    waited = cli(env, "wait", str(job_id), "--json")
    assert waited.exit_code == 3 and f"job {job_id} was cancelled" in waited.stderr
    assert json.loads(waited.stdout)["status"] == "cancelled"


def test_failures_exit_non_zero_with_the_servers_message(env: dict[str, str], submitted: dict) -> None:
    bad_token = cli(env, "status", str(submitted["job"]["id"]), "--token", "qt_not-a-token")
    assert bad_token.exit_code == 1 and "invalid token." in bad_token.stderr and "401 invalid_token" in bad_token.stderr
    unknown = cli(env, "status", "999999999")
    assert unknown.exit_code == 1 and "job 999999999 not found" in unknown.stderr and "404" in unknown.stderr
    rejected = cli(env, "submit", "os:system", "-c", "tuner.examples.digits:calibration_data",
                   "-e", "tuner.examples.digits:evaluate")
    assert rejected.exit_code == 1
    assert "'os:system' is not allowed" in rejected.stderr and "422 disallowed_reference, MODEL" in rejected.stderr
    missing = cli(env, "submit", "tuner.examples.digits:build_model", "-c", "missing.safetensors", "-e", "agreement")
    assert missing.exit_code == 1 and "missing.safetensors" in missing.stderr and "does not exist" in missing.stderr
    bad_space = cli(env, "submit", "tuner.examples.digits:build_model", "-c", "tuner.examples.digits:calibration_data",
                    "-e", "agreement", "--space", "{not json")
    assert bad_space.exit_code == 2 and "--space" in bad_space.output


def test_as_a_real_process_with_the_environment(env: dict[str, str], submitted: dict) -> None:
    command = [sys.executable, "-c", "from api.cli import main; main()"]
    process_env = {**os.environ, **env}
    done = subprocess.run([*command, "jobs", "--json"], capture_output=True, text=True, env=process_env, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert submitted["job"]["id"] in [j["id"] for j in json.loads(done.stdout)["data"]]
    done = subprocess.run([*command, "report", "999999999"], capture_output=True, text=True, env=process_env,
                          cwd=REPO, timeout=120)
    assert done.returncode == 1 and "job 999999999 not found" in done.stderr and not done.stdout
