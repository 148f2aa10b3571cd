"""Your own code on the service, the first-class way: `quanttune serve --code DIR --allow mypkg`
and `quanttune worker --code DIR --allow mypkg` (real processes, nothing on PYTHONPATH but this
checkout). The banner lists the allowed modules and the dashboard; a refused reference names the
flag to change; a module copied into DIR while the service runs resolves without a restart; the
separate worker imports the evaluation from DIR and finishes the job."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Processes, pythonpath, submit, user_package, wait_http, wait_job

DIGITS = {"model": "tuner.examples.digits:build_model", "calibration": "tuner.examples.digits:calibration_data"}


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    env = {**os.environ, "PYTHONPATH": pythonpath(), "PYTHONUNBUFFERED": "1", "QUANTTUNE_POLL_SECONDS": "0.2",
           "OMP_NUM_THREADS": "1"}
    env.pop("QUANTTUNE_ALLOWED_MODULES", None)
    env.pop("QUANTTUNE_CODE_DIRS", None)
    procs = Processes(tmp_path, env)
    yield procs
    procs.close()


def _refusal(client: httpx.Client, evaluate: str) -> str:
    response = client.post("/v1/jobs", files={"spec": (None, f'{{"evaluate": "{evaluate}", '
                                                              f'"model": "{DIGITS["model"]}", '
                                                              f'"calibration": "{DIGITS["calibration"]}"}}')})
    assert response.status_code == 422, response.text
    return response.json()["error"]["message"]


def test_serve_and_worker_with_code_and_allow(processes: Processes, tmp_path: Path, free_port) -> None:  # noqa: ANN001
    code = user_package(tmp_path / "code", "qt_mycode", '''
        from tuner.examples import digits

        def accuracy(model):
            return digits.evaluate(model)
    ''')
    data, port = tmp_path / "data", free_port()
    flags = ("--code", str(code), "--allow", "qt_mycode", "--data-dir", str(data))
    serve = processes.start("serve", "serve", "--port", str(port), "--workers", "0", *flags)
    url = f"http://127.0.0.1:{port}"
    wait_http(url, processes, process=serve)
    banner = processes.log("serve")
    assert "references allowed in modules tuner.examples, qt_mycode (--allow)" in banner
    assert f"code dirs {code} (--code)" in banner and f"dashboard: {url}/dashboard/" in banner
    token = processes.run("token", "create", "--data-dir", str(data), "--name", "me").strip().splitlines()[-1]

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        outside = _refusal(client, "qt_other.evals:accuracy")
        assert "`--allow qt_other`" in outside and "QUANTTUNE_ALLOWED_MODULES" in outside
        missing = _refusal(client, "qt_mycode.later:accuracy")
        assert "`--code DIR`" in missing and "QUANTTUNE_CODE_DIRS" in missing and str(code) in missing

        # a module copied into the code dir while the service runs: no restart
        (code / "qt_mycode" / "later.py").write_text(textwrap.dedent('''
            from qt_mycode.evals import accuracy
        '''))
        job_id = submit(client, {**DIGITS, "evaluate": "qt_mycode.evals:accuracy", "max_trials": 1, "name": "mine"})
        processes.start("worker", "worker", *flags)
        job = wait_job(client, job_id, lambda j: j["status"] == "succeeded", 300, processes)
        assert job["evaluation_source"] == "qt_mycode.evals:accuracy" and job["baseline"] > 90
        assert "references allowed in modules tuner.examples, qt_mycode" in processes.log("worker")
        response = client.post("/v1/jobs", files={"spec": (None, f'{{"evaluate": "qt_mycode.later:accuracy", '
                                                                  f'"model": "{DIGITS["model"]}", "max_trials": 1, '
                                                                  f'"calibration": "{DIGITS["calibration"]}"}}')})
        assert response.status_code == 201, response.text
        client.post(f"/v1/jobs/{response.json()['id']}/cancel")
