"""The Python SDK against a real `quanttune serve` process (tests/api/conftest.py): the README
example (an nn.Module uploaded as a torch.export archive, calibration batches as safetensors,
evaluation by reference), trials, report, download, the downloaded INT8 model evaluated here, a
built-in evaluator with uploaded data, cancel, and the error paths."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from api.client import Client
from api.client.errors import (
    AuthenticationError,
    BudgetNotMetError,
    ConflictError,
    ClientArgumentError,
    InvalidInputError,
    JobCancelledError,
    JobError,
    NetworkError,
    NotFoundError,
    QuanttuneClientError,
)
from tuner.examples import digits

REPO = Path(__file__).resolve().parents[3]
LAYERS = ["conv1", "conv2", "fc1", "fc2"]
NAIVE = {"activation": ["max"], "scheme": ["affine"], "weights": ["per_tensor"], "smooth": False}  # breaks 1%


@pytest.fixture(scope="module")
def token(running_server) -> str:  # noqa: ANN001
    return running_server.new_token("sdk-tests")


@pytest.fixture(scope="module")
def client(running_server, token: str):  # noqa: ANN001, ANN201
    with Client(running_server.url, token) as c:
        yield c


@pytest.fixture(scope="module")
def readme(running_server, token: str, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: ANN001
    """The README's SDK example, run as written with QUANTTUNE_URL / QUANTTUNE_TOKEN set."""
    text = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("## Python client and CLI"):], re.S).group(1)
    workdir = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTTUNE_URL", running_server.url)
        mp.setenv("QUANTTUNE_TOKEN", token)
        mp.chdir(workdir)
        namespace: dict = {}
        exec(compile(code, "README: Python client and CLI", "exec"), namespace)  # noqa: S102
    namespace["workdir"] = workdir
    return namespace


def test_readme_example_uploads_an_nn_module_and_waits_for_the_result(readme: dict) -> None:
    info = readme["info"]
    assert info.status == "succeeded" and info.met and 0 <= info.drop <= 0.01
    assert info.model_source == "upload:model.pt2" and info.calibration_source.startswith("upload:")
    assert info.evaluation_source == "tuner.examples.digits:evaluate"
    assert info.baseline == pytest.approx(digits.evaluate(digits.build_model()))
    assert info.coverage == 1.0 and info.progress.evaluations >= 2
    assert sorted(p.name for p in (readme["workdir"] / "digits-int8").iterdir()) == ["model.onnx", "plan.json", "report.json"]


def test_trials_report_ledger_and_verified_download(readme: dict, client: Client, tmp_path: Path) -> None:
    info = readme["info"]
    job = client.job(info.id)  # a fresh handle on the same job
    trials = job.trials()
    assert [t.number for t in trials] == list(range(len(trials))) and trials
    assert info.progress.trials == sum(t.state in ("COMPLETE", "FAIL") for t in trials)
    assert any(t.state == "COMPLETE" and t.score == info.score and t.coverage == info.coverage for t in trials)
    assert trials[0].plan is None and job.trials(include_plan=True)[0].plan["version"] == 1

    report = job.report()
    assert report["score"] == info.score and report["met"] is True and list(report["ledger"]) == LAYERS
    # the deployed check, typed in the job and in full in the report: every layer runs an INT8 kernel
    deployment = info.deployment
    assert (deployment.int8_kernels, deployment.int8_layers, deployment.int8_macs_running) == (4, 4, 1.0)
    assert deployment.float_layers == [] and deployment.errors == {}
    assert [(r.batch, r.threads) for r in deployment.latency] == [(1, 1), (32, 1), (1, "all"), (32, "all")]
    assert [r.model_dump() for r in deployment.latency] == report["deployment"]["latency"]["rows"]
    assert {k["kernel"] for k in report["deployment"]["kernels"]["layers"].values()} == {"QLinearConv", "QGemm"}
    ledger = job.ledger()
    assert ledger.layers == LAYERS and ledger.ledger == report["ledger"] and ledger.baseline == info.baseline

    paths = job.download(tmp_path / "out")
    listed = {a.name: a for a in job.artifacts()}
    assert set(paths) == set(listed) == {"model.onnx", "plan.json", "report.json"}
    for name, path in paths.items():
        data = path.read_bytes()
        assert len(data) == listed[name].size and hashlib.sha256(data).hexdigest() == listed[name].sha256
    assert json.loads(paths["report.json"].read_text())["score"] == info.score
    assert [j.id for j in client.jobs(status="succeeded")].count(info.id) == 1
    assert info.id not in [j.id for j in client.jobs(status="failed")]


def test_load_model_runs_the_int8_model_like_the_original(readme: dict, client: Client) -> None:
    info = readme["info"]
    int8 = client.job(info.id).load_model()
    batch = digits.calibration_data()[0]
    out = int8(batch)
    assert isinstance(out, torch.Tensor) and out.shape == (32, 10)
    with torch.no_grad():
        agree = (out.argmax(1) == digits.build_model()(batch).argmax(1)).float().mean().item()
    assert agree >= 0.9
    # the downloaded model scores here what the worker measured on ONNX Runtime (one sample = 0.19%)
    assert digits.evaluate(int8) == pytest.approx(info.deployed_score, abs=0.2)


