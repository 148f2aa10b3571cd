"""Isolation on a real `quanttune serve`: bob's token cannot read, cancel, delete or download
alice's jobs (a finished one with artifacts, a running one), neither through the API nor through
the dashboard's cookie session; tokens are stored hashed; failed auth is logged without the token."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from tests.reliability.conftest import DIGITS, NAIVE, Served
from tests.support import wait_job
from tuner.pt2_archive import export_model

pytestmark = pytest.mark.slow
ROUTES = [("get", ""), ("get", "/trials"), ("get", "/ledger"), ("get", "/report"), ("get", "/artifacts"),
          ("get", "/artifacts/model.onnx"), ("get", "/artifacts/report.json"), ("post", "/cancel"), ("delete", "")]


@pytest.fixture(scope="module")
def alice_jobs(served: Served, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Alice's finished job (artifacts) and her running job (a slow evaluation, cancelled at the end)."""
    tmp = tmp_path_factory.mktemp("alice")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 16)
    files = {"model_file": ("tiny.pt2", export_model(model, x[:8], tmp / "tiny.pt2").read_bytes()),
             "calibration_file": ("calibration.safetensors", save_safetensors({"input": x}))}
    with served.client("alice") as alice:
        spec = {"name": "alice finished", "evaluator": "agreement", "max_trials": 2}
        finished = alice.post("/v1/jobs", files={"spec": (None, json.dumps(spec)), **files}).json()["id"]
        wait_job(alice, finished, lambda j: j["status"] == "succeeded", 240, served)
        spec = {**DIGITS, "name": "alice running", "evaluate": "qt_faults.evals:slow", "space": NAIVE, "max_trials": 60}
        running = alice.post("/v1/jobs", files={"spec": (None, json.dumps(spec))}).json()["id"]
        wait_job(alice, running, lambda j: j["status"] == "running" and j["progress"]["trials"] >= 1, 240, served)
        yield {"finished": finished, "running": running}
        alice.post(f"/v1/jobs/{running}/cancel")


def unchanged(served: Served, jobs: dict) -> None:
    """Alice still sees both jobs as they were: nothing another token did reached them."""
    with served.client("alice") as alice:
        finished = alice.get(f"/v1/jobs/{jobs['finished']}").json()
        assert finished["status"] == "succeeded" and sorted(finished["artifacts"]) == ["model.onnx", "plan.json",
                                                                                       "report.json"]
        listed = {a["name"]: a for a in alice.get(f"/v1/jobs/{jobs['finished']}/artifacts").json()["data"]}
        model = alice.get(f"/v1/jobs/{jobs['finished']}/artifacts/model.onnx")
        assert model.status_code == 200 and hashlib.sha256(model.content).hexdigest() == listed["model.onnx"]["sha256"]
        running = alice.get(f"/v1/jobs/{jobs['running']}").json()
        assert running["status"] == "running" and running["workers"] == 1


def test_another_token_cannot_read_cancel_delete_or_download_through_the_api(served: Served, alice_jobs: dict) -> None:
    with served.client("bob") as bob:
        for job_id in (*alice_jobs.values(), 999_999):
            for method, path in ROUTES:
                response = getattr(bob, method)(f"/v1/jobs/{job_id}{path}")
                assert response.status_code == 404, (method, path, response.text)
                # indistinguishable from a job that does not exist: same status, code and message
                assert response.json() == {"error": {"code": "not_found", "message": f"job {job_id} not found.",
                                                     "field": None}}, (method, path)
        for status in ("", "?status=running", "?status=succeeded"):
            assert bob.get(f"/v1/jobs{status}").json() == {"data": [], "count": 0}
    with served.client() as anonymous:
        for method, path in ROUTES:
            assert getattr(anonymous, method)(f"/v1/jobs/{alice_jobs['running']}{path}").status_code == 401
    unchanged(served, alice_jobs)


@contextmanager
def _dashboard_login(served: Served, who: str) -> Iterator[httpx.Client]:
    with served.client(follow_redirects=False) as client:
        response = client.post("/dashboard/login", data={"token": served.tokens[who], "next": "/dashboard/jobs"})
        assert response.status_code == 303 and "quanttune_session" in client.cookies, response.text
        yield client


