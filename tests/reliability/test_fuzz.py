"""schemathesis against `/openapi.json` of a real `quanttune serve` (loopback only, bounded): no 5xx,
every response matches its documented status, content type, headers and schema, auth is never
ignored, a deleted job stays deleted. The server holds a finished job (real artifacts, trials and
report) and queued ones, which the fuzzer reaches through dictionaries of their ids; a first pass
only reads, a second may also create, cancel and delete."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from tests.reliability.conftest import DIGITS
from tests.support import Processes, wait_http, wait_job
from tuner.pt2_archive import export_model

pytestmark = pytest.mark.slow

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,ignored_auth,use_after_free,missing_required_header,unsupported_method")
# per operation and phase: ~700 requests a pass, ~8 s; wider: QT_FUZZ_EXAMPLES=500 QT_FUZZ_SEED=<n>
EXAMPLES = int(os.environ.get("QT_FUZZ_EXAMPLES", "25"))
SEED = os.environ.get("QT_FUZZ_SEED", "8")


def schemathesis(*args: str) -> list[str]:
    exe = shutil.which("schemathesis")
    return [exe, *args] if exe else [sys.executable, "-m", "schemathesis.cli", *args]


@pytest.fixture
def server(processes: Processes, tmp_path: Path, free_port) -> dict:  # noqa: ANN001
    db, port = f"sqlite:///{tmp_path / 'quanttune.db'}", free_port()
    token = processes.migrate_and_create_token(db, "fuzz")
    processes.start("api", "serve", "--db", db, "--port", str(port), "--workers", "0", "--no-migrate",
                    "--data-dir", str(tmp_path / "api"), env={"QUANTTUNE_MAX_UPLOAD_BYTES": "1000000"})
    url = f"http://127.0.0.1:{port}"
    wait_http(url, processes)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
        x = torch.randn(64, 16)
        files = {"model_file": ("tiny.pt2", export_model(model, x[:8], tmp_path / "tiny.pt2").read_bytes()),
                 "calibration_file": ("calibration.safetensors", save_safetensors({"input": x}))}
        spec = {"name": "finished", "evaluator": "agreement", "max_trials": 2}
        created = client.post("/v1/jobs", files={"spec": (None, json.dumps(spec)), **files})
        assert created.status_code == 201, created.text
        finished = created.json()["id"]
        processes.start("worker", "worker", "--db", db, "--data-dir", str(tmp_path / "worker"))
        wait_job(client, finished, lambda j: j["status"] == "succeeded", 240, processes)
        processes.stop("worker")  # the queued jobs below stay queued: the fuzzer's POSTs run nothing either
        queued = [client.post("/v1/jobs", files={"spec": (None, json.dumps({**DIGITS, "name": f"q{i}"}))}).json()["id"]
                  for i in range(3)]
    return {"url": url, "token": token, "finished": finished, "queued": queued, "dir": tmp_path}


SPECS = [  # valid job specs (queued only: no worker runs during the fuzzing), and near misses
    json.dumps({**DIGITS, "max_trials": 1}), json.dumps({**DIGITS, "name": "été ☃", "parallelism": 3}),
    json.dumps({**DIGITS, "evaluate": None, "evaluator": "agreement", "space": {"weights": ["per_tensor"]}}),
    json.dumps({**DIGITS, "max_drop": 0.5, "relative": False, "trial_timeout": 60}),
    json.dumps({**DIGITS, "model": "os:system"}), json.dumps({**DIGITS, "space": {"exclude": "x"}}),
]


def fuzz(server: dict, name: str, *, job_ids: list[int], methods: str) -> str:
    config = server["dir"] / f"{name}.toml"
    config.write_text(textwrap.dedent(f"""
        [dictionaries.jobs]
        values = {json.dumps(job_ids)}
        [dictionaries.artifacts]
        values = ["model.onnx", "plan.json", "report.json"]
        [dictionaries.specs]
        values = {json.dumps(SPECS)}

        [[operations]]
        include-method-regex = "GET"
        parameters = {{ "path.job_id" = {{ dictionary = "jobs", probability = 0.8 }}, "path.name" = {{ dictionary = "artifacts", probability = 0.5 }} }}

        [[operations]]
        include-method = "POST"
        include-path = "/v1/jobs"
        parameters = {{ "body.spec" = {{ dictionary = "specs", probability = 0.5 }} }}
    """))
    command = schemathesis("--config-file", str(config), "run", f"{server['url']}/openapi.json",
                           "-H", f"Authorization: Bearer {server['token']}", "--checks", CHECKS,
                           "--include-method-regex", methods, "--max-examples", str(EXAMPLES), "--seed", SEED,
                           "--workers", "1", "--request-timeout", "30", "--no-color")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=server["dir"])
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-12000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", output)
    assert counts and int(counts.group(1)) == int(counts.group(2)) >= 100 * len(methods.split("|")), output[-3000:]
    return output


def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(server: dict, processes: Processes) -> None:
    fuzz(server, "reads", job_ids=[server["finished"], server["queued"][0]], methods="GET")
    fuzz(server, "writes", job_ids=server["queued"], methods="GET|POST|DELETE")
    log = processes.log("api")
    assert "internal error" not in log and "Traceback" not in log, log[-5000:]
    assert re.search(r'"GET /v1/jobs/\d+/artifacts/model.onnx HTTP/1.1" 200', log), "the fuzzer never downloaded"
    assert re.search(r'"GET /v1/jobs/\d+/trials\?[^"]*HTTP/1.1" 200', log), "the fuzzer never listed trials"
    assert '"POST /v1/jobs HTTP/1.1" 201' in log, "the fuzzer never created a job"