def test_builtin_top1_evaluator_with_uploaded_tensors(client: Client) -> None:
    _, _, images, labels = digits._splits()  # noqa: SLF001 (the held-out split digits.evaluate uses)
    job = client.submit("tuner.examples.digits:build_model", torch.cat(digits.calibration_data()), "top1",
                        eval_data=images, labels=labels, batch_size=64, max_trials=5, name="top1")
    assert job.info.status == "queued" and job.info.evaluation_source == "builtin:top1"
    assert job.info.model_source == "tuner.examples.digits:build_model"
    assert job.info.calibration_source.startswith("upload:") and job.info.max_trials == 5
    info = job.wait(progress=False, timeout=300, poll=0.5)
    assert info.status == "succeeded" and info.met
    # top-1 on the uploaded held-out images and labels is digits.evaluate's accuracy (float32 there)
    assert info.baseline == pytest.approx(digits.evaluate(digits.build_model()), abs=1e-5)


def test_an_evaluation_failing_on_the_onnx_model_keeps_the_finished_search(client: Client, token: str) -> None:
    job = client.submit("tuner.examples.digits:build_model", "tuner.examples.digits:calibration_data",
                        "qt_clientcode.evals:torch_only", max_trials=2, name="torch-only evaluation")
    info = job.wait(progress=False, timeout=300, poll=0.5)
    assert info.status == "succeeded" and info.met and info.error is None and info.deployed_score is None
    assert sorted(info.artifacts) == ["model.onnx", "plan.json", "report.json"]
    error = info.deployment.errors["score"]
    assert error.startswith("the evaluation raised TypeError when run on the ONNX Runtime model") and "cpu" in error
    assert job.report()["deployment"]["errors"]["score"] == error
    from typer.testing import CliRunner

    from api.cli import app

    shown = CliRunner().invoke(app, ["status", str(info.id)], env={"QUANTTUNE_URL": client.url, "COLUMNS": "400",
                                                                   "QUANTTUNE_TOKEN": token})
    assert shown.exit_code == 0 and "not measured (score): the evaluation raised TypeError" in shown.output


def test_wait_tells_a_missed_budget_and_raises_on_request(client: Client) -> None:
    job = client.submit("tuner.examples.digits:build_model", "tuner.examples.digits:calibration_data",
                        "tuner.examples.digits:evaluate", space=NAIVE, max_trials=1, name="missed")
    info = job.wait(progress=False)  # by default it returns: the report and artifacts are there to read
    assert info.status == "succeeded" and info.outcome == "not_met" and info.met is False
    with pytest.raises(BudgetNotMetError) as raised:
        job.wait(progress=False, raise_on_miss=True)
    assert raised.value.job.outcome == "not_met" and isinstance(raised.value, JobError)
    assert str(raised.value).startswith(f"job {job.id} finished without meeting its budget: the best plan's drop is")
    assert job.report()["met"] is False


def test_cancel_a_running_job(client: Client, tmp_path: Path, wait_until) -> None:  # noqa: ANN001
    job = client.submit("tuner.examples.digits:build_model", "tuner.examples.digits:calibration_data",
                        "qt_clientcode.evals:slow", space=NAIVE, max_trials=40, name="to cancel")
    wait_until(lambda: job.status().progress.trials >= 1, 180, message="the search to be under way")
    assert job.cancel().status == "cancelled"
    assert job.cancel().status == "cancelled"  # a second cancel changes nothing
    with pytest.raises(JobCancelledError) as raised:
        job.wait(progress=False, timeout=30)
    assert raised.value.job.status == "cancelled" and f"job {job.id} was cancelled" in str(raised.value)
    with pytest.raises(ConflictError) as raised:
        job.report()
    assert raised.value.status == 409 and raised.value.code == "not_ready" and "cancelled" in raised.value.message
    with pytest.raises(ConflictError):
        job.download(tmp_path)

    # the worker stops before its next trial: nothing left running, then no new trial
    wait_until(lambda: not job.trials(state="RUNNING"), 60, message="the running trial to end")
    count = len(job.trials())
    time.sleep(3)  # three evaluations' worth of the slow evaluation
    assert len(job.trials()) == count


