"""Bad input to `POST /v1/jobs` and the other routes (the real app on a real SQLite database): each
is a 4xx in the one error shape naming the problem, and nothing is stored. Complements
tests/api/test_api.py (bad specs, unreadable tensor files, a pickle as calibration_file, 413)."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as save_safetensors
from sqlalchemy import func, select
from torch import nn

from api.app import create_app
from worker.models import JobRecord, JobFile, Lease
from worker.settings import Settings
from tests.reliability.conftest import DIGITS
from tuner.pt2_archive import export_model

pytestmark = pytest.mark.parametrize("migrated_db", ["sqlite"], indirect=True)  # refused before any write


class Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def service(migrated_db: str, tmp_path: Path, make_token):  # noqa: ANN001, ANN201
    app = create_app(Settings(db=migrated_db, data_dir=tmp_path, max_upload_bytes=2_000_000))
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {make_token(migrated_db)}"
        client.sessions = app.state.sessions
        yield client


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real torch.export archive of a small CNN taking float32[N, 1, 8, 8]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    return export_model(model, torch.rand(2, 1, 8, 8), tmp_path_factory.mktemp("model") / "cnn.pt2").read_bytes()


def post(client: TestClient, spec: dict | str | bytes, **files: bytes | tuple):  # noqa: ANN201
    body = spec if isinstance(spec, (str, bytes)) else json.dumps(spec)
    parts = {"spec": (None, body)}
    for name, data in files.items():
        parts[name] = data if isinstance(data, tuple) else (f"{name}.bin", data)
    return client.post("/v1/jobs", files=parts)


def stored(client: TestClient) -> tuple[int, int, int]:
    with client.sessions() as session:
        return tuple(session.scalar(select(func.count()).select_from(t)) for t in (JobRecord, JobFile, Lease))


def refused(response, status: int, code: str, field: str | None = None, says: str = "") -> str:  # noqa: ANN001
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}, body
    assert body["error"]["code"] == code and (field is None or body["error"]["field"] == field), body
    assert says in body["error"]["message"], body
    return body["error"]["message"]


def tensors(**named: torch.Tensor) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in named.items()})


AGREEMENT = {"evaluator": "agreement"}


def _pickled_weight_archive(archive: bytes, marker: Path) -> bytes:
    """The archive with its weights stored as pickles (torch.export.load would unpickle them)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data/weights/model_weights_config.json"):
                config = json.loads(data)
                for meta in config["config"].values():
                    meta["use_pickle"] = True
                data = json.dumps(config).encode()
            elif "/data/weights/weight_" in info.filename:
                data = __import__("pickle").dumps(Payload(marker))
            zout.writestr(info.filename, data)
    return out.getvalue()