def test_another_token_cannot_reach_the_jobs_through_the_dashboard(served: Served, alice_jobs: dict) -> None:
    csrf = {"X-Quanttune-Dashboard": "1"}
    with _dashboard_login(served, "bob") as bob:
        for job_id in alice_jobs.values():
            page = bob.get(f"/dashboard/jobs/{job_id}")
            assert page.status_code == 404 and "Job not found" in page.text and "alice" not in page.text
            for method, path in ROUTES:  # the JSON API with bob's cookie session (and the CSRF header)
                response = bob.request(method.upper(), f"/v1/jobs/{job_id}{path}", headers=csrf)
                assert response.status_code == 404, (method, path, response.text)
        assert bob.get("/v1/jobs").json() == {"data": [], "count": 0}
        assert "alice" not in bob.get("/dashboard/jobs").text
    with _dashboard_login(served, "alice") as alice:  # the same requests with alice's session do reach them
        assert alice.get(f"/dashboard/jobs/{alice_jobs['finished']}").status_code == 200
        assert alice.get(f"/v1/jobs/{alice_jobs['finished']}/artifacts/model.onnx").status_code == 200
        # without the CSRF header the cookie is ignored on a state-changing request
        assert alice.post(f"/v1/jobs/{alice_jobs['running']}/cancel").status_code == 401
    unchanged(served, alice_jobs)


def test_tokens_are_stored_only_as_hashes(served: Served, alice_jobs: dict) -> None:
    from sqlalchemy import select

    from worker.db import make_engine, make_sessionmaker
    from worker.models import Token

    engine = make_engine(served.db_url)
    with make_sessionmaker(engine)() as session:
        stored = {t.name: t.token_hash for t in session.scalars(select(Token))}
    engine.dispose()
    for name, raw in served.tokens.items():
        assert stored[name] == hashlib.sha256(raw.encode()).hexdigest() and raw not in stored.values()
    # no file the service wrote (database, its WAL/journal, artifacts, logs) holds a token in clear
    files = [p for p in served.data_dir.rglob("*") if p.is_file()]
    assert any(p.name == "quanttune.db" for p in files)
    for path in files:
        data = path.read_bytes()
        for raw in served.tokens.values():
            assert raw.encode() not in data, f"token in clear in {path}"


def test_failed_auth_is_logged_without_the_token(served: Served, alice_jobs: dict) -> None:
    secret = "qt_" + secrets.token_urlsafe(24)
    marker = secret[3:]
    with served.client() as client:
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
        assert client.get(f"/v1/jobs/{alice_jobs['finished']}/report",
                          headers={"Authorization": f"Bearer {marker}"}).status_code == 401
        assert client.get("/v1/jobs", headers={"Authorization": f"Basic {marker}"}).status_code == 401
        assert client.post("/dashboard/login", data={"token": secret}).status_code == 401
        client.cookies.set("quanttune_session", f"1.{int(time.time()) + 999}.{marker}")
        assert client.get("/dashboard/jobs", follow_redirects=False).status_code == 303  # to the login page
    with served.client("alice") as alice:  # a valid token in use: its requests are logged, the token is not
        assert alice.get(f"/v1/jobs/{alice_jobs['finished']}").status_code == 200

    def logged() -> str:
        log = served.log()
        return log if "dashboard session refused" in log and "dashboard login failed" in log else ""

    deadline = time.monotonic() + 10
    while not (log := logged()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert re.search(r"auth failed: unknown token on GET /v1/jobs from 127\.0\.0\.1", log), log[-3000:]
    assert f"auth failed: unknown token on GET /v1/jobs/{alice_jobs['finished']}/report" in log
    assert "auth failed: no token on GET /v1/jobs" in log  # the Basic header is no bearer token
    assert "dashboard login failed: unknown token from 127.0.0.1" in log
    assert "dashboard session refused: bad signature or deleted token on /dashboard/jobs" in log
    assert marker not in log  # neither the secret nor any part of a real token
    for raw in served.tokens.values():
        assert raw[3:] not in log
