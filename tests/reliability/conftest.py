"""Issue 8 (reliability and security) fixtures: user code that misbehaves on cue, and real
`quanttune serve` / `quanttune worker` processes that tests can stop, kill and restart.

`qt_faults.evals:scripted` is digits' evaluation, except that calls 2, 3, ... (call 1 is the FP32
baseline) follow `$QT_FAULT_SCRIPT`, a comma-separated list of `raise`, `nan`, `hang`, `crash` or `ok`.
Calls are counted across processes in `$QT_FAULT_DIR/calls`, and a hanging call leaves
`$QT_FAULT_DIR/hanging-<pid>`, so a test can tell which process hung and check it is gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
DIGITS = {"model": "tuner.examples.digits:build_model", "calibration": "tuner.examples.digits:calibration_data",
          "evaluate": "tuner.examples.digits:evaluate"}
NAIVE = {"activation": ["max"], "scheme": ["symmetric"], "weights": ["per_tensor"], "smooth": False}  # breaks 1%

FAULTS = '''
import os
import signal
import time
from pathlib import Path

import torch

from tuner.examples import digits


def _call() -> int:
    path = Path(os.environ["QT_FAULT_DIR"]) / "calls"
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    return n


def _hang(n):
    Path(os.environ["QT_FAULT_DIR"], f"hanging-{os.getpid()}").write_text(str(n))
    while True:
        time.sleep(0.5)


def scripted(model):
    n = _call()
    script = [s for s in os.environ.get("QT_FAULT_SCRIPT", "").split(",") if s]
    action = script[n - 2] if 2 <= n < 2 + len(script) else "ok"
    if action == "raise":
        raise RuntimeError(f"the evaluation data set is corrupt (call {n})")
    if action == "nan":
        return float("nan")
    if action == "hang":
        _hang(n)
    if action == "crash":  # as a segfault or the OOM killer would
        os.kill(os.getpid(), signal.SIGKILL)
    return digits.evaluate(model)


def hanging_baseline(model):
    _hang(_call())


def slow(model):
    time.sleep(float(os.environ.get("QT_TEST_EVAL_SLEEP", "0.5")))
    return digits.evaluate(model)


def wrong_shape_calibration():
    return [torch.rand(4, 3, 8, 8)]  # digits takes 1 channel
'''


@pytest.fixture
def fault_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`qt_faults` on sys.path and PYTHONPATH; `$QT_FAULT_DIR` an empty directory (returned)."""
    root = tmp_path / "usercode"
    (root / "qt_faults").mkdir(parents=True)
    (root / "qt_faults" / "__init__.py").write_text("")
    (root / "qt_faults" / "evals.py").write_text(textwrap.dedent(FAULTS))
    state = tmp_path / "faults"
    state.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("QT_FAULT_DIR", str(state))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # digits trains several times faster on one of 2 busy cores
    yield state
    for name in [m for m in sys.modules if m == "qt_faults" or m.startswith("qt_faults.")]:
        del sys.modules[name]


def quanttune(*args: str) -> list[str]:
    exe = shutil.which("quanttune")
    return [exe, *args] if exe else [sys.executable, "-c", "from api.cli import main; main()", *args]


class Processes:
    """Named child processes (`quanttune ...`), output in `<dir>/<name>.log`; all stopped at the end."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory, self.env = directory, env
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        assert name not in self.procs or self.procs[name].poll() is not None, f"{name} is running"
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115  (appends across restarts)
        self._logs.append(log)
        proc = subprocess.Popen(quanttune(*args), stdout=log, stderr=subprocess.STDOUT,
                                env={**self.env, **(env or {})}, start_new_session=True)
        self.procs[name] = proc
        return proc

    def run(self, *args: str) -> str:
        done = subprocess.run(quanttune(*args), capture_output=True, text=True, env=self.env, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def log(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.log(name)[-4000:]}" for name in self.procs)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in self._logs:
            log.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "QUANTTUNE_POLL_SECONDS": "0.3", "OMP_NUM_THREADS": "1",
           "QUANTTUNE_ALLOWED_MODULES": "tuner.examples,qt_faults"}
    # this checkout's code, whatever an installed `quanttune` script would import
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.pop("QUANTTUNE_DB", None)
    procs = Processes(tmp_path, env)
    yield procs
    procs.close()


def wait_http(url: str, procs: Processes, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the API on {url} did not come up\n{procs.logs()}")


def wait_job(client: httpx.Client, job_id: int, until, timeout: float, procs: Processes | None = None,  # noqa: ANN001
             allow: tuple[str, ...] = ()) -> dict:
    """Poll a job until `until(job)`; fail early when it ends otherwise (unless its status is in `allow`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            job = client.get(f"/v1/jobs/{job_id}").json()
        except httpx.TransportError:  # the API is being restarted
            job = None
        if job is not None and until(job):
            return job
        ended = job is not None and job["status"] in ("succeeded", "failed", "cancelled") and job["status"] not in allow
        if ended or time.monotonic() > deadline:
            raise AssertionError(f"job {job_id}: {job}\n{procs.logs() if procs else ''}")
        time.sleep(0.3)


class Served:
    """A `quanttune serve` process (API + 1 worker, SQLite) shared by this directory's tests, with
    tokens for alice and bob; user code `qt_faults` is allowed; uploads over 2 MB are refused."""

    def __init__(self, url: str, db: str, root: Path, procs: Processes, tokens: dict[str, str]) -> None:
        self.url, self.db, self.root, self.procs, self.tokens = url, db, root, procs, tokens

    def client(self, who: str | None = None, **kwargs) -> httpx.Client:  # noqa: ANN003
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def log(self) -> str:
        return self.procs.log("serve")


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from tests.conftest import _make_token, free_port

    root = tmp_path_factory.mktemp("reliability-served")
    (root / "usercode" / "qt_faults").mkdir(parents=True)
    (root / "usercode" / "qt_faults" / "__init__.py").write_text("")
    (root / "usercode" / "qt_faults" / "evals.py").write_text(textwrap.dedent(FAULTS))
    (root / "faults").mkdir()
    db, port = f"sqlite:///{root / 'quanttune.db'}", free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "QUANTTUNE_POLL_SECONDS": "0.3", "OMP_NUM_THREADS": "1",
           "QUANTTUNE_ALLOWED_MODULES": "tuner.examples,qt_faults", "QUANTTUNE_MAX_UPLOAD_BYTES": "2000000",
           "QT_FAULT_DIR": str(root / "faults"), "QT_TEST_EVAL_SLEEP": "1",
           "PYTHONPATH": os.pathsep.join([str(root / "usercode"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("QUANTTUNE_DB", None)
    procs = Processes(root, env)
    try:
        procs.run("migrate", "--db", db)
        tokens = {name: _make_token(db, name) for name in ("alice", "bob")}
        procs.start("serve", "serve", "--db", db, "--data-dir", str(root / "data"), "--port", str(port),
                    "--workers", "1", "--no-migrate")
        url = f"http://127.0.0.1:{port}"
        wait_http(url, procs)
        yield Served(url, db, root, procs, tokens)
    finally:
        procs.close()
