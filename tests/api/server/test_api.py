"""The REST API in-process (real app, real database: SQLite and PostgreSQL): auth, ownership,
the error shape, job creation and validation (nothing half-stored), paging, cancel, delete."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as save_safetensors
from sqlalchemy import func, select

from api.app import create_app
from worker.models import JobRecord, JobFile, Lease
from worker.settings import Settings

REF = {"model": "tuner.examples.digits:build_model", "calibration": "tuner.examples.digits:calibration_data",
       "evaluate": "tuner.examples.digits:evaluate"}


@pytest.fixture
def service(migrated_db: str, tmp_path: Path, make_token):  # noqa: ANN001, ANN201
    settings = Settings(db=migrated_db, data_dir=tmp_path, max_upload_bytes=200_000)
    app = create_app(settings)
    with TestClient(app) as client:
        client.alice = {"Authorization": f"Bearer {make_token(migrated_db, 'alice')}"}
        client.bob = {"Authorization": f"Bearer {make_token(migrated_db, 'bob')}"}
        client.sessions = app.state.sessions
        yield client


def submit(client: TestClient, headers: dict, spec: dict | str | None = None, **files: bytes):  # noqa: ANN201
    body = spec if isinstance(spec, str) else json.dumps({**REF, **(spec or {})})
    parts = {"spec": (None, body), **{name: (f"{name}.bin", data) for name, data in files.items()}}
    return client.post("/v1/jobs", headers=headers, files=parts)


def stored(client: TestClient) -> tuple[int, int, int]:
    with client.sessions() as session:
        return tuple(session.scalar(select(func.count()).select_from(t)) for t in (JobRecord, JobFile, Lease))


def assert_error(response, status: int, code: str, field: str | None = None) -> dict:  # noqa: ANN001
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code, body
    if field is not None:
        assert body["error"]["field"] == field, body
    return body["error"]


def tensors(**named: torch.Tensor) -> bytes:
    return save_safetensors({k: v.clone().contiguous() for k, v in named.items()})


def test_health_needs_no_token_and_everything_else_does(service: TestClient) -> None:
    assert service.get("/v1/health").json()["status"] == "ok"
    assert_error(service.get("/v1/jobs"), 401, "unauthorized")
    assert_error(service.get("/v1/jobs", headers={"Authorization": "Bearer qt_nope"}), 401, "invalid_token")
    assert_error(service.get("/v1/jobs", headers={"Authorization": "Basic abc"}), 401, "unauthorized")
    assert_error(service.get("/v1/nowhere", headers=service.alice), 404, "not_found")
    assert "/v1/jobs/{job_id}/trials" in service.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("migrated_db", ["sqlite"], indirect=True)
def test_docs_work_offline_and_the_spec_publishes_job_create(service: TestClient) -> None:
    import re

    page = service.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls  # no CDN
    for url in urls:
        assert service.get(url).status_code == 200, url
    bundle = service.get("/docs/static/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith("text/javascript") and len(bundle.content) > 500_000
    assert b"isOAS31" in bundle.content  # Swagger UI 5: renders the OpenAPI 3.1 document FastAPI writes
    assert service.get("/docs/static/app.py").status_code == 404 and service.get("/redoc").status_code == 404

    spec = service.get("/openapi.json").json()
    job_create = spec["components"]["schemas"]["JobCreate"]
    assert {"model", "calibration", "evaluate", "evaluator", "max_drop", "max_trials", "space"} <= set(job_create["properties"])
    assert "max_drop" in job_create["properties"] and job_create["additionalProperties"] is False
    assert "description" in job_create["properties"]["max_drop"]
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
    form = spec["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[1]]
    assert form["properties"]["spec"]["contentSchema"] == {"$ref": "#/components/schemas/JobCreate"}
    assert body["encoding"]["spec"]["contentType"] == "application/json"
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert refs <= set(spec["components"]["schemas"])  # every reference resolves


def test_create_read_list_and_page_jobs(service: TestClient) -> None:
    created = []
    for i in range(3):
        response = submit(service, service.alice, {"name": f"job {i}", "max_trials": 5, "parallelism": 2,
                                                   "space": {"weights": ["per_channel"]}})
        assert response.status_code == 201, response.text
        created.append(response.json())
    job = created[0]
    assert (job["status"], job["name"], job["max_trials"], job["parallelism"]) == ("queued", "job 0", 5, 2)
    assert job["model_source"] == REF["model"] and job["evaluation_source"] == REF["evaluate"]
    assert job["space"] == {"weights": ["per_channel"]} and job["progress"]["trials"] == 0
    assert job["created_at"].endswith("Z")
    assert service.get(f"/v1/jobs/{job['id']}", headers=service.alice).json() == job
    page = service.get("/v1/jobs", params={"limit": 2}, headers=service.alice).json()
    assert page["count"] == 3 and [j["name"] for j in page["data"]] == ["job 2", "job 1"]
    rest = service.get("/v1/jobs", params={"limit": 2, "offset": 2}, headers=service.alice).json()
    assert [j["name"] for j in rest["data"]] == ["job 0"] and rest["count"] == 3  # the last page counts without a query
    beyond = service.get("/v1/jobs", params={"limit": 2, "offset": 5}, headers=service.alice).json()
    assert beyond == {"data": [], "count": 3}
    full = service.get("/v1/jobs", params={"limit": 3}, headers=service.alice).json()
    assert len(full["data"]) == 3 and full["count"] == 3
    assert service.get("/v1/jobs", params={"status": "running"}, headers=service.alice).json() == {"data": [], "count": 0}
    assert_error(service.get("/v1/jobs", params={"status": "bogus"}, headers=service.alice), 422, "invalid_input", "query.status")
    assert_error(service.get("/v1/jobs", params={"limit": 0}, headers=service.alice), 422, "invalid_input", "query.limit")
    assert stored(service) == (3, 0, 6)  # references only: no files; 2 lease slots each


def test_other_tokens_see_nothing(service: TestClient) -> None:
    job_id = submit(service, service.alice).json()["id"]
    for method, path in [("get", ""), ("post", "/cancel"), ("delete", ""), ("get", "/trials"), ("get", "/ledger"),
                         ("get", "/report"), ("get", "/artifacts"), ("get", "/artifacts/model.onnx")]:
        error = assert_error(getattr(service, method)(f"/v1/jobs/{job_id}{path}", headers=service.bob), 404, "not_found")
        assert error["message"] == f"job {job_id} not found."
    assert service.get("/v1/jobs", headers=service.bob).json() == {"data": [], "count": 0}
    assert service.get(f"/v1/jobs/{job_id}", headers=service.alice).json()["status"] == "queued"
    assert_error(service.get("/v1/jobs/999999", headers=service.alice), 404, "not_found")
    assert_error(service.get(f"/v1/jobs/{2**40}", headers=service.alice), 422, "invalid_input", "path.job_id")


def test_cancel_and_delete(service: TestClient) -> None:
    first, second = (submit(service, service.alice).json()["id"] for _ in range(2))
    cancelled = service.post(f"/v1/jobs/{first}/cancel", headers=service.alice).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert service.post(f"/v1/jobs/{first}/cancel", headers=service.alice).json()["status"] == "cancelled"
    with service.sessions() as session:
        session.get(JobRecord, second).status = "succeeded"
        session.commit()
    assert_error(service.post(f"/v1/jobs/{second}/cancel", headers=service.alice), 409, "conflict")
    assert_error(service.get(f"/v1/jobs/{second}/report", headers=service.alice), 409, "not_ready")
    assert service.delete(f"/v1/jobs/{first}", headers=service.alice).status_code == 204
    assert_error(service.get(f"/v1/jobs/{first}", headers=service.alice), 404, "not_found")
    assert stored(service) == (1, 0, 1)


SQLITE_ONLY = pytest.mark.parametrize("migrated_db", ["sqlite"], indirect=True)  # checks that run before any write


def test_outcome_says_met_or_not_met_for_every_finish(service: TestClient) -> None:
    """`outcome` is derived from what the worker stored: a succeeded job whose search met the
    budget but whose exported model misses it on ONNX Runtime is 'not_met' too."""
    ids = [submit(service, service.alice, {"max_drop": 0.01}).json()["id"] for _ in range(6)]
    finished = {  # status, met, score and deployed score against a baseline of 90 (budget: 1% relative = 0.9)
        ids[0]: ("succeeded", True, 89.5, 89.5), ids[1]: ("succeeded", False, 80.0, 80.0),
        ids[2]: ("succeeded", True, 89.5, 85.0), ids[3]: ("succeeded", True, 89.5, None),
        ids[4]: ("failed", None, None, None)}
    with service.sessions() as session:
        for job_id, (status, met, score, deployed) in finished.items():
            job = session.get(JobRecord, job_id)
            job.status, job.met, job.baseline, job.score, job.deployed_score = status, met, 90.0, score, deployed
        session.commit()
    assert service.post(f"/v1/jobs/{ids[5]}/cancel", headers=service.alice).json()["outcome"] == "cancelled"
    jobs = {j["id"]: j for j in service.get("/v1/jobs", headers=service.alice).json()["data"]}
    assert [jobs[i]["outcome"] for i in ids] == ["met", "not_met", "not_met", "met", "failed", "cancelled"]
    assert jobs[ids[2]]["met"] is True and jobs[ids[2]]["deployed_drop"] == pytest.approx(5 / 90)
    assert jobs[ids[3]]["deployed_drop"] is None
    queued = submit(service, service.alice).json()
    assert queued["outcome"] is None and queued["deployed_drop"] is None


@SQLITE_ONLY
@pytest.mark.parametrize(("spec", "field", "code"), [
    ("{not json", "spec", "invalid_input"),
    ("[1, 2]", "spec", "invalid_input"),
    ({"max_drop": -0.1}, "spec.max_drop", "invalid_input"),
    ({"max_drop": 1.5}, "spec.max_drop", "invalid_input"),  # relative budgets must be < 1
    ({"max_trials": 0}, "spec.max_trials", "invalid_input"),
    ({"parallelism": 0}, "spec.parallelism", "invalid_input"),
    ({"surprise": 1}, "spec.surprise", "invalid_input"),
    ({"name": "x" * 201}, "spec.name", "invalid_input"),
    ({"name": "nul\u0000byte"}, "spec.name", "invalid_input"),
    ({"model": "os:system"}, "spec.model", "disallowed_reference"),
    ({"model": "tuner.examplesevil:build"}, "spec.model", "disallowed_reference"),
    ({"evaluate": "tuner.examples.digits:nothing_here"}, "spec.evaluate", "disallowed_reference"),
    ({"calibration": "tuner.examples.nomodule:data"}, "spec.calibration", "disallowed_reference"),
    ({"evaluate": "tuner.examples.digits:_splits"}, "spec.evaluate", "disallowed_reference"),
    ({"evaluate": "tuner.examples.digits:SEED"}, "spec.evaluate", "disallowed_reference"),
    ({"evaluate": "../etc/passwd"}, "spec.evaluate", "invalid_input"),
    ({"evaluate": None}, "spec.evaluate", "invalid_input"),  # no evaluation at all
    ({"evaluator": "top1"}, "spec.evaluate", "invalid_input"),  # both a reference and a built-in
    ({"model": None}, "spec.model", "invalid_input"),  # no model source
    ({"space": {"activation": ["magic"]}}, "spec.space", "invalid_input"),
    ({"space": {"speed": "fast"}}, "spec.space", "invalid_input"),
    ({"evaluate_on": "gpu"}, "spec.evaluate_on", "invalid_input"),
])
def test_bad_specs_are_422_naming_the_field_and_store_nothing(service: TestClient, spec, field: str, code: str) -> None:  # noqa: ANN001
    error = assert_error(submit(service, service.alice, spec), 422, code, field)
    if code == "disallowed_reference":
        assert json.loads(json.dumps(spec))[field.split(".")[1]] in error["message"]
    assert stored(service) == (0, 0, 0)


def test_missing_spec_part(service: TestClient) -> None:
    assert_error(service.post("/v1/jobs", headers=service.alice, data={"name": "x"}), 422, "invalid_input", "spec")


def test_uploaded_calibration_and_builtin_evaluators(service: TestClient) -> None:
    x = torch.rand(40, 1, 8, 8)
    spec = {"calibration": None, "evaluate": None, "evaluator": "top1", "batch_size": 16}
    labelled = tensors(input=x, label=torch.randint(0, 10, (40,)))
    created = submit(service, service.alice, spec, calibration_file=tensors(input=x), eval_file=labelled)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["calibration_source"] == "upload:calibration_file.bin" and job["evaluation_source"] == "builtin:top1"
    assert stored(service) == (1, 2, 1)
    # agreement needs no eval file; a weights-only .pt state dict loads into the factory's model
    buffer = io.BytesIO()
    torch.save({"fc2.bias": torch.zeros(10)}, buffer)
    agreement = {"calibration": None, "evaluate": None, "evaluator": "agreement"}
    assert submit(service, service.alice, agreement, calibration_file=tensors(input=x),
                  weights_file=buffer.getvalue()).status_code == 201
    assert stored(service) == (2, 4, 2)


def _pickle_bomb(marker: Path) -> bytes:
    class Bomb:
        def __reduce__(self):  # noqa: ANN204
            return (Path.write_text, (marker, "pwned"))

    buffer = io.BytesIO()
    torch.save({"input": Bomb()}, buffer)  # a zip-format .pt whose unpickling would write `marker`
    return buffer.getvalue()


@SQLITE_ONLY
@pytest.mark.parametrize("case", ["random", "truncated", "pickle", "no_label", "mismatch", "mixed", "gap",
                                  "weights_without_factory", "eval_without_evaluator", "top1_without_eval",
                                  "two_models", "bad_archive"])
def test_bad_uploads_are_422_and_store_nothing(service: TestClient, case: str, tmp_path: Path) -> None:
    x = torch.rand(8, 1, 8, 8)
    builtin = {"calibration": None, "evaluate": None, "evaluator": "top1"}
    good_eval = tensors(input=x, label=torch.zeros(8, dtype=torch.int64))
    marker = tmp_path / "pwned.txt"
    calls = {
        "random": ({"calibration": None}, {"calibration_file": b"\x00garbage" * 50}, "calibration_file"),
        "truncated": ({"calibration": None}, {"calibration_file": tensors(input=x)[:100]}, "calibration_file"),
        "pickle": ({"calibration": None}, {"calibration_file": _pickle_bomb(marker)}, "calibration_file"),
        "no_label": (builtin, {"calibration_file": tensors(input=x), "eval_file": tensors(input=x)}, "eval_file"),
        "mismatch": (builtin, {"calibration_file": tensors(input=x),
                               "eval_file": tensors(input=x, label=torch.zeros(7, dtype=torch.int64))}, "eval_file"),
        "mixed": ({"calibration": None}, {"calibration_file": tensors(**{"input.0": x, "mask": x})}, "calibration_file"),
        "gap": ({"calibration": None}, {"calibration_file": tensors(**{"input.0": x, "input.2": x})}, "calibration_file"),
        "weights_without_factory": ({"model": None}, {"model_file": b"PK\x03\x04", "weights_file": tensors(w=x)},
                                    "weights_file"),
        "eval_without_evaluator": ({}, {"eval_file": good_eval}, "eval_file"),
        "top1_without_eval": (builtin, {"calibration_file": tensors(input=x)}, "eval_file"),
        "two_models": ({}, {"model_file": b"PK\x03\x04rest"}, "model_file"),
        "bad_archive": ({"model": None}, {"model_file": b"PK\x03\x04" + b"\x00" * 200}, "model_file"),
    }
    spec, files, field = calls[case]
    assert_error(submit(service, service.alice, spec, **files), 422, "invalid_input", field)
    assert not marker.exists()
    assert stored(service) == (0, 0, 0)


def test_oversized_uploads_are_413_and_store_nothing(service: TestClient) -> None:
    big = b"\x00" * 300_000  # the fixture's limit is 200 kB
    assert_error(submit(service, service.alice, {"calibration": None}, calibration_file=big), 413, "payload_too_large")

    def chunks():  # noqa: ANN202  (no Content-Length: the limit is enforced while streaming)
        boundary = b"--qtboundary\r\n"
        yield boundary + b'Content-Disposition: form-data; name="spec"\r\n\r\n' + json.dumps(REF).encode() + b"\r\n"
        yield boundary + b'Content-Disposition: form-data; name="calibration_file"; filename="c.bin"\r\n\r\n'
        for _ in range(30):
            yield b"\x01" * 10_000
        yield b"\r\n--qtboundary--\r\n"

    response = service.post("/v1/jobs", headers={**service.alice, "Content-Type": "multipart/form-data; boundary=qtboundary"},
                            content=chunks())
    assert_error(response, 413, "payload_too_large")
    assert stored(service) == (0, 0, 0)


def test_unknown_artifact_names_are_refused(service: TestClient) -> None:
    job_id = submit(service, service.alice).json()["id"]
    for name in ("..%2F..%2Fetc%2Fpasswd", ".hidden", "a" * 101):
        response = service.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=service.alice)
        assert response.status_code in (404, 422), response.text
        assert "error" in response.json()
    assert_error(service.get(f"/v1/jobs/{job_id}/artifacts/model.onnx", headers=service.alice), 409, "not_ready")
    assert service.get(f"/v1/jobs/{job_id}/artifacts", headers=service.alice).json() == {"data": [], "count": 0}
    assert service.get(f"/v1/jobs/{job_id}/trials", headers=service.alice).json() == {"data": [], "count": 0}
    assert service.get(f"/v1/jobs/{job_id}/ledger", headers=service.alice).json() == {
        "layers": [], "baseline": None, "ledger": None}
