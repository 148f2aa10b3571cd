"""`EmbeddedServer`: `quanttune serve` in a child process, for the demo (and anyone who wants a
throw-away service from Python): its own SQLite database and artifacts under `data_dir`, a free
port on 127.0.0.1, N workers, user code in `code_dirs` referable in `allowed_modules` (`--code`,
`--allow`), and an API token kept in `data_dir/demo-token` (mode 0600).

    with EmbeddedServer(Path("quanttune-demo/server")) as server:
        client = Client(server.url, server.token)

Exactly the `serve` command's code path (same process layout, same signals): it is started with
this interpreter, and stopped with SIGTERM, which makes `serve` stop its workers and exit 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOKEN_FILE = "demo-token"


class EmbeddedServerError(RuntimeError):
    """The server did not come up (the message ends with its log)."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1, never PostgreSQL's 5432 (a database started later may want it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 5432:
            return port


def wait_healthy(url: str, timeout: float = 180.0, process: subprocess.Popen | None = None) -> None:
    """Return once the API on `url` answers `/v1/health`; `EmbeddedServerError` after `timeout` s,
    or as soon as `process` (the server, where we started it) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise EmbeddedServerError(f"quanttune serve exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise EmbeddedServerError(f"quanttune serve did not answer on {url} within {timeout:.0f}s")


class EmbeddedServer:
    def __init__(self, data_dir: Path, *, port: int = 0, workers: int = 1, allowed_modules: tuple[str, ...] = ("tuner.examples",),
                 code_dirs: tuple[Path, ...] = (), env: dict[str, str] | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.workers = workers
        self.allowed_modules = allowed_modules
        self.code_dirs = tuple(Path(d).resolve() for d in code_dirs)
        self.extra_env = env or {}
        self.db_url = f"sqlite:///{self.data_dir / 'quanttune.db'}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / "serve.log"
        self.token = ""
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> EmbeddedServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:  # not up (or Ctrl-C meanwhile): leave nothing running
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def prepare(self) -> None:
        """Create the schema and the token (reusing the one in `demo-token` when it is still valid)."""
        from ..auth import create_token, owner_for
        from worker.db import make_engine, make_sessionmaker
        from worker.migrate import migrate

        self.data_dir.mkdir(parents=True, exist_ok=True)
        migrate(self.db_url)
        token_file = self.data_dir / TOKEN_FILE
        saved = token_file.read_text().strip() if token_file.is_file() else ""
        engine = make_engine(self.db_url)
        try:
            with make_sessionmaker(engine)() as session:
                if saved and owner_for(session, saved) is not None:
                    self.token = saved
                else:
                    self.token = create_token(session, "demo")
                    token_file.touch(mode=0o600)
                    token_file.write_text(self.token + "\n")
        finally:
            engine.dispose()

    def start(self) -> None:
        """Prepare the database and start `quanttune serve` (returns at once; see `wait_ready`)."""
        import api

        self.prepare()
        source_root = str(Path(api.__file__).resolve().parents[1])  # the workers import this same code
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH", "")) if p),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        env.pop("QUANTTUNE_DB", None)  # never the user's configured database: --db below
        command = [sys.executable, "-c", "from api.cli import main; main()", "serve", "--db", self.db_url,
                   "--data-dir", str(self.data_dir), "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", str(self.workers), "--no-migrate"]
        command += [arg for module in self.allowed_modules for arg in ("--allow", module)]  # added to the environment's
        command += [arg for directory in self.code_dirs for arg in ("--code", str(directory))]
        log = open(self.log_path, "wb")  # noqa: SIM115 (kept by the child)
        try:
            # its own session: Ctrl-C in the terminal reaches only us, and we stop it in order
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir,
                                            start_new_session=True)
        finally:
            log.close()

    def wait_ready(self, timeout: float = 180.0) -> None:
        if self.process is None:
            raise EmbeddedServerError("quanttune serve was not started (call start() first)")
        try:
            wait_healthy(self.url, timeout, self.process)
        except EmbeddedServerError as exc:
            raise EmbeddedServerError(f"{exc}\n{self.log_tail()}") from None

    def stop(self, grace: float = 60.0) -> int | None:
        """SIGTERM (serve stops its workers, then exits); SIGKILL to the group after `grace` s."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