def test_broken_and_malicious_model_files_are_refused_and_never_unpickled(service: TestClient, archive: bytes,
                                                                         tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    calibration = tensors(input=torch.rand(4, 1, 8, 8))
    saved = io.BytesIO()
    torch.save({"model": Payload(marker)}, saved)  # a torch.save zip: its unpickling would run the payload
    cases = {
        "truncated at 1/2": archive[: len(archive) // 2],
        "truncated at 9/10": archive[: len(archive) * 9 // 10],
        "random bytes": os.urandom(5000),
        "random bytes behind a zip header": b"PK\x03\x04" + os.urandom(5000),
        "empty": b"",
        "a pickle": __import__("pickle").dumps(Payload(marker)),
        "a torch.save file": saved.getvalue(),
        "an archive with pickled weights": _pickled_weight_archive(archive, marker),
    }
    for case, data in cases.items():
        message = refused(post(service, AGREEMENT, model_file=data, calibration_file=calibration), 422,
                          "invalid_input", "model_file")
        assert message.startswith("model_file: "), (case, message)
        assert "/tmp" not in message and "quanttune-check" not in message, (case, message)  # no server paths
    assert not marker.exists()  # no payload ever ran, in this process or any other
    # the same payload as weights of a factory model: refused by the weights-only loader
    refused(post(service, DIGITS, weights_file=saved.getvalue()), 422, "invalid_input", "weights_file")
    assert not marker.exists()
    assert stored(service) == (0, 0, 0)
    good = post(service, AGREEMENT, model_file=archive, calibration_file=calibration)
    assert good.status_code == 201, good.text  # the intact archive is accepted


@pytest.mark.parametrize(("data", "says"), [
    ({"input": torch.rand(4, 3, 8, 8)}, "(input: float32[1, 3, 8, 8]) raised RuntimeError"),
    ({"input": torch.rand(4, 1, 9, 9)}, "(input: float32[1, 1, 9, 9]) raised RuntimeError"),
    ({"input": torch.rand(4, 1, 8, 8, dtype=torch.float64)}, "(input: float64[1, 1, 8, 8]) raised RuntimeError"),
    ({"pixels": torch.rand(4, 1, 8, 8)}, "missing a required argument"),
    ({"input.0": torch.rand(4, 1, 8, 8), "input.1": torch.rand(4, 1, 8, 8)}, "raised"),
])
def test_calibration_that_does_not_fit_an_uploaded_model_is_refused_at_submit(service: TestClient, archive: bytes,
                                                                             data: dict, says: str) -> None:
    response = post(service, AGREEMENT, model_file=archive, calibration_file=tensors(**data))
    message = refused(response, 422, "invalid_input", "calibration_file", says)
    assert message.startswith("calibration_file: the data does not fit the uploaded model: its first sample")
    assert stored(service) == (0, 0, 0)


def test_evaluation_data_that_does_not_fit_an_uploaded_model_is_refused_at_submit(service: TestClient,
                                                                                 archive: bytes) -> None:
    good = tensors(input=torch.rand(4, 1, 8, 8))
    bad = tensors(input=torch.rand(4, 2, 8, 8), label=torch.zeros(4, dtype=torch.int64))
    response = post(service, {"evaluator": "top1"}, model_file=archive, calibration_file=good, eval_file=bad)
    refused(response, 422, "invalid_input", "eval_file", "eval_file: the data does not fit the uploaded model")
    assert stored(service) == (0, 0, 0)


@pytest.mark.parametrize(("spec", "says"), [
    ('{"max_drop": NaN}', "NaN is not a JSON value"),
    ('{"max_drop": Infinity, "relative": false}', "Infinity is not a JSON value"),
    ('{"timeout": -Infinity}', "-Infinity is not a JSON value"),
    ('{"space": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ("", "Field required"),  # an empty part is a missing one
    ('"a string"', "must be a JSON object"),
    ("null", "must be a JSON object"),
    ('{"name": "x"', "not valid JSON"),
])
def test_malformed_spec_json_is_422(service: TestClient, spec: str, says: str) -> None:
    refused(post(service, spec), 422, "invalid_input", "spec", says)
    assert stored(service) == (0, 0, 0)


@pytest.mark.parametrize(("change", "field"), [
    ({"max_drop": -0.01, "relative": False}, "spec.max_drop"),
    ({"max_drop": 1.0}, "spec.max_drop"),  # a relative budget of 100% or more (a cross-field check, named too)
    ({"max_drop": "lots"}, "spec.max_drop"),
    ({"max_drop": 1e10, "relative": False}, "spec.max_drop"),
    ({"timeout": 0}, "spec.timeout"),
    ({"trial_timeout": 0.5}, "spec.trial_timeout"),
    ({"trial_timeout": -1}, "spec.trial_timeout"),
    ({"max_trials": -3}, "spec.max_trials"),
    ({"max_trials": 10**6}, "spec.max_trials"),
    ({"max_trials": 2.5}, "spec.max_trials"),
    ({"parallelism": 65}, "spec.parallelism"),
    ({"batch_size": 0}, "spec.batch_size"),
    ({"seed": -1}, "spec.seed"),
    ({"space": {"exclude": "conv1"}}, "spec.space"),
    ({"space": {"exclude": [1, None]}}, "spec.space"),
    ({"space": ["max"]}, "spec.space"),
])
def test_invalid_budgets_and_limits_are_422_naming_the_field(service: TestClient, change: dict, field: str) -> None:
    refused(post(service, {**DIGITS, **change}), 422, "invalid_input", field)
    assert stored(service) == (0, 0, 0)


def _multipart(*parts: tuple[bytes, bytes]) -> bytes:
    """A multipart body from raw (Content-Disposition, content) pairs: bytes we choose, any encoding."""
    body = b"".join(b"--qtb\r\nContent-Disposition: form-data; " + disposition + b"\r\n\r\n" + content + b"\r\n"
                    for disposition, content in parts)
    return body + b"--qtb--\r\n"


def test_non_utf8_text_is_refused_and_odd_file_names_are_made_safe(service: TestClient) -> None:
    multipart = {"Content-Type": "multipart/form-data; boundary=qtb"}
    spec = json.dumps({**DIGITS, "name": "NAME"}).encode()
    latin1 = spec.replace(b"NAME", "caf\u00e9".encode("latin-1"))  # not UTF-8
    response = service.post("/v1/jobs", headers=multipart, content=_multipart((b'name="spec"', latin1)))
    refused(response, 400, "bad_request", None, "form field 'spec' is not valid utf-8 text")
    assert stored(service) == (0, 0, 0)
    # the same name in UTF-8 is stored as sent
    utf8 = spec.replace(b"NAME", "caf\u00e9 \u2603".encode())
    response = service.post("/v1/jobs", headers=multipart, content=_multipart((b'name="spec"', utf8)))
    assert response.status_code == 201 and response.json()["name"] == "caf\u00e9 \u2603", response.text
    # file names: no directories, no odd bytes, bounded; they only ever label the upload
    calibration = tensors(input=torch.rand(4, 1, 8, 8))
    spec_uploaded = json.dumps({**DIGITS, "calibration": None}).encode()
    for filename, expected in [(b"../../../etc/passwd", "passwd"), (b"..\\..\\boot.ini", "boot.ini"),
                               (b"\xff\xfe\x00evil.safetensors", "evil.safetensors"), (b"..", "calibration.safetensors"),
                               (b"a" * 300, "a" * 100), (b"%2e%2e%2fx", "2e_2e_2fx")]:
        body = _multipart((b'name="spec"', spec_uploaded),
                          (b'name="calibration_file"; filename="' + filename + b'"', calibration))
        response = service.post("/v1/jobs", headers=multipart, content=body)
        assert response.status_code == 201, (filename, response.text)
        assert response.json()["calibration_source"] == f"upload:{expected}", filename
    before = stored(service)
    body = _multipart((b'name="spec"', spec_uploaded), (b'name="calibration_file"; filename="' + b"a" * 5000 + b'"',
                                                        calibration))
    refused(service.post("/v1/jobs", headers=multipart, content=body), 400, "bad_request")  # the parser's header limit
    assert stored(service) == before
    with service.sessions() as session:
        names = session.scalars(select(JobFile.filename)).all()
    assert all("/" not in n and "\\" not in n and len(n) <= 100 and n.isascii() for n in names), names


def test_malformed_bodies_are_4xx(service: TestClient) -> None:
    refused(service.post("/v1/jobs", json=DIGITS), 422, "invalid_input", "spec", "Field required")
    refused(service.post("/v1/jobs", content=b"spec=%7B%7D", headers={"Content-Type": "text/plain"}), 422,
            "invalid_input", "spec")
    refused(service.post("/v1/jobs", content=b"abc", headers={"Content-Type": "multipart/form-data"}), 400,
            "bad_request", None, "boundary")
    truncated = _multipart((b'name="spec"', json.dumps(DIGITS).encode()))[:-12]  # no closing boundary
    response = service.post("/v1/jobs", content=truncated, headers={"Content-Type": "multipart/form-data; boundary=qtb"})
    assert 400 <= response.status_code < 500 and "error" in response.json(), response.text
    headerless = b"--qtb\r\n\r\nhello\r\n--qtb--\r\n"  # a part without Content-Disposition
    refused(service.post("/v1/jobs", content=headerless, headers={"Content-Type": "multipart/form-data; boundary=qtb"}),
            400, "bad_request")
    assert stored(service) == (0, 0, 0)


@pytest.mark.parametrize(("path", "status"), [
    ("/v1/jobs/%FF", 422), ("/v1/jobs/-1", 422), ("/v1/jobs/9223372036854775808", 422), ("/v1/jobs/1e3", 422),
    ("/v1/jobs?status=%FF", 422), ("/v1/jobs?limit=1e999", 422), ("/v1/jobs?offset=" + "9" * 5000, 422),
    ("/v1/jobs/1/trials?include_plan=%00", 422), ("/v1/jobs/1/trials?state=running;DROP", 422),
    ("/v1/jobs/1/artifacts/..%2F..%2Fetc%2Fpasswd", 404), ("/v1/jobs/1/artifacts/%2e%2e", 422),
    ("/v1/jobs/1/artifacts/model.onnx%00.txt", 422), ("/v1/jobs/1/artifacts/" + "a" * 5000, 422),
    ("/v1/jobs/1/artifacts/%C3%A9.onnx", 422), ("/v1/" + "x" * 20000, 404),
])
def test_hostile_paths_and_queries_are_4xx_in_the_error_shape(service: TestClient, path: str, status: int) -> None:
    job_id = post(service, DIGITS).json()["id"]
    response = service.get(path.replace("/jobs/1/", f"/jobs/{job_id}/"))
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"code", "message", "field"}
