"""Shared fixtures: a real PostgreSQL server for the session, databases parametrized over SQLite
and PostgreSQL, migrated databases, tokens, and free ports.

PostgreSQL: Debian's binaries (`/usr/lib/postgresql/*/bin`), which refuse to run as root, so
`initdb`/`pg_ctl` run through `runuser -u postgres` in a temporary directory, on a free port
other than 5432. Tests needing it are skipped, with the reason, only when the binaries are missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from api.cli.embedded import free_port
from tests.support import pythonpath, user_package
from tests.support import make_token as new_token


@pytest.fixture(name="free_port")
def free_port_fixture():  # noqa: ANN201
    """`free_port()` -> a free TCP port on 127.0.0.1 (never 5432)."""
    return free_port


@dataclass
class PostgresServer:
    port: int
    bindir: Path
    datadir: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, template: str | None = None) -> str:
        name = f"qt_{uuid.uuid4().hex[:12]}"
        self.admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not found (/usr/lib/postgresql/*/bin/initdb): "
                    "install Debian's postgresql (scripts/test.sh does it as root)")
    base = Path(tempfile.mkdtemp(prefix="quanttune-pg-"))
    as_postgres: list[str] = []
    if os.getuid() == 0:  # initdb and pg_ctl refuse root
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres", "postgres")
    base.chmod(0o755)
    datadir, port = base / "data", free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*as_postgres, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}\n{done.stderr}\n"
                               f"{(base / 'log').read_text() if (base / 'log').exists() else ''}")

    run(str(bindir / "initdb"), "-D", str(datadir), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off " \
              "-c full_page_writes=off -c max_connections=300"
    run(str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(base / "log"), "-o", options, "-w", "-t", "60", "start")
    try:
        yield PostgresServer(port, bindir, datadir)
    finally:
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty PostgreSQL database."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'quanttune.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def _migrated_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Migrated once per session, copied per test (migrating takes ~1 s)."""
    return {}


@pytest.fixture(params=BACKENDS)
def migrated_db(request: pytest.FixtureRequest, tmp_path: Path, _migrated_templates: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database with the full schema (service tables and Optuna's), on SQLite and PostgreSQL."""
    from worker.migrate import migrate

    if request.param == "sqlite":
        if "sqlite" not in _migrated_templates:
            template = tmp_path_factory.mktemp("template") / "quanttune.db"
            migrate(f"sqlite:///{template}")
            _migrated_templates["sqlite"] = str(template)
        target = tmp_path / "quanttune.db"
        shutil.copy(_migrated_templates["sqlite"], target)
        yield f"sqlite:///{target}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    if "postgresql" not in _migrated_templates:
        template = server.create_database()
        migrate(server.url(template))
        _migrated_templates["postgresql"] = template
    name = server.create_database(template=_migrated_templates["postgresql"])
    yield server.url(name)
    server.drop_database(name)


@pytest.fixture
def user_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path (and PYTHONPATH for child processes) with `qt_usercode`, a package
    of user code for references: a slow evaluation, a gated one and evaluations that fail.

    `qt_usercode.evals:gated` is digits' evaluation run only when the test lets it through: call k
    (counted in the directory `$QT_TEST_GATE`, so that calls made in a supervised child process and
    in its successors count alike; call 1 is the FP32 baseline of a new study) creates
    `call-<k>.started` there, then waits until `call-<k>.go` or `open` exists there (at most
    `$QT_TEST_GATE_TIMEOUT` s, default 600: then it raises)."""
    root = user_package(tmp_path / "usercode", "qt_usercode", '''
        import os, time
        from tuner.examples import digits

        def slow(model):
            time.sleep(float(os.environ.get("QT_TEST_EVAL_SLEEP", "0.5")))
            return digits.evaluate(model)

        def gated(model):
            from tests.support import pass_gate

            pass_gate(os.environ["QT_TEST_GATE"])
            return digits.evaluate(model)

        def broken(model):
            raise RuntimeError("the evaluation data set is missing")

        def not_a_number(model):
            return "high"
    ''')
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", pythonpath(root))
    yield root
    for name in [m for m in sys.modules if m == "qt_usercode" or m.startswith("qt_usercode.")]:
        del sys.modules[name]


@pytest.fixture
def make_token():  # noqa: ANN201
    """`make_token(db_url, name)` -> a new API token stored in that database."""
    return new_token


@pytest.fixture
def wait_until():  # noqa: ANN201
    """`wait_until(predicate, timeout, message=...)` -> the predicate's first truthy value."""
    return _wait_until


def _wait_until(predicate, timeout: float, interval: float = 0.2, message: str = "condition"):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)