def test_errors_are_typed_and_carry_the_servers_message(running_server, readme: dict, client: Client) -> None:  # noqa: ANN001
    url = running_server.url
    with pytest.raises(AuthenticationError) as raised:
        Client(url, "qt_not-a-token").jobs()
    assert (raised.value.status, raised.value.code, str(raised.value)) == (401, "invalid_token", "invalid token.")
    with pytest.raises(AuthenticationError) as raised:
        Client(url, "").jobs()
    assert raised.value.code == "unauthorized" and "Bearer" in raised.value.message

    with pytest.raises(NotFoundError) as raised:
        client.job(10**9)
    assert raised.value.status == 404 and str(10**9) in raised.value.message
    with pytest.raises(NotFoundError):  # another token's job looks the same as a missing one
        Client(url, running_server.new_token("intruder")).job(readme["info"].id)

    before = client.jobs_page().count
    with pytest.raises(InvalidInputError) as raised:
        client.submit("tuner.examples.digits:build_model", "tuner.examples.digits:calibration_data", "os.path:join")
    error = raised.value
    assert (error.status, error.code, error.field) == (422, "disallowed_reference", "spec.evaluate")
    assert "os.path:join" in error.message and "QUANTTUNE_ALLOWED_MODULES" in error.message
    assert client.jobs_page().count == before  # nothing stored

    # checked before sending, with the message the server gives for the same spec
    spec = {"model": "tuner.examples.digits:build_model", "calibration": "tuner.examples.digits:calibration_data",
            "evaluate": "tuner.examples.digits:evaluate", "max_drop": -0.5}
    with pytest.raises(InvalidInputError) as raised:
        client.submit(spec["model"], spec["calibration"], spec["evaluate"], max_drop=-0.5)
    server = httpx.post(f"{url}/v1/jobs", files={"spec": (None, json.dumps(spec))},
                        headers={"Authorization": f"Bearer {running_server.new_token('raw')}"}).json()["error"]
    assert raised.value.message == server["message"] and raised.value.field == server["field"] == "spec.max_drop"
    assert client.jobs_page().count == before

    with pytest.raises(ClientArgumentError):  # a file that is not there
        client.submit("tuner.examples.digits:build_model", "missing.safetensors", "tuner.examples.digits:evaluate")
    with pytest.raises(ClientArgumentError, match="importable on the workers"):  # a lambda cannot be sent
        client.submit("tuner.examples.digits:build_model", "tuner.examples.digits:calibration_data", lambda m: 1.0)
    assert issubclass(ClientArgumentError, ValueError) and issubclass(NetworkError, QuanttuneClientError)


class FlakyTransport(httpx.HTTPTransport):
    """A real transport whose first `failures` sends fail as `error` would on the network."""

    def __init__(self, failures: int, error: type[httpx.TransportError] = httpx.ConnectError) -> None:
        super().__init__()
        self.failures, self.error, self.calls = failures, error, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error("simulated network failure", request=request)
        return super().handle_request(request)


def test_export_failures_say_the_cause_once_and_blame_wrong_shaped_calibration(capfd) -> None:  # noqa: ANN001
    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):  # noqa: ANN001, ANN202
            return self.fc(x.flatten(1)) if x.mean() > 0 else -self.fc(x.flatten(1))

    unused = Client("http://127.0.0.1:9", "qt_unused")  # both fail before anything is sent
    with pytest.raises(ClientArgumentError) as raised:
        unused.submit(digits.build_model(), torch.randn(64, 1, 5, 5), "tuner.examples.digits:evaluate")
    assert str(raised.value).startswith("`calibration`: the data does not fit the model: the first calibration batch "
                                        "(input: float32[32, 1, 5, 5]) raised RuntimeError: ")
    assert "the model was not exported or sent" in str(raised.value)
    with pytest.raises(ClientArgumentError) as raised:
        unused.submit(Branchy(), torch.randn(64, 1, 8, 8), "tuner.examples.digits:evaluate")
    message = str(raised.value)
    assert message.startswith("`model`: torch.export could not trace Branchy: its forward takes a Python branch")
    assert "torch.cond" in message and "factory reference" in message and message.count("\n") == 0
    assert capfd.readouterr().err == ""


def test_connection_failures_are_retried_then_reported(running_server, token: str) -> None:  # noqa: ANN001
    flaky = FlakyTransport(2)
    assert Client(running_server.url, token, retries=2, backoff=0.01, transport=flaky).health().status == "ok"
    assert flaky.calls == 3
    flaky = FlakyTransport(3)
    with pytest.raises(NetworkError, match="after 3 attempt"):
        Client(running_server.url, token, retries=2, backoff=0.01, transport=flaky).jobs()
    # a dropped connection after the request was sent: a read is retried, a submit is not
    flaky = FlakyTransport(1, httpx.ReadError)
    assert Client(running_server.url, token, retries=1, backoff=0.01, transport=flaky).jobs_page().count >= 0
    flaky = FlakyTransport(1, httpx.ReadError)
    with pytest.raises(NetworkError, match="after 1 attempt"):
        Client(running_server.url, token, retries=3, backoff=0.01, transport=flaky).submit(
            "tuner.examples.digits:build_model", "tuner.examples.digits:calibration_data", "agreement")
    assert flaky.calls == 1
    with pytest.raises(NetworkError, match="ConnectError"):  # nobody listening
        Client(f"http://127.0.0.1:{_closed_port()}", token, retries=1, backoff=0.01).jobs()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_import_quanttune_is_light_and_reexports_the_sdk_and_tune() -> None:
    code = ("import sys, quanttune; from quanttune import Client, QuanttuneClientError; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "from quanttune import tune; import tuner, api.client; "
            "assert tune is tuner.tune and Client is api.client.Client; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
