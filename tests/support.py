"""Helpers for the tests that run real processes (tests/api, tests/reliability): tokens,
packages of user code, `quanttune` child processes with their logs, waiting for the API and for
a job, and `ServerProcess`, the product's embedded `quanttune serve` as tests run it.

Imported as `tests.support` (the repository root is on sys.path under `python -m pytest`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import httpx

from api.cli.embedded import EmbeddedServer, EmbeddedServerError, wait_healthy

REPO = Path(__file__).resolve().parents[1]


def make_token(url: str, name: str = "tests") -> str:
    """A new API token named `name`, stored in the database at `url`."""
    from api.auth import create_token
    from worker.db import make_engine, make_sessionmaker

    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        token = create_token(session, name)
    engine.dispose()
    return token


def user_package(root: Path, name: str, evals: str) -> Path:
    """Package `name` under `root` whose `evals.py` is `evals` (dedented); returns `root`, the
    directory to put on sys.path / PYTHONPATH."""
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "evals.py").write_text(textwrap.dedent(evals))
    return root


def pythonpath(*first: str | Path) -> str:
    """A PYTHONPATH of `first`, then this checkout (whatever an installed `quanttune` would import),
    then the inherited one."""
    return os.pathsep.join(p for p in (*map(str, first), str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def quanttune(*args: str) -> list[str]:
    exe = shutil.which("quanttune")
    return [exe, *args] if exe else [sys.executable, "-c", "from api.cli import main; main()", *args]


class HasLogs(Protocol):
    def logs(self) -> str: ...


class Processes:
    """Named child processes (`quanttune ...`), output in `<dir>/<name>.log`; all stopped by `close`."""

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

    def migrate_and_create_token(self, db: str, name: str) -> str:
        """`quanttune migrate` the database at `db`, then `quanttune token create`: the new token."""
        self.run("migrate", "--db", db)
        return self.run("token", "create", "--db", db, "--name", name).strip().splitlines()[-1]

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
        """Each process's state and the end of its log (for failure messages)."""
        return "\n".join(f"--- {name} ({'running' if proc.poll() is None else f'exited {proc.returncode}'}) ---\n"
                         f"{self.log(name)[-4000:]}" for name, proc in self.procs.items())

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


def wait_http(url: str, logs: HasLogs, timeout: float = 120, process: subprocess.Popen | None = None) -> None:
    """Until the API on `url` answers /v1/health (fails early if `process` exits)."""
    try:
        wait_healthy(url, timeout, process)
    except EmbeddedServerError as exc:
        raise AssertionError(f"{exc}\n{logs.logs()}") from None


def wait_job(client: httpx.Client, job_id: int, until: Callable[[dict], Any], timeout: float,
             logs: HasLogs | None = None, allow: tuple[str, ...] = ()) -> dict:
    """Poll a job until `until(job)`; fail early when it ends otherwise (unless its status is in
    `allow`). An API that does not answer (being restarted) is asked again until `timeout`."""
    deadline = time.monotonic() + timeout
    unanswered: Exception | None = None
    while True:
        try:
            job, unanswered = client.get(f"/v1/jobs/{job_id}").json(), None
        except httpx.TransportError as exc:
            job, unanswered = None, exc
        if job is not None and until(job):
            return job
        ended = job is not None and job["status"] in ("succeeded", "failed", "cancelled") and job["status"] not in allow
        if ended or time.monotonic() > deadline:
            state = json.dumps(job) if job is not None else f"the API did not answer ({unanswered!r})"
            raise AssertionError(f"job {job_id}: {state}\n{logs.logs() if logs else ''}")
        time.sleep(0.3)


def submit(client: httpx.Client, spec: dict) -> int:
    """Submit a job made of references only; its id."""
    response = client.post("/v1/jobs", files={"spec": (None, json.dumps(spec))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


class Gate:
    """The test's side of a gated evaluation (`pass_gate`) for one directory: each call k writes
    `call-<k>.started` in `directory` and blocks until the test writes `call-<k>.go` (or `open`).
    Waiting on these files, never on the clock, makes a test independent of the machine's speed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {"QT_TEST_GATE": str(self.directory)}

    def started(self, call: int) -> bool:
        return (self.directory / f"call-{call}.started").exists()

    def release(self, call: int) -> None:
        (self.directory / f"call-{call}.go").touch()

    def open(self) -> None:
        (self.directory / "open").touch()

    def state(self) -> str:
        return f"{self.directory.name}: {sorted(p.name for p in self.directory.iterdir())}"


def pass_gate(directory: str | Path, timeout: float | None = None) -> int:
    """The evaluation's side of `Gate`: take the next call number k in `directory` (atomically, so
    calls from several processes count alike), create `call-<k>.started`, wait for `call-<k>.go`
    or `open` (at most `timeout` s, default `$QT_TEST_GATE_TIMEOUT` or 600: then raise); k."""
    gate = Path(directory)
    call = 1
    while True:  # the first number whose `.started` file this call creates
        try:
            os.close(os.open(gate / f"call-{call}.started", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            call += 1
    limit = timeout if timeout is not None else float(os.environ.get("QT_TEST_GATE_TIMEOUT", "600"))
    deadline = time.monotonic() + limit
    while not ((gate / f"call-{call}.go").exists() or (gate / "open").exists()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"evaluation call {call} was never let through {gate}")
        time.sleep(0.05)
    return call


class ServerProcess(EmbeddedServer):
    """`quanttune serve` as `quanttune demo` runs it (api.cli.embedded: SQLite and artifacts under
    `root`, a free port, `workers` workers, log in `root/serve.log`), with user code importable
    (directories `importable`: `--code`) and referable (modules `allowed`: `--allow`), one thread per process (the CNN trains faster on one
    of two busy cores) and fast queue polling. Use it as a context manager."""

    def __init__(self, root: Path, *, allowed: Iterable[str] = (), importable: Iterable[Path] = (),
                 env: dict[str, str] | None = None, workers: int = 1) -> None:
        defaults = {"PYTHONPATH": pythonpath(), "QUANTTUNE_POLL_SECONDS": "0.2", "OMP_NUM_THREADS": "1"}
        super().__init__(root, workers=workers, allowed_modules=("tuner.examples", *allowed),
                         code_dirs=tuple(importable), env={**defaults, **(env or {})})

    def new_token(self, name: str) -> str:
        return make_token(self.db_url, name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logs(self) -> str:
        return f"--- quanttune serve ({self.log_path}) ---\n{self.log_tail(5000)}"
