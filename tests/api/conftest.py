"""A real `quanttune serve` process (API + one worker, SQLite) shared by the SDK and CLI tests of
this session; each test module gets its own token, so it sees only its own jobs.

The server allows references in `tuner.examples` and `qt_clientcode`, a package of user code
written here: `qt_clientcode.evals:slow` (digits.evaluate after a sleep, to have a job to cancel
while it runs).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunningServer:
    url: str
    db_url: str
    data_dir: Path
    process: subprocess.Popen
    log_path: Path

    def token(self, name: str) -> str:
        from api.auth import create_token
        from api.db import make_engine, make_sessionmaker

        engine = make_engine(self.db_url)
        with make_sessionmaker(engine)() as session:
            token = create_token(session, name)
        engine.dispose()
        return token

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def running_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    from api.migrate import migrate

    root = tmp_path_factory.mktemp("served")
    package = root / "usercode" / "qt_clientcode"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "evals.py").write_text(textwrap.dedent('''
        import time
        from tuner.examples import digits

        def slow(model):
            time.sleep(1.0)
            return digits.evaluate(model)
    '''))
    db_url = f"sqlite:///{root / 'quanttune.db'}"
    migrate(db_url)
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "QUANTTUNE_ALLOWED_MODULES": "tuner.examples,qt_clientcode",
           "QUANTTUNE_POLL_SECONDS": "0.2",
           "PYTHONPATH": os.pathsep.join([str(root / "usercode"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("QUANTTUNE_DB", None)
    log_path = root / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", "from api.cli import main; main()", "serve", "--db", db_url, "--data-dir", str(root),
             "--port", str(port), "--workers", "1", "--no-migrate"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    server = RunningServer(f"http://127.0.0.1:{port}", db_url, root, process, log_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"quanttune serve did not come up\n{server.logs()}")
            try:
                if httpx.get(f"{server.url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
